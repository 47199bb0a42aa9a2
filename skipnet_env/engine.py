"""The execution engine for frozen backbones: every forward the project runs through a backbone
it does not train (env steps, evaluation, the static search, SP's gate training, the bench).

:func:`freeze` makes an inference copy of a backbone: BatchNorm folded into the convolutions
(``torch.nn.utils.fusion``), its parameters frozen, on CUDA in bf16 and channels_last by default.
:class:`BlockExecutor` runs a gated block on the rows that execute it, in place:

- eagerly with exact shapes (the CPU default): gather the executing rows, run the block, write its
  output back into the activation (no full-size copy for identity-shortcut blocks);
- bucketed (the CUDA default): the executed-row count is rounded up to one of ``buckets`` sizes,
  the padding rows are computed and discarded, so each (block, bucket) has static shapes and is
  captured once in a CUDA graph, then replayed: one launch per block, cost following the rows.

Both paths give the real rows the same outputs (tested on the CPU, where the bucketed path runs
eagerly over the same static buffers).
"""

from __future__ import annotations

import copy
import logging
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from backbones.base import Backbone, skip
from backbones.device import resolve_precision
from skipnet_env.routing import gather_rows, identity_shortcut, route_block

log = logging.getLogger(__name__)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a convolution into it, in place.

    A pair is a ``Conv2d`` child registered right before a ``BatchNorm2d`` child of the same width
    (``conv1, bn1`` in a residual block, ``Conv2d, BatchNorm2d`` in a ``Sequential``): the fused
    convolution replaces the conv and the BatchNorm becomes ``Identity``. Returns how many were folded.
    """
    folded = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(bn, nn.BatchNorm2d)
                and bn.num_features == conv.out_channels
                and bn.track_running_stats
            ):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
                setattr(parent, bn_name, nn.Identity())
                folded += 1
    return folded


def _fold_checked(part: nn.Module, probe: Tensor) -> nn.Module:
    """``part`` with its BatchNorms folded, if that keeps its output on ``probe``; else ``part``
    itself (a forward that does not apply each BatchNorm right after its convolution).

    The two are compared in float64 on the CPU: the check does not depend on the device's kernels
    (cuDNN's TF32 convolutions differ from fp32 by more than folding does)."""
    folded = copy.deepcopy(part)
    if fold_batchnorm(folded) == 0:
        return part
    ref, new = (copy.deepcopy(m).cpu().double() for m in (part, folded))
    x = probe.detach().cpu().double()

    def close(want: Tensor, got: Tensor) -> bool:  # relative to the output's scale: activations grow with depth
        return torch.allclose(want, got, rtol=1e-5, atol=1e-5 * (1.0 + float(want.abs().max())))

    with torch.no_grad():
        same = close(ref(x), new(x))
        if same and hasattr(part, "shortcut"):
            same = close(skip(ref, x), skip(new, x))
    if not same:
        log.warning("BatchNorm folding changed the output of %s: left unfolded", type(part).__name__)
        return part
    return folded


def freeze(
    backbone: Backbone,
    device: torch.device | str | None = None,
    precision: str = "auto",
    fold_bn: bool = True,
    channels_last: bool | None = None,
) -> Backbone:
    """An inference copy of ``backbone`` (the original is left as it is).

    Args:
        device: where the copy lives (default: the backbone's).
        precision: ``"auto"`` (bf16 on CUDA, fp32 elsewhere), ``"fp32"`` or ``"bf16"``.
        fold_bn: fold BatchNorm into the convolutions (checked block by block on a probe batch).
        channels_last: NHWC memory format (default: on CUDA).

    The copy keeps the original's FLOPs profile and activation shapes, and records its
    ``compute_dtype`` and ``memory_format``; feed it images through ``Backbone.prepare`` (or ``enter``).

    One run freezes a backbone once: the copy is kept (for as long as the original lives) and
    handed to every later call with the same settings, for as long as the original's weights are
    the same tensors, unchanged in place (an optimizer step or ``load_state_dict`` makes a new copy).
    The copy is shared: never train or modify it.
    """
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    dtype = resolve_precision(precision, device)
    if channels_last is None:
        channels_last = device.type == "cuda"
    key = (device, dtype, fold_bn, channels_last)
    weights = tuple((id(t), t._version) for t in (*backbone.parameters(), *backbone.buffers()))
    copies = _frozen.setdefault(backbone, {})
    if key in copies and copies[key][0] == weights:
        return copies[key][1]
    copies[key] = (weights, _freeze(backbone, device, dtype, fold_bn, channels_last))
    return copies[key][1]


# the copies freeze() made, per original backbone (dropped with it) and settings
_frozen: weakref.WeakKeyDictionary[Backbone, dict[tuple, tuple[tuple, Backbone]]] = weakref.WeakKeyDictionary()


def _freeze(
    backbone: Backbone, device: torch.device, dtype: torch.dtype, fold_bn: bool, channels_last: bool
) -> Backbone:
    _ = backbone.flops, backbone.activation_shapes  # profiled on the original, carried by the copy
    frozen = copy.deepcopy(backbone).to(device).eval()
    frozen.requires_grad_(False)
    if fold_bn:
        with torch.no_grad():
            g = torch.Generator(device="cpu").manual_seed(0)
            h = torch.randn(2, *backbone.input_size, generator=g).to(device)
            frozen.stem = _fold_checked(frozen.stem, h)
            h = frozen.stem(h)
            for i, block in enumerate(frozen.blocks):
                frozen.blocks[i] = _fold_checked(block, h)
                h = block(h)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    frozen.to(dtype=dtype)
    frozen.to(memory_format=memory_format)
    frozen.compute_dtype = dtype
    frozen.memory_format = memory_format
    return frozen


def bucket_sizes(batch: int, buckets: int) -> list[int]:
    """``buckets`` row counts from ``batch / buckets`` up to ``batch`` (rounded up to 8 rows)."""
    sizes = {min(batch, math.ceil(batch * (i + 1) / buckets / 8) * 8) for i in range(buckets)}
    return sorted(sizes)


@dataclass
class _Buffers:
    """The static tensors one batch size's bucketed steps read and write."""

    execute: Tensor  # (B,) bool
    acts: dict[tuple[int, ...], Tensor]  # (B, C, H, W) per activation shape


class CapturedGraph:
    """A captured CUDA graph and every tensor it reads or writes, kept alive together (PyTorch's
    rule: a graph replays on the memory it was captured with); calling it replays the graph on its
    own device, whichever device is current."""

    def __init__(self, graph: torch.cuda.CUDAGraph, device: torch.device, keep: tuple) -> None:
        self.graph, self.device, self.keep = graph, device, keep

    def __call__(self) -> None:
        with torch.cuda.device(self.device):
            self.graph.replay()


def capture(
    body: Callable[[], object],
    device: torch.device,
    *,
    warmup: Callable[[], object] | None = None,
    warmup_runs: int = 2,
    keep: tuple = (),
    pool: Any = None,
) -> CapturedGraph:
    """``body`` captured in a CUDA graph on ``device`` (set as the current device for the capture,
    whichever is current: ``cuda:1`` works without ``set_device``).

    ``warmup`` (default ``body``) runs ``warmup_runs`` times first on a side stream, so that cuDNN
    and cuBLAS pick their kernels outside the capture. The capture is ``thread_local``: a
    DataLoader's pin-memory thread running CUDA work meanwhile does not break it. ``keep``: the
    tensors ``body`` reads (its static inputs); they, ``body`` and its output live as long as the
    returned graph.
    """
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup_runs):
                (warmup or body)()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = body()
    return CapturedGraph(graph, device, (body, out, *keep))


