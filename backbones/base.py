"""The backbone contract: a residual network as ``stem / blocks / head``.

Every block is an ``nn.Module`` whose ``forward`` is the full residual block and which exposes
``shortcut``: the module applied instead when the block is skipped (``nn.Identity`` for an
identity shortcut, the 1x1 projection + BatchNorm of a downsampling block).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch
from torch import Tensor, nn

from backbones.flops import FlopsProfile, profile_backbone

FIRST_GATED = 1
"""SkipNet's rule: the first residual block always runs, the gates decide from the second on (the
index of the first gated block; 0 lets an agent skip every block: an env's ``gate_first_block``)"""


def skip(block: nn.Module, h: Tensor) -> Tensor:
    """What a skipped ``block`` outputs for ``h``: its ``shortcut`` applied to it."""
    shortcut: nn.Module = block.shortcut  # type: ignore[assignment]  # the contract's attribute
    return shortcut(h)


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm affine parameters and running statistics, in place, so that no block of an
    untrained network is close to the identity (a fresh CIFAR ResNet has zero-init residual
    branches): what engine checks and tests route through. Returns ``module`` in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight = nn.Parameter(torch.rand(n, generator=g) + 0.5)
            m.bias = nn.Parameter(torch.randn(n, generator=g) * 0.1)
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = torch.rand(n, generator=g) + 0.5
    return module.eval()


class Backbone(nn.Module):
    """A residual network split into ``stem``, an ordered ``blocks`` list, and ``head``.

    Args:
        stem: image ``(B, C_in, H, W)`` -> first activation.
        blocks: residual blocks, each with a ``shortcut`` attribute.
        head: last activation -> logits ``(B, num_classes)``.
        num_classes: classifier width.
        input_size: ``(C, H, W)`` the network is built and profiled for.
        arch: registry name (written into checkpoints).
        arch_kwargs: constructor arguments beyond ``num_classes`` (written into checkpoints).
    """

    # what an inference copy (skipnet_env.engine.freeze) computes in; None: as built, fp32
    compute_dtype: torch.dtype | None = None
    memory_format: torch.memory_format = torch.contiguous_format

    def __init__(
        self,
        stem: nn.Module,
        blocks: Sequence[nn.Module],
        head: nn.Module,
        *,
        num_classes: int,
        input_size: tuple[int, int, int],
        arch: str,
        arch_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        for i, block in enumerate(blocks):
            if not hasattr(block, "shortcut"):
                raise TypeError(f"block {i} ({type(block).__name__}) has no `shortcut` to apply when skipped")
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.num_classes = num_classes
        self.input_size: tuple[int, int, int] = (input_size[0], input_size[1], input_size[2])
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs or {})
        # Stochastic depth (Huang et al. 2016): per-block probability of dropping the block for a
        # training sample. A dropped block outputs exactly its shortcut, as a skipped block does at
        # inference, so the network learns to tolerate the skips the environment will make.
        self.drop_rates: list[float] = [0.0] * len(blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @cached_property
    def activation_shapes(self) -> list[tuple[int, int, int]]:
        """Per-sample shape ``(C, H, W)`` after the stem and after each block."""
        shapes = []
        was_training = self.training
        self.eval()  # a probe must not move BatchNorm running statistics
        with torch.no_grad():
            device = next(self.parameters()).device
            h = self.stem(torch.zeros(1, *self.input_size, device=device))
            shapes.append(tuple(h.shape[1:]))
            for block in self.blocks:
                h = block(h)
                shapes.append(tuple(h.shape[1:]))
        self.train(was_training)
        return shapes

    @cached_property
    def flops(self) -> FlopsProfile:
        """FLOPs per image of each part at ``input_size``, counted by ``torch.utils.flop_counter``."""
        return profile_backbone(self, self.input_size)

    def set_stochastic_depth(
        self, final_drop_rate: float, protect_first: bool = True, schedule: str = "linear"
    ) -> None:
        """Per-block drop probabilities for training.

        ``"linear"`` (Huang et al.'s rule): block ``i`` of ``L`` is dropped with probability
        ``p_L * i / (L - 1)``. ``"uniform"``: every block with ``p_L``, so that early blocks learn
        to be skipped as much as late ones. With ``protect_first`` the first block (which SkipNet
        never skips) keeps rate 0.
        """
        if not 0.0 <= final_drop_rate < 1.0:
            raise ValueError(f"final_drop_rate must be in [0, 1), got {final_drop_rate}")
        if schedule not in ("linear", "uniform"):
            raise ValueError(f"stochastic-depth schedule must be 'linear' or 'uniform', got {schedule!r}")
        n = len(self.blocks)
        if schedule == "uniform":
            self.drop_rates = [final_drop_rate] * n
        elif protect_first:
            self.drop_rates = [final_drop_rate * i / max(n - 1, 1) for i in range(n)]
        else:
            self.drop_rates = [final_drop_rate * (i + 1) / n for i in range(n)]
        if protect_first:
            self.drop_rates[0] = 0.0

    def prepare(self, x: Tensor) -> Tensor:
        """``x`` in the dtype and memory format this network computes in (an inference copy made by
        ``skipnet_env.engine.freeze`` may compute in bf16, channels_last); as is otherwise."""
        if self.compute_dtype is None:
            return x
        return x.to(dtype=self.compute_dtype, memory_format=self.memory_format)

    def enter(self, x: Tensor, first_gated: int) -> Tensor:
        """Images ``x`` ``(B, C, H, W)`` through the stem and the ``first_gated`` blocks that always
        run: the activation entering the first gated block, where every routing starts."""
        h = self.stem(self.prepare(x))
        for block in self.blocks[:first_gated]:
            h = block(h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        """Image ``(B, C, H, W)`` -> logits ``(B, num_classes)``, every block executed
        (in training mode, blocks are dropped per sample at ``drop_rates``)."""
        h = self.stem(x)
        for block, rate in zip(self.blocks, self.drop_rates):
            if self.training and rate > 0.0:
                keep = torch.rand(h.shape[0], device=h.device) >= rate  # (B,)
                h = torch.where(keep[:, None, None, None], block(h), skip(block, h))
            else:
                h = block(h)
        return self.head(h)

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch}, blocks={len(self.blocks)}, num_classes={self.num_classes}, input_size={self.input_size}"
        )
