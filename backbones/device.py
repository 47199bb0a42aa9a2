"""Device selection, compute precision and seeding, shared by every entry point."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
Precision = Literal["auto", "fp32", "bf16"]
"""``"auto"``: bf16 on a CUDA GPU that computes it natively, fp32 elsewhere"""


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


def cuda_bf16_native(device: torch.device) -> bool:
    """``device`` is a CUDA GPU that computes in bf16 natively (Ampere or newer); ``is_bf16_supported()``
    alone also counts the emulation V100 and T4 offer, which is slower than fp32."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype of ``precision`` (``"auto"``: bf16 on CUDA where supported, else fp32)."""
    if precision == "auto":
        return torch.bfloat16 if cuda_bf16_native(device) else torch.float32
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use auto, {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "cuda" and not cuda_bf16_native(device):
        raise ValueError(
            f"bf16 was asked for but {torch.cuda.get_device_name(device)} has no native bf16 (it would be emulated, "
            "slower than fp32); use fp32"
        )
    if precision == "bf16" and device.type not in ("cpu", "cuda"):
        raise ValueError(f"bf16 is supported on cpu and cuda here, not on {device.type}; use fp32")
    return PRECISIONS[precision]


def training_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a stage that trains weights with ``precision`` (:func:`resolve_precision`),
    ``None`` for fp32 (no autocast)."""
    dtype = resolve_precision(precision, device)
    return None if dtype == torch.float32 else dtype


def mixed_precision(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision for a training forward: ``torch.autocast`` to ``dtype`` (``None``: as is, fp32).
    The weights, their gradients and the optimizer stay fp32; the backward runs outside it."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def precision_name(dtype: torch.dtype | None) -> str:
    """``"bf16"`` for ``torch.bfloat16``, ``"fp32"`` for fp32 or ``None`` (the names ``--precision`` takes)."""
    return next((name for name, d in PRECISIONS.items() if d == dtype), "fp32")
