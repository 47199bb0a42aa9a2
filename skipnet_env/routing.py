"""The routed forward: a block runs only on the rows that execute it.

``route_block`` gathers the executing rows, runs the block on them and writes their outputs over
the shortcut's (the identity, or a projection cheap enough to run on every row): skipped rows cost
only their shortcut, on any device, with no Python loop over images. The frozen engine
(:mod:`skipnet_env.engine`) runs it in place. ``masked_forward`` is what the original SkipNet code
does (run every block on every row, then multiply by the gate), kept as the baseline the
benchmarks compare to.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backbones.base import Backbone, skip


def identity_shortcut(block: nn.Module) -> bool:
    return isinstance(block.shortcut, nn.Identity)


def gather_rows(h: Tensor, rows: Tensor) -> Tensor:
    """``h[rows]`` in ``h``'s memory format. ``index_select`` copies whole rows of a contiguous
    tensor (advanced indexing goes element by element: 3-6x slower on the CPU) but returns NCHW, so a
    channels_last ``h`` (a ViT's token grid, the CUDA engine's activations) is selected through its
    contiguous NHWC view and handed back channels_last."""
    if h.is_contiguous():
        return h.index_select(0, rows)
    if h.dim() == 4 and h.is_contiguous(memory_format=torch.channels_last):
        return h.permute(0, 2, 3, 1).index_select(0, rows).permute(0, 3, 1, 2)
    return h[rows]


def route_block(
    block: nn.Module, h: Tensor, execute: Tensor, num_execute: int | None = None, *, inplace: bool = False
) -> Tensor:
    """Apply ``block`` to the rows of ``h`` where ``execute`` is true and ``block.shortcut`` elsewhere.

    Args:
        block: a residual block with a ``shortcut`` attribute.
        h: activation ``(B, C, H, W)``.
        execute: ``(B,)`` bool, on ``h``'s device.
        num_execute: ``execute.sum()`` if the caller already has it on the host (saves a device sync).
        inplace: write the executed rows' outputs into ``h`` where the shortcut is the identity (no
            full-size copy; the frozen engine's path): only for an activation nothing else holds,
            and never under autograd.

    Returns:
        ``(B, C', H', W')``: ``block(h[b])`` for executed rows, ``block.shortcut(h[b])`` for skipped.
    """
    batch = h.shape[0]
    if num_execute is None:
        num_execute = int(execute.sum())  # the one device sync: the executed row count sets the shapes
    if num_execute == batch:
        return block(h)
    if num_execute == 0:
        return skip(block, h)
    run = torch.argsort((~execute).to(torch.uint8), stable=True)[:num_execute]  # executed rows first, no sync
    out_run = block(gather_rows(h, run))  # (B_run, C', H', W')
    out = h if identity_shortcut(block) else skip(block, h)  # a projection runs on every row: cheap
    return out.index_copy_(0, run, out_run) if inplace else out.index_copy(0, run, out_run)


def routed_forward(backbone: Backbone, x: Tensor, execute: Tensor) -> Tensor:
    """Logits ``(B, num_classes)`` of images ``x`` routed by ``execute`` ``(B, num_blocks)`` bool."""
    h = backbone.stem(x)
    for i, block in enumerate(backbone.blocks):
        h = route_block(block, h, execute[:, i])
    return backbone.head(h)


def masked_forward(backbone: Backbone, x: Tensor, execute: Tensor) -> Tensor:
    """The original SkipNet code's forward: every block runs on every row and the gate masks the
    result, so skipping saves no time. Same output as :func:`routed_forward`."""
    h = backbone.stem(x)
    for i, block in enumerate(backbone.blocks):
        m = execute[:, i].to(h.dtype)[:, None, None, None]  # (B, 1, 1, 1)
        h = block(h) * m + skip(block, h) * (1.0 - m)
    return backbone.head(h)
