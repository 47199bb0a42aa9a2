"""The on-disk cache shared by trained backbones and generated data sets."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$SKIPNET_CACHE``, default ``~/.cache/skipnet_gym``."""
    return Path(os.environ.get("SKIPNET_CACHE", Path.home() / ".cache" / "skipnet_gym"))
