"""Data-independent baselines: ``full``, ``random`` at a rate, and the best ``static`` subset of
blocks at a FLOPs budget. A learned policy has to beat these at the same compute."""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from agents.evaluate import evaluate
from agents.policies import StaticPolicy
from backbones.base import Backbone
from backbones.data import Dataset

log = logging.getLogger(__name__)


def static_flops_fraction(backbone: Backbone, mask: list[bool], first_gated: int = 1) -> float:
    """FLOPs of the network with gated block ``k`` run where ``mask[k]``, over the full network's."""
    executed = torch.tensor([[True] * first_gated + list(mask)])
    return float(backbone.flops.spent(executed)[0] / backbone.flops.full)


def search_static(
    backbone: Backbone,
    data: Dataset,
    budget: float,
    device: torch.device,
    first_gated: int = 1,
    progress: bool = True,
) -> StaticPolicy:
    """Greedy backward elimination: starting from every block, drop the block whose removal raises
    the cross-entropy on ``data`` least (finer-grained than accuracy on a small set) until the
    network spends at most ``budget`` of the full network's FLOPs. Exhaustive search over 2^N
    subsets is out of reach; greedy elimination is the usual stand-in. Run it on the data the
    learned agents train on (the training split), so that both see the same images."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be a fraction of the full network's FLOPs in (0, 1], got {budget}")
    n = backbone.num_blocks - first_gated
    mask = [True] * n
    gate_first = first_gated == 0
    bar = tqdm(desc=f"static search to {budget:.0%} FLOPs", disable=not progress, leave=False)
    while static_flops_fraction(backbone, mask, first_gated) > budget:
        best = None
        for k in (i for i in range(n) if mask[i]):
            trial = mask.copy()
            trial[k] = False
            ce = evaluate(StaticPolicy(trial), backbone, data, device, gate_first_block=gate_first).cross_entropy
            key = (-ce, -static_flops_fraction(backbone, trial, first_gated))
            if best is None or key > best[0]:
                best = (key, trial)
            bar.update(1)
        if best is None:
            break
        mask = best[1]
        log.info("static: dropped to %s (cross-entropy %.4f)", mask, -best[0][0])
    bar.close()
    return StaticPolicy(mask)


def random_rate_for_budget(backbone: Backbone, budget: float, first_gated: int = 1) -> float:
    """The execute rate at which the random policy spends ``budget`` of the FLOPs on average."""
    f = backbone.flops
    fixed = f.stem + f.head + sum(f.block_executed[:first_gated])
    ex = sum(f.block_executed[first_gated:])
    sk = sum(f.block_skipped[first_gated:])
    rate = (budget * f.full - fixed - sk) / (ex - sk)
    return min(max(rate, 0.0), 1.0)
