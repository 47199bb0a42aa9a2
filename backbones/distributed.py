"""Data-parallel training under ``torchrun``: which rank this process is, and the few collective
steps a trainer needs, on PyTorch's own machinery (``torch.distributed``, ``DistributedDataParallel``).

    torchrun --nproc-per-node 2 -m experiments.train_backbone --dataset cluttered_digits

Every rank holds the whole model; each global batch (the configuration's ``batch_size``) is split
across the ranks, each computes the gradient of its part, and DDP averages them. A rank's mean loss
is weighted by ``world x its share of the global batch`` (:meth:`Ranks.global_mean`), so that the average
of the ranks' gradients is the gradient of the global batch's mean loss: K steps on N ranks end
where K steps of one process on the whole batches end where BatchNorm is synchronised
(tests/test_distributed.py checks it). BatchNorm statistics are the global batch's where each
rank has fewer than 32 images (:func:`synced_batchnorm`: torch's ``SyncBatchNorm`` on GPUs; on the
CPU, where it does not run, the same statistics through ``all_reduce`` in an autograd function),
each rank's own above (:func:`syncs_batchnorm`). Rank 0 alone writes checkpoints, logs
and TensorBoard.

Outside ``torchrun`` (no ``WORLD_SIZE`` above 1) nothing here does anything: one process runs as it
always has, bit for bit.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from backbones.device import mixed_precision

log = logging.getLogger(__name__)

# seconds a collective waits for the other ranks before the job fails (a rank that died or hangs):
# SKIPNET_DIST_TIMEOUT overrides it
DEFAULT_TIMEOUT_S = 600
# apart from rank 0's seed, each rank's own random streams start this far on (Ranks.seed)
RANK_SEED_STRIDE = 1_000_003
# images per rank from which BatchNorm's statistics stay each rank's own (syncs_batchnorm)
LOCAL_BN_MIN = 32


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel job (``world == 1``: a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this rank writes (checkpoints, logs, TensorBoard, results)."""
        return self.rank == 0

    def seed(self, seed: int) -> int:
        """This rank's seed for a random stream of its own (its augmentation, its sampled routes):
        ``seed`` on rank 0, what a single process uses, so that rank ``r`` of a job draws what one
        process given ``Ranks(r, world).seed(seed)`` draws."""
        return seed + RANK_SEED_STRIDE * self.rank

    def part(self, index: Tensor) -> Tensor:
        """This rank's contiguous part of a global batch's indices (parts differ by at most one)."""
        return index.tensor_split(self.world)[self.rank] if self.distributed else index

    def global_mean(self, loss: Tensor, local: int, total: int) -> Tensor:
        """This rank's mean ``loss`` over its ``local`` images of a global batch of ``total``,
        weighted by ``world x local / total`` so that DDP's average of the ranks' gradients is the
        gradient of the global batch's mean loss (``loss`` itself alone). ``total`` comes from the
        data (:func:`backbones.batching.global_batch_sizes`), not from a collective: counting it
        with an ``all_reduce`` before every backward cost the second rank 10-15% of its speed."""
        if not self.distributed:
            return loss
        return loss * (self.world * local / total)

    def backward(
        self,
        net: nn.Module,
        x: Tensor,
        y: Tensor,
        total: int,
        loss_of: Callable[..., tuple],
        parts: int = 1,
        autocast: torch.dtype | None = None,
    ) -> tuple[Tensor, list[tuple]]:
        """Backward of the global batch's mean loss from this rank's images ``x`` and labels ``y``
        (``total``: the global batch's size), in ``parts`` micro-batches whose gradients add up to
        the step's (a batch that does not fit): ``loss_of(x_part, y_part)`` returns the part's mean
        loss and anything else the caller keeps; it runs under ``torch.autocast`` to ``autocast``
        where given (:func:`backbones.device.training_dtype`). ``net`` (the module, or its DDP
        wrapper) averages the ranks' gradients once, after the last part. Returns this rank's mean
        loss (detached) and each part's other outputs."""
        ddp = net if isinstance(net, nn.parallel.DistributedDataParallel) else None
        chunks = [(xi, yi) for xi, yi in zip(x.tensor_split(parts), y.tensor_split(parts)) if len(yi)]
        mean_loss, kept = x.new_zeros(()), []
        for i, (xi, yi) in enumerate(chunks):
            last = i == len(chunks) - 1
            with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
                with mixed_precision(x.device, autocast):
                    loss, *rest = loss_of(xi, yi)
                if len(chunks) > 1:  # the part's share of this rank's mean
                    loss = loss * (len(yi) / len(y))
                self.global_mean(loss, len(y), total).backward()
            mean_loss = mean_loss + loss.detach()
            kept.append(tuple(rest))
        return mean_loss, kept

    def sum(self, value: Tensor) -> Tensor:
        """``value`` summed over the ranks (itself alone)."""
        if not self.distributed:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value

    def mean(self, values: Tensor) -> Tensor:
        """The mean of ``values`` over every rank's elements (``values.mean()`` alone)."""
        if not self.distributed:
            return values.mean()
        both = self.sum(torch.stack([values.float().sum(), torch.tensor(float(values.numel()), device=values.device)]))
        return both[0] / both[1]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` alone."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank: what rank 0 alone decides (a new run folder's
        name); ``obj`` itself alone."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def share(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (a no-op alone): where BatchNorm's
        statistics are each rank's own, the running statistics differ between ranks; the network
        that is evaluated, written and handed on is rank 0's."""
        if self.distributed:
            with torch.no_grad():
                for tensor in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(tensor, 0)

    def check_same(self, what: str, value: str) -> None:
        """Refuse a job whose ranks hold different ``value`` s (a data fingerprint: another data root
        on one machine): a ``ValueError`` on every rank naming those that differ from rank 0."""
        values = self.gather(value)
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            raise ValueError(
                f"the ranks disagree on {what}: rank(s) {', '.join(map(str, odd))} have {values[odd[0]]!r}, rank 0 "
                f"{values[0]!r}; give every rank the same data (--data-root on a shared file system)"
            )

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def wrap(self, module: nn.Module, device: torch.device, find_unused: bool = False) -> nn.Module:
        """``module`` in ``DistributedDataParallel`` (itself alone). In the base trainer and SP every
        parameter takes part in every step (stochastic depth and SP's hard gates multiply a block's
        output by 0 or 1 rather than leave it out), so unused-parameter search stays off; HRL with
        the backbone fine-tuned runs only the blocks its routes choose: ``find_unused``."""
        if not self.distributed:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            module, device_ids=ids, forward_sync_buffers=False, find_unused_parameters=find_unused
        )


# keep_ranks: leave() keeps the group, and rank 0 goes on alone inside it (_alone) until join()
_keep = False
_alone = False


class RankIdle(Exception):
    """Raised by :func:`leave` on the ranks other than 0 under :func:`keep_ranks`: the run goes on
    on rank 0 alone, and this rank waits for the next (:func:`join`)."""


def ranks() -> Ranks:
    """This process's :class:`Ranks`: from the process group :func:`start` made, else (and on rank
    0 while it goes on alone under :func:`keep_ranks`) a single process."""
    if dist.is_available() and dist.is_initialized() and not _alone:
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Ranks()


def start(device: str | torch.device = "auto") -> tuple[Ranks, str | torch.device]:
    """Join the job ``torchrun`` started (``WORLD_SIZE`` > 1 in the environment): the process group
    (NCCL on GPUs, gloo on CPUs, collectives that give up after ``SKIPNET_DIST_TIMEOUT`` seconds),
    and this rank's device (``cuda:LOCAL_RANK``). A single process gets ``Ranks()`` and ``device``
    as given. More ranks on a node than it has GPUs is refused before any work."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return ranks(), device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
    if cuda:
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"--device {device} was asked for but CUDA is not available here; use --device cpu")
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if local_ranks > count:
            raise ValueError(
                f"torchrun started {local_ranks} ranks on this node but it has {count} GPU(s): "
                f"use --nproc-per-node {count} (or --device cpu)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=float(os.environ.get("SKIPNET_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    here = ranks()
    if not here.main:  # one writer: the other ranks log warnings and errors only
        logging.getLogger().setLevel(logging.WARNING)
    log.info("data-parallel job: %d ranks (%s)", here.world, "nccl" if cuda else "gloo")
    return here, device


def leave() -> None:
    """End a job's data-parallel part: every rank leaves the process group, the ranks other than 0
    end here (exit status 0), and rank 0 goes on alone as a single process (a no-op alone). Under
    :func:`keep_ranks` the group stays: rank 0 goes on alone inside it and the others raise
    :class:`RankIdle`."""
    global _alone
    here = ranks()
    if not here.distributed:
        return
    here.barrier()
    if _keep:
        if not here.main:
            raise RankIdle
        _alone = True
        return
    stop()
    if not here.main:
        end(here)


@contextmanager
def keep_ranks() -> Iterator[None]:
    """Several runs one after the other on one job's ranks (``reproduce.py``): where a run goes on
    on rank 0 alone (:func:`leave`: its evaluation, an agent that trains in one process), the other
    ranks wait for the next run at :func:`join`. That wait is a collective: a run's part on rank 0
    alone must end within ``SKIPNET_DIST_TIMEOUT`` seconds."""
    global _keep
    _keep = True
    try:
        yield
    finally:
        _keep = False


def join() -> None:
    """Under :func:`keep_ranks`, after a run: rank 0, alone since it left, joins the ranks waiting
    for it (a barrier; a no-op for a single process)."""
    global _alone
    _alone = False
    ranks().barrier()


def stop() -> None:
    """Leave the process group :func:`start` joined (a no-op for a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end(here: Ranks, code: int = 0) -> None:
    """End a rank of a data-parallel job whose work is done and written (a no-op for a single
    process): standard output and error flushed, then ``os._exit``. The interpreter's own teardown
    is skipped on purpose: there, on CPUs with gloo, a C++ thread destroyed late aborted about one
    rank in twenty ("terminate called without an active exception"), and torchrun then reports a
    finished job as failed."""
    if not here.distributed:
        return
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


class _SummedOverRanks(torch.autograd.Function):
    """``x`` summed over the ranks; its gradient the ranks' gradients summed (the sum's adjoint)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are the global batch's, on devices where torch's
    ``SyncBatchNorm`` does not run (the CPU, gloo): each rank's per-channel sums, sums of squares
    and count are summed over the ranks by ``all_reduce`` in an autograd function whose backward
    sums the gradients as well, so the forward and backward are those of one BatchNorm over the
    whole batch. (torch's functional ``all_reduce`` does the same, but aborted one process in about
    twenty at exit here.) Running statistics are updated from them (the unbiased variance, as
    BatchNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        local = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        stats = _SummedOverRanks.apply(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), local]))
        count = stats[-1]
        mean = stats[:c] / count
        var = stats[c : 2 * c] / count - mean * mean
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None and self.momentum is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1), self.momentum)
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def _swap_batchnorm(module: nn.Module, to: type[nn.modules.batchnorm._BatchNorm], kinds: tuple[type, ...]) -> int:
    """Replace every submodule of exactly a type in ``kinds`` by a ``to`` holding the same parameters
    and buffers (the optimizer's references stay valid, the state dict's keys the same)."""
    swapped = 0
    for name, child in module.named_children():
        if type(child) in kinds:
            assert isinstance(child, nn.modules.batchnorm._BatchNorm)
            new = to(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
            swapped += 1
        else:
            swapped += _swap_batchnorm(child, to, kinds)
    return swapped


def syncs_batchnorm(here: Ranks, batch: int) -> bool:
    """Whether a job on ``here`` synchronises BatchNorm over global batches of ``batch`` images:
    ``SKIPNET_SYNC_BN`` 1 or 0, or by default (``auto``) where each rank's part is under
    :data:`LOCAL_BN_MIN` images. Per-rank statistics over enough images are what data-parallel
    ImageNet training uses (Goyal et al. 2017 normalise over each worker's 32 images; torchvision's
    reference scripts leave ``--sync-bn`` off): they cost no communication, where synchronised
    ones cost two collectives per BatchNorm layer and step (on two CPU processes with gloo, more
    than the second process gains: BENCHMARKS.md section 15)."""
    if not here.distributed:
        return False
    wanted = os.environ.get("SKIPNET_SYNC_BN", "auto").lower()
    if wanted not in ("auto", "1", "0"):
        raise ValueError(f"SKIPNET_SYNC_BN is auto, 1 or 0, got {wanted!r}")
    return batch < LOCAL_BN_MIN * here.world if wanted == "auto" else wanted == "1"


@contextmanager
def synced_batchnorm(module: nn.Module, device: torch.device, here: Ranks, batch: int) -> Iterator[nn.Module]:
    """``module`` with its ``BatchNorm2d`` layers computing the global batch's statistics while the
    block runs, where :func:`syncs_batchnorm` says so for global batches of ``batch`` (torch's
    ``SyncBatchNorm`` on GPUs, :class:`CPUSyncBatchNorm` elsewhere), plain ``BatchNorm2d`` again after
    it (what the engine folds and checkpoints hold); else ``module`` as it is."""
    if not syncs_batchnorm(here, batch):
        yield module
        return
    log.info("BatchNorm synchronised over the ranks (global batch %d)", batch)
    sync: type[nn.modules.batchnorm._BatchNorm] = nn.SyncBatchNorm if device.type == "cuda" else CPUSyncBatchNorm
    _swap_batchnorm(module, sync, (nn.BatchNorm2d,))
    try:
        yield module
    finally:
        _swap_batchnorm(module, nn.BatchNorm2d, (sync,))
