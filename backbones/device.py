"""Device selection and seeding, shared by every entry point."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when there is one, else the CPU; anything else is checked to exist
    (a ``ValueError`` that says what to pass instead)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} was asked for but this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def seed_everything(seed: int, deterministic: bool | None = None) -> None:
    """Seed Python, NumPy and torch; ``deterministic`` also sets cuDNN to deterministic kernels
    (and turns its benchmark mode off; ``False``: on), ``None`` leaves cuDNN as it is."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic is not None:
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic
