"""Checkpoints that carry their metadata, are written atomically, and load without unpickling.

A checkpoint is a plain dict of tensors and Python primitives saved with ``torch.save`` and read
with ``torch.load(..., weights_only=True)``: no arbitrary object is ever unpickled.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from backbones.base import Backbone
from backbones.registry import create

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A checkpoint was made for another architecture, data set or input size than asked for."""


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("skipnet-gym")
    except PackageNotFoundError:
        ours = "unknown"
    return {"torch": str(torch.__version__), "torchvision": version("torchvision"), "skipnet_gym": ours}


def _writer_gone(tmp: Path) -> bool:
    """Whether the process that named temporary file ``tmp`` (``.<name>.<pid>.<random>.tmp``) is no
    longer running on this machine: its file is left over from a save killed mid-write."""
    try:
        pid = int(tmp.name.rsplit(".", 3)[1])
    except ValueError:
        return True  # not named by a process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: running
        return False
    return False


def atomic_save(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``: a crash
    mid-write never leaves a truncated checkpoint where a good one was. Temporary files that saves
    killed mid-write left are removed; those of saves still running (another process writing the
    same cache entry) are not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        if stale.name != path.name and _writer_gone(stale):
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path.resolve()} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(
            f"could not load {path} as a SkipNet-Gym checkpoint ({type(err).__name__}: {err}). "
            "Checkpoints are read with weights_only=True; files holding pickled objects are refused."
        ) from err


def backbone_metadata(backbone: Backbone, dataset: str, **extra: Any) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "arch": backbone.arch,
        "arch_kwargs": dict(backbone.arch_kwargs),
        "num_classes": backbone.num_classes,
        "input_size": list(backbone.input_size),
        "dataset": dataset,
        "versions": versions(),
        **extra,
    }


def save_backbone(backbone: Backbone, path: str | Path, dataset: str, **extra: Any) -> None:
    """Write ``{"metadata": ..., "model": state_dict}`` atomically."""
    atomic_save({"metadata": backbone_metadata(backbone, dataset, **extra), "model": backbone.state_dict()}, path)


def mismatches(metadata: dict[str, Any], path: str | Path, expected: dict[str, Any], asked: str) -> list[str]:
    """One line per field where ``metadata`` differs from ``expected`` (``None``: not checked),
    ``"key: checkpoint has X, <asked> Y"``. A checkpoint written before data fingerprints were
    recorded is let through with a warning: it cannot be checked."""
    wrong = []
    for key, want in expected.items():
        if want is None:
            continue
        if key == "data_fingerprint" and key not in metadata:
            log.warning("warning: %s records no data fingerprint (an older checkpoint): it cannot be checked "
                        "against this data", path)  # fmt: skip
            continue
        have = metadata.get(key)
        if isinstance(want, tuple):
            want = list(want)
        if have != want:
            what = " (it was made on other data: another --data-root, or changed files)" * (key == "data_fingerprint")
            wrong.append(f"{key}: checkpoint has {have!r}, {asked} {want!r}{what}")
    return wrong


def check_metadata(metadata: dict[str, Any], path: str | Path, **expected: Any) -> None:
    """Raise :class:`CheckpointMismatchError` naming every field where ``metadata`` differs from
    ``expected`` (:func:`mismatches`)."""
    wrong = mismatches(metadata, path, expected, "asked for")
    if wrong:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not match what was asked for ({'; '.join(wrong)}). "
            "Point to a checkpoint of the right backbone and data set, or train one with "
            "python -m experiments.train_backbone."
        )


def load_backbone(
    path: str | Path,
    *,
    arch: str | None = None,
    dataset: str | None = None,
    num_classes: int | None = None,
    input_size: tuple[int, int, int] | None = None,
    data_fingerprint: str | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[Backbone, dict[str, Any]]:
    """Rebuild a backbone from a checkpoint; every argument given is checked against its metadata.

    Returns:
        the backbone in eval mode, and the checkpoint's metadata.
    """
    ckpt = safe_load(path, map_location)
    if "metadata" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a backbone checkpoint (no 'metadata' / 'model' entries)")
    meta = ckpt["metadata"]
    check_metadata(
        meta,
        path,
        arch=arch,
        dataset=dataset,
        num_classes=num_classes,
        input_size=input_size,
        data_fingerprint=data_fingerprint,
    )
    backbone = create(meta["arch"], num_classes=meta["num_classes"], **meta["arch_kwargs"])
    backbone.load_state_dict(ckpt["model"])
    return backbone.eval(), meta


def fingerprint(backbone: torch.nn.Module) -> str:
    """A short hash of a backbone's weights: agents' checkpoints record it, so gates trained on one
    backbone are never silently loaded onto another."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
