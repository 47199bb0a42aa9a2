"""FLOPs of a backbone's parts, counted by ``torch.utils.flop_counter`` (not hand-written formulas).

The counter counts matrix multiplies and convolutions (2 FLOPs per multiply-add); element-wise
work (BatchNorm in eval mode, ReLU, additions) is not counted, as is usual for FLOPs tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    from backbones.base import Backbone


def count_flops(module: Callable[[torch.Tensor], Any], x: torch.Tensor) -> tuple[int, Any]:
    """FLOPs of ``module(x)`` (a module or any function of ``x``) and its output, counted by the framework.

    Attention is counted through its plain matrix products: the fused kernels a CPU dispatches
    ``scaled_dot_product_attention`` to count nothing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        out = module(x)
    return int(counter.get_total_flops()), out


@dataclass(frozen=True)
class FlopsProfile:
    """FLOPs per image of each part of a backbone.

    Attributes:
        stem: the stem.
        block_executed: each block run in full.
        block_skipped: each block's shortcut (0 for an identity shortcut).
        head: pooling and classifier.
    """

    stem: int
    block_executed: tuple[int, ...]
    block_skipped: tuple[int, ...]
    head: int

    @property
    def full(self) -> int:
        """The whole network with every block executed."""
        return self.stem + sum(self.block_executed) + self.head

    def spent(self, executed: torch.Tensor) -> torch.Tensor:
        """FLOPs per image of a route. ``executed``: ``(B, num_blocks)`` bool -> ``(B,)`` float64."""
        ex = torch.tensor(self.block_executed, dtype=torch.float64, device=executed.device)
        sk = torch.tensor(self.block_skipped, dtype=torch.float64, device=executed.device)
        e = executed.to(torch.float64)
        return self.stem + self.head + e @ ex + (1.0 - e) @ sk


def profile_backbone(backbone: Backbone, input_size: tuple[int, int, int]) -> FlopsProfile:
    """Count each part of ``backbone`` on one image of ``input_size`` (C, H, W)."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    x = torch.zeros(1, *input_size, device=device)  # (1, C, H, W)
    stem, h = count_flops(backbone.stem, x)
    executed, skipped = [], []
    for block in backbone.blocks:
        shortcut: torch.nn.Module = block.shortcut  # type: ignore[assignment]  # what a skipped block runs
        s, _ = count_flops(shortcut, h)
        e, h = count_flops(block, h)
        executed.append(e)
        skipped.append(s)
    head, _ = count_flops(backbone.head, h)
    backbone.train(was_training)
    return FlopsProfile(stem=stem, block_executed=tuple(executed), block_skipped=tuple(skipped), head=head)
