"""The command-line layer: run, compare, bench, figures."""
