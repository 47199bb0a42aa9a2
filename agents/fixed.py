"""Data-independent baselines: ``full``, ``random`` at a rate, and the best ``static`` subset of
blocks at a FLOPs budget. A learned policy has to beat these at the same compute."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from agents.policies import StaticPolicy
from backbones.base import Backbone
from backbones.data import Dataset
from backbones.train import batches

log = logging.getLogger(__name__)


def static_flops_fraction(backbone: Backbone, mask: list[bool], first_gated: int = 1) -> float:
    """FLOPs of the network with gated block ``k`` run where ``mask[k]``, over the full network's."""
    executed = torch.tensor([[True] * first_gated + list(mask)])
    return float(backbone.flops.spent(executed)[0] / backbone.flops.full)


@torch.no_grad()
def elimination_path(
    backbone: Backbone,
    data: Dataset,
    device: torch.device,
    min_budget: float = 0.0,
    first_gated: int = 1,
    max_images: int = 2000,
    batch_size: int = 500,
    progress: bool = True,
) -> list[tuple[float, list[bool]]]:
    """Greedy backward elimination: starting from every block, drop the block whose removal raises
    the cross-entropy on ``data`` least (finer-grained than accuracy), again and again, until the
    network spends at most ``min_budget`` of the full network's FLOPs.

    Exhaustive search over 2^N subsets is out of reach; greedy elimination is the usual stand-in.
    Every budget's subset lies on the one path, so a sweep over budgets pays for one search. Costs
    about N^2 / 2 forwards of the gated blocks over at most ``max_images`` images (the first ones of
    ``data``; run it on the split the learned agents train on); the stem and the always-run blocks
    are computed once.

    Returns:
        ``[(flops_fraction, mask), ...]`` from the full network down, FLOPs strictly decreasing.
    """
    backbone = backbone.to(device).eval()
    starts, labels = [], []  # the activation entering the first gated block, per batch
    for x, y in batches(data, batch_size, device, train=False):
        h = backbone.stem(x)
        for block in backbone.blocks[:first_gated]:
            h = block(h)
        starts.append(h)
        labels.append(y)
        if sum(len(t) for t in labels) >= max_images:
            break
    gated = backbone.blocks[first_gated:]

    def cross_entropy(mask: list[bool]) -> float:
        total, n = 0.0, 0
        for h, y in zip(starts, labels):
            for block, run in zip(gated, mask):
                h = block(h) if run else block.shortcut(h)
            total += float(F.cross_entropy(backbone.head(h), y, reduction="sum"))
            n += len(y)
        return total / n

    mask = [True] * len(gated)
    path = [(static_flops_fraction(backbone, mask, first_gated), mask)]
    bar = tqdm(desc="static elimination path", disable=not progress, leave=False)
    while any(mask) and path[-1][0] > min_budget:
        trials = []
        for k in (i for i in range(len(mask)) if mask[i]):
            trial = mask.copy()
            trial[k] = False
            # lowest cross-entropy first; among equals, the cheaper subset
            trials.append((cross_entropy(trial), static_flops_fraction(backbone, trial, first_gated), trial))
            bar.update(1)
        ce, flops, mask = min(trials, key=lambda t: (t[0], t[1]))
        path.append((flops, mask))
        log.info("static: %.3f of the FLOPs, cross-entropy %.4f: %s", flops, ce, mask)
    bar.close()
    return path


def static_for_budget(
    path: list[tuple[float, list[bool]]], budget: float, mix: bool = False, seed: int = 0
) -> StaticPolicy:
    """The first (most complete) subset on an :func:`elimination_path` within ``budget``; with
    ``mix``, mixed with the next larger subset on the path on a random share of the images, so
    that the policy spends ``budget`` exactly on average."""
    check_budget(budget)
    for i, (flops, mask) in enumerate(path):
        if flops <= budget:
            if not mix or i == 0 or flops == budget:
                return StaticPolicy(mask)
            more_flops, more = path[i - 1]
            return StaticPolicy(mask, more, (budget - flops) / (more_flops - flops), seed)
    raise ValueError(f"no subset on the path spends at most {budget} of the FLOPs (cheapest: {path[-1][0]:.3f})")


def search_static(
    backbone: Backbone,
    data: Dataset,
    budget: float,
    device: torch.device,
    first_gated: int = 1,
    max_images: int = 2000,
    progress: bool = True,
) -> StaticPolicy:
    """The best fixed subset of blocks within ``budget`` of the FLOPs found by greedy elimination
    (:func:`elimination_path`)."""
    check_budget(budget)
    path = elimination_path(backbone, data, device, budget, first_gated, max_images, progress=progress)
    return static_for_budget(path, budget)


def check_budget(budget: float) -> None:
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be a fraction of the full network's FLOPs in (0, 1], got {budget}")


def random_rate_for_budget(backbone: Backbone, budget: float, first_gated: int = 1) -> float:
    """The execute rate at which the random policy spends ``budget`` of the FLOPs on average."""
    f = backbone.flops
    fixed = f.stem + f.head + sum(f.block_executed[:first_gated])
    ex = sum(f.block_executed[first_gated:])
    sk = sum(f.block_skipped[first_gated:])
    rate = (budget * f.full - fixed - sk) / (ex - sk)
    return min(max(rate, 0.0), 1.0)


def cached_elimination_path(
    backbone: Backbone,
    data: Dataset,
    device: torch.device,
    metadata: dict,
    progress: bool = True,
    max_images: int = 2000,
) -> list[tuple[float, list[bool]]]:
    """:func:`elimination_path` down to no gated block, cached per backbone weights and data set
    (``$SKIPNET_CACHE/static``), so that a sweep over budgets searches once."""
    from backbones.cache import cache_dir
    from backbones.checkpoint import atomic_save, safe_load

    key = f"{metadata['backbone']}-{metadata['dataset']}-{metadata['backbone_fingerprint']}-{max_images}"
    path_file = cache_dir() / "static" / f"{key}.pt"
    if path_file.is_file():
        state = safe_load(path_file)
        return [(float(f), m.tolist()) for f, m in zip(state["flops"], state["masks"])]
    path = elimination_path(backbone, data, device, 0.0, max_images=max_images, progress=progress)
    atomic_save({"flops": torch.tensor([f for f, _ in path]), "masks": torch.tensor([m for _, m in path])}, path_file)
    return path