class BlockExecutor:
    """Runs gated blocks of a frozen backbone on their executing rows.

    Args:
        backbone: a :func:`freeze` copy (or any backbone in eval mode under ``no_grad``).
        buckets: 0: exact row counts, eager (the CPU default). ``n > 0``: the row count is rounded
            up to one of ``n`` sizes and the block runs on static buffers (the CUDA default, 8).
        graphs: capture each (block, bucket) in a CUDA graph on first use and replay it (CUDA
            only; default on CUDA when bucketed).
    """

    def __init__(self, backbone: Backbone, buckets: int | None = None, graphs: bool | None = None) -> None:
        self.backbone = backbone
        self.device = next(backbone.parameters()).device
        cuda = self.device.type == "cuda"
        self.buckets = (8 if cuda else 0) if buckets is None else buckets
        if self.buckets < 0:
            raise ValueError(f"buckets must be >= 0 (0: exact row counts), got {self.buckets}")
        self.graphs = (cuda and self.buckets > 0) if graphs is None else graphs
        if self.graphs and not cuda:
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device}; pass graphs=False")
        if self.graphs and self.buckets == 0:
            raise ValueError("CUDA graphs need static shapes: pass buckets > 0")
        self._buffers: dict[int, _Buffers] = {}
        self._steps: dict[tuple[int, int, int], Callable[[], None]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    def begin(self, h: Tensor) -> Tensor:
        """The activation to route from: ``h`` copied into this batch size's static buffer when
        bucketed (the caller's tensor is never written), else ``h`` as is."""
        if not self.buckets:
            return h
        buf = self._buffers_for(h.shape[0]).acts[tuple(h.shape[1:])]
        return buf.copy_(h)

    def route(self, index: int, h: Tensor, execute: Tensor, num_execute: int) -> Tensor:
        """Block ``index`` of the backbone on the rows of ``h`` where ``execute`` ``(B,)`` bool,
        its shortcut elsewhere; ``num_execute`` is ``execute.sum()`` on the host. May write ``h``."""
        block = self.backbone.blocks[index]
        if not self.buckets:
            return route_block(block, h, execute, num_execute, inplace=True)
        batch = h.shape[0]
        bufs = self._buffers_for(batch)
        out_shape = tuple(self.backbone.activation_shapes[index + 1])
        out = bufs.acts[out_shape]
        if num_execute == 0:  # nothing to run: the shortcut alone
            return h if identity_shortcut(block) else out.copy_(skip(block, h))
        static_h = bufs.acts[tuple(h.shape[1:])]
        if h.data_ptr() != static_h.data_ptr():  # an activation from elsewhere: into the buffer the step reads
            h = static_h.copy_(h)
        bufs.execute.copy_(execute)
        bucket = next(s for s in bucket_sizes(batch, self.buckets) if s >= num_execute)
        key = (batch, index, bucket)
        if key not in self._steps:
            self._steps[key] = self._build(block, h, out, bufs.execute, bucket)
        self._steps[key]()
        return out

    def _buffers_for(self, batch: int) -> _Buffers:
        bufs = self._buffers.get(batch)
        if bufs is None:
            dtype = self.backbone.compute_dtype or torch.float32
            fmt = self.backbone.memory_format
            acts = {
                tuple(shape): torch.zeros(batch, *shape, device=self.device, dtype=dtype).to(memory_format=fmt)
                for shape in self.backbone.activation_shapes
            }
            execute = torch.zeros(batch, dtype=torch.bool, device=self.device)
            bufs = self._buffers[batch] = _Buffers(execute, acts)
        return bufs

    def _build(self, block: nn.Module, h: Tensor, out: Tensor, execute: Tensor, bucket: int) -> Callable[[], None]:
        """The step of ``block`` at ``bucket`` rows over the static ``h`` -> ``out``: executed rows
        first, the first ``bucket`` of them (padded with skipped rows) through the block, the
        block's output kept on the executed rows only. In place when the shortcut is the identity
        (``out is h``)."""
        identity = identity_shortcut(block)
        arange = torch.arange(h.shape[0], device=self.device)

        def step(h: Tensor = h, out: Tensor = out, execute: Tensor = execute) -> None:
            order = torch.argsort((~execute).to(torch.uint8), stable=True)[:bucket]  # (bucket,) executed rows first
            real = (arange[:bucket] < execute.sum())[:, None, None, None]  # (bucket, 1, 1, 1)
            x = gather_rows(h, order)
            if identity:
                keep = x
            else:
                out.copy_(skip(block, h))
                keep = gather_rows(out, order)
            out.index_copy_(0, order, torch.where(real, block(x), keep))

        if not self.graphs:
            return step
        # warm up on scratch copies, so that the real buffers are written only by the replays; the
        # graph reads the arange and the static buffers: kept alive with it
        scratch_h = h.clone()
        scratch_out = scratch_h if identity else out.clone()
        try:
            return capture(
                step,
                self.device,
                warmup=lambda: step(scratch_h, scratch_out, execute),
                keep=(arange, h, out, execute),
                pool=self._pool,
            )
        except Exception as err:  # a capture that fails must not end the run: the same step, eagerly
            log.warning("CUDA graph capture failed (%s): the bucketed steps run eagerly from here on", err)
            self.graphs = False
            return step
