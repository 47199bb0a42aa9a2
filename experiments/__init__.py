"""The command-line layer: the run's configuration (``config``: the run's own options over the parts
the agents' modules own), ``run`` (one agent: train, evaluate, report through ``report``),
``compare``, ``sweep``, ``reproduce``, ``bench``, ``check``, ``figures``; ``cli`` turns a
configuration into flags."""
