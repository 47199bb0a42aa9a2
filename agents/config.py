"""Moved: the run's configuration is :mod:`experiments.config` (the command line's configuration is
not the library's); its parts live beside what they configure (``agents.hybrid.HybridConfig``, ...).
This name works, with a warning, until the next release."""

import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    import experiments.config

    if not hasattr(experiments.config, name):
        raise AttributeError(f"module 'agents.config' has no attribute {name!r}")
    warnings.warn(f"agents.config.{name} moved: import it from experiments.config", DeprecationWarning, stacklevel=2)
    return getattr(experiments.config, name)
