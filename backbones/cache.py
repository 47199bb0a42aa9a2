"""The on-disk cache shared by trained backbones and generated data sets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """``$SKIPNET_CACHE``, default ``~/.cache/skipnet_gym``."""
    return Path(os.environ.get("SKIPNET_CACHE", Path.home() / ".cache" / "skipnet_gym"))


@contextmanager
def building(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``'s cache entry while it is built: a second process (a
    sweep's other trial, a comparison run beside it) that wants the same entry waits, then finds it
    finished, instead of training it a second time into the same file. An advisory ``flock`` on
    ``<path>.lock``; where the platform has none (Windows), no lock.

    In a data-parallel job the ranks build the entry together: rank 0 takes the lock, and the
    others go on only once it holds it (so that they all find the entry as rank 0 does)."""
    from backbones.distributed import ranks

    here = ranks()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    if not here.main:
        here.barrier()
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            here.barrier()
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def file_name(name: str) -> str:
    """``name`` (a backbone's, a data set's) as it goes into a cache file's name: ``timm:vit_tiny``
    -> ``timm-vit_tiny`` (a colon is not a file name's character everywhere); a name with a folder
    in it (``/home/me/my_net.py:net``) keeps its last part and a hash of the whole
    (``my_net.py-net-1a2b3c4d``)."""
    if "/" not in name and "\\" not in name:
        return name.replace(":", "-")
    import hashlib

    last = name.replace("\\", "/").rsplit("/", 1)[-1].replace(":", "-")
    return f"{last}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def content_key(obj: Any) -> str:
    """A short hash of ``obj`` (JSON with sorted keys; other values by ``str``): what names a cache
    entry by everything that changes it."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
