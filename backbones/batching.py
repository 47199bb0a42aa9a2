"""Batches of a data set on the device: shuffled and augmented (random shifts, flips) for training,
in order for evaluation; in-memory sets are indexed on the device, image folders stream through a
``DataLoader``."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from backbones.data import Dataset, FolderImages, ImageTensors
from backbones.distributed import Ranks


def loader_workers(requested: int) -> int:
    """``requested`` data-loader workers, at most the cores this process may use (more only
    contend, and torch warns)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(requested, cores))


def data_loader(
    data: FolderImages,
    batch_size: int,
    device: torch.device,
    *,
    shuffle: bool,
    drop_last: bool = False,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
    ranks: Ranks | None = None,
) -> torch.utils.data.DataLoader:
    """The ``DataLoader`` an image folder streams through (workers capped at the cores). On
    ``ranks`` (data-parallel), this rank's share: a ``DistributedSampler`` for training (its
    shuffle seeded from ``generator``, the same on every rank), every ``world``-th image for
    evaluation (no image twice); ``batch_size`` is then the global batch, split evenly."""
    dataset: torch.utils.data.Dataset = data.dataset
    sampler: torch.utils.data.Sampler | None = None
    if ranks is not None and ranks.distributed:
        if batch_size % ranks.world:
            raise ValueError(f"a batch of {batch_size} images does not split over {ranks.world} ranks: give a multiple")
        batch_size //= ranks.world
        if shuffle:
            seed = int(torch.randint(2**62, (1,), generator=generator))
            sampler = torch.utils.data.DistributedSampler(dataset, ranks.world, ranks.rank, shuffle=True, seed=seed)
            shuffle = False
        else:
            dataset = torch.utils.data.Subset(dataset, range(ranks.rank, len(data), ranks.world))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=loader_workers(num_workers),
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        generator=generator,
    )


def global_batch_sizes(data: Dataset, batch_size: int, ranks: Ranks | None = None) -> list[int]:
    """The number of images in each global batch of one epoch of :func:`batches` (training order):
    on ``ranks``, the sum of the ranks' parts, known to every rank without a collective. A
    streamed folder's ``DistributedSampler`` pads the epoch to a multiple of ``world`` (every rank
    the same count); an in-memory set's last batch is split as it falls."""
    n = len(data)
    if ranks is not None and ranks.distributed and not isinstance(data, ImageTensors):
        n = -(-n // ranks.world) * ranks.world
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


def evaluation_positions(data: Dataset, batch_size: int, ranks: Ranks) -> Tensor:
    """Where in ``data`` the images :func:`batches` gives this rank in evaluation (``train=False``)
    come from, in the order it gives them: each global batch's part (in-memory sets), every
    ``world``-th image (streamed folders). What puts the ranks' per-image outcomes back in order."""
    n = len(data)
    if not ranks.distributed:
        return torch.arange(n)
    if not isinstance(data, ImageTensors):
        return torch.arange(ranks.rank, n, ranks.world)
    return torch.cat([ranks.part(torch.arange(s, min(s + batch_size, n))) for s in range(0, n, batch_size)])


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image ``(B, C, H, W)`` by its own random offset in ``[-max_shift, max_shift]``,
    zero-filled: the pad-and-crop augmentation, batched, with no loop over images."""
    if max_shift <= 0:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)  # (B, C, H + 2s, W + 2s)
    off = torch.randint(0, 2 * max_shift + 1, (2, b), device=images.device, generator=generator)
    rows = off[0, :, None] + torch.arange(h, device=images.device)  # (B, H)
    cols = off[1, :, None] + torch.arange(w, device=images.device)  # (B, W)
    bi = torch.arange(b, device=images.device)[:, None, None, None]
    ci = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def batches(
    data: Dataset,
    batch_size: int,
    device: torch.device,
    *,
    train: bool,
    shift: int = 0,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
    ranks: Ranks | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Normalised image batches ``(B, C, H, W)`` and labels ``(B,)`` on ``device``; shuffled and
    augmented when ``train``. On ``ranks`` (data-parallel), this rank's part of each batch: the
    ranks draw the same order (``generator``) and each takes its slice of every global batch."""
    if isinstance(data, ImageTensors):
        data = data.to(device)
        n = len(data)
        order = (
            torch.randperm(n, device="cpu", generator=generator).to(device) if train else torch.arange(n, device=device)
        )
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if ranks is not None:
                idx = ranks.part(idx)
            x = data.images[idx]
            if train:
                x = random_shift(x, shift)
                if data.flip:
                    flip = torch.rand(x.shape[0], device=device) < 0.5
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            yield data.normalize(x), data.labels[idx]
    else:
        loader = data_loader(
            data, batch_size, device, shuffle=train, num_workers=num_workers, generator=generator, ranks=ranks
        )
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
