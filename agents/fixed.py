"""Data-independent baselines: ``full``, ``random`` at a rate, and the best ``static`` subset of
blocks at a FLOPs budget. A learned policy has to beat these at the same compute."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from agents.policies import RandomPolicy, RoutingPolicy, StaticPolicy
from agents.registry import AgentContext, AgentSpec, register_agent
from backbones.base import FIRST_GATED, Backbone, skip
from backbones.batching import batches
from backbones.checkpoint import atomic_save
from backbones.data import Dataset
from backbones.device import resolve_precision
from backbones.options import UNIT, check_options, option
from backbones.progress import progress_bar
from skipnet_env.engine import freeze

log = logging.getLogger(__name__)

FIXED_POLICY_BUDGET = 0.6
"""what static and random spend when no budget is given"""


@dataclass
class FixedConfig:
    """The data-independent baselines (random, static), at the run's --budget."""

    flag_prefix: ClassVar[str] = "fixed_"

    rate: float | None = option(None, UNIT, was=("rate",))
    """random: execute probability of each gated block (default: the rate that spends --budget)"""
    static_mix: bool = option(True, was=("static_mix",))
    """static: spend --budget exactly on average, running the next larger subset on a random share of images"""

    def __post_init__(self) -> None:
        check_options(self)


def static_flops_fraction(backbone: Backbone, mask: list[bool], first_gated: int = FIRST_GATED) -> float:
    """FLOPs of the network with gated block ``k`` run where ``mask[k]``, over the full network's."""
    executed = torch.tensor([[True] * first_gated + list(mask)])
    return float(backbone.flops.spent(executed)[0] / backbone.flops.full)


def default_search_images(device: torch.device) -> int:
    """Images the static search scores subsets on: 5,000 on a GPU, 2,000 on a CPU."""
    return 5000 if device.type == "cuda" else 2000


@torch.no_grad()
def elimination_path(
    backbone: Backbone,
    data: Dataset,
    device: torch.device,
    min_budget: float = 0.0,
    first_gated: int = FIRST_GATED,
    max_images: int | None = None,
    batch_size: int = 500,
    progress: bool = True,
    rerank: float = 0.25,
    precision: str = "auto",
) -> list[tuple[float, list[bool]]]:
    """Backward elimination: starting from every block, drop the blocks whose removal raises the
    cross-entropy on ``data`` least (finer-grained than accuracy), until the network spends at
    most ``min_budget`` of the full network's FLOPs.

    Exhaustive search over 2^N subsets is out of reach, and exact greedy elimination (score every
    remaining block, drop the best, again) costs O(N^3) block forwards. Here each round scores
    the removal of every remaining block from the current subset, then drops the ``rerank`` share
    of them that scored best, one by one (each drop a point on the path), before scoring again.
    The activation entering each block is kept from the round's forward, so scoring block ``k``
    runs only the blocks after it: a round over ``A`` remaining blocks costs about ``A^2 / 2``
    block forwards, and the rounds together about ``1.1 N`` passes of the network (O(N)), over at
    most ``max_images`` images (default :func:`default_search_images`; the first ones of ``data``,
    run it on the split the learned agents train on), on the frozen execution engine.

    Returns:
        ``[(flops_fraction, mask), ...]`` from the full network down, FLOPs strictly decreasing;
        every budget's subset lies on the one path, so a sweep over budgets pays for one search.
    """
    if not 0.0 < rerank <= 1.0:
        raise ValueError(f"rerank must be a share of the remaining blocks in (0, 1], got {rerank}")
    max_images = default_search_images(device) if max_images is None else max_images
    net = freeze(backbone.to(device).eval(), device, precision)
    starts: list[Tensor] = []  # the activation entering the first gated block, per batch
    labels: list[Tensor] = []
    for x, y in batches(data, batch_size, device, train=False):
        room = max_images - sum(len(t) for t in labels)
        x, y = x[:room], y[:room]
        starts.append(net.enter(x, first_gated))
        labels.append(y)
        if sum(len(t) for t in labels) >= max_images:
            break
    num_images = sum(len(t) for t in labels)
    gated = net.blocks[first_gated:]

    def run_from(h: Tensor, mask: list[bool], start: int) -> Tensor:
        for block, run in zip(gated[start:], mask[start:]):
            h = block(h) if run else skip(block, h)
        return h

    def removal_scores(mask: list[bool]) -> dict[int, float]:
        """Mean cross-entropy with each remaining block removed from ``mask``."""
        active = [k for k, run in enumerate(mask) if run]
        totals = torch.zeros(len(active), dtype=torch.float64, device=device)
        for h, y in zip(starts, labels):
            entering = {}  # the activation entering each remaining block under ``mask``
            for k, (block, run) in enumerate(zip(gated, mask)):
                if run:
                    entering[k] = h
                h = block(h) if run else skip(block, h)
            for i, k in enumerate(active):
                out = run_from(skip(gated[k], entering[k]), mask, k + 1)
                totals[i] += F.cross_entropy(net.head(out).float(), y, reduction="sum").double()
        return dict(zip(active, (totals / num_images).tolist()))  # one host sync per round

    def flops_without(mask: list[bool], k: int) -> float:
        return static_flops_fraction(backbone, [run and j != k for j, run in enumerate(mask)], first_gated)

    mask = [True] * len(gated)
    path = [(static_flops_fraction(backbone, mask, first_gated), mask)]
    bar = progress_bar(len(gated), "static elimination path (blocks dropped)", progress)
    while any(mask) and path[-1][0] > min_budget:
        scores = removal_scores(mask)

        ranked = sorted(scores, key=lambda k: (scores[k], flops_without(mask, k)))  # among equals, the cheaper
        for k in ranked[: max(1, math.ceil(rerank * len(ranked)))]:
            mask = mask.copy()
            mask[k] = False
            path.append((static_flops_fraction(backbone, mask, first_gated), mask))
            bar.update(1)
            log.info("static: %.3f of the FLOPs, block %d dropped (scored %.4f): %s", path[-1][0], k, scores[k], mask)
            if path[-1][0] <= min_budget:
                break
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
    first_gated: int = FIRST_GATED,
    max_images: int | None = None,
    progress: bool = True,
    precision: str = "auto",
) -> StaticPolicy:
    """The best fixed subset of blocks within ``budget`` of the FLOPs found by backward
    elimination (:func:`elimination_path`)."""
    check_budget(budget)
    path = elimination_path(
        backbone, data, device, budget, first_gated, max_images, progress=progress, precision=precision
    )
    return static_for_budget(path, budget)


def check_budget(budget: float) -> None:
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be a fraction of the full network's FLOPs in (0, 1], got {budget}")


def random_rate_for_budget(backbone: Backbone, budget: float, first_gated: int = FIRST_GATED) -> float:
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
    max_images: int | None = None,
    precision: str = "auto",
) -> list[tuple[float, list[bool]]]:
    """:func:`elimination_path` down to no gated block, cached per backbone weights, data set and
    search settings (``$SKIPNET_CACHE/static``), so that a sweep over budgets searches once."""
    from backbones.cache import cache_dir
    from backbones.checkpoint import atomic_save, safe_load

    max_images = default_search_images(device) if max_images is None else max_images
    dtype = str(resolve_precision(precision, device)).removeprefix("torch.")
    key = f"{metadata['backbone']}-{metadata['dataset']}-{metadata['backbone_fingerprint']}-{data.fingerprint}-"
    key += f"{max_images}-{dtype}-r0.25"
    path_file = cache_dir() / "static" / f"{key}.pt"
    if path_file.is_file():
        state = safe_load(path_file)
        return [(float(f), m.tolist()) for f, m in zip(state["flops"], state["masks"])]
    path = elimination_path(backbone, data, device, 0.0, max_images=max_images, progress=progress, precision=precision)
    atomic_save({"flops": torch.tensor([f for f, _ in path]), "masks": torch.tensor([m for _, m in path])}, path_file)
    return path


# -- the agents: full, random, static ---------------------------------------------------------------------


def _fixed_save(ctx: AgentContext, **payload: Any) -> None:
    atomic_save({"metadata": {**ctx.metadata, "stage": "done"}, **payload}, ctx.checkpoint)


def _train_full(ctx: AgentContext, state: dict | None) -> RoutingPolicy:
    _fixed_save(ctx)
    return RoutingPolicy()


def _budget(ctx: AgentContext) -> float:
    return FIXED_POLICY_BUDGET if ctx.cfg.budget is None else ctx.cfg.budget


def _random_rate(ctx: AgentContext) -> float:
    """``--fixed-rate``, or the rate at which random skipping spends ``--budget`` of the FLOPs."""
    if ctx.options.rate is not None:
        return ctx.options.rate
    return random_rate_for_budget(ctx.backbone, _budget(ctx))


def _train_random(ctx: AgentContext, state: dict | None) -> RoutingPolicy:
    rate = _random_rate(ctx)
    _fixed_save(ctx, rate=rate)
    return RandomPolicy(rate, ctx.cfg.seed)


def _train_static(ctx: AgentContext, state: dict | None) -> RoutingPolicy:
    path = cached_elimination_path(
        ctx.backbone, ctx.train_data, ctx.device, ctx.metadata, ctx.cfg.progress, precision=ctx.cfg.precision
    )
    policy = static_for_budget(path, _budget(ctx), ctx.options.static_mix, ctx.cfg.seed)
    more = {} if policy.mask_more is None else {"mask_more": torch.tensor(policy.mask_more)}
    _fixed_save(ctx, mask=torch.tensor(policy.mask), share_more=policy.share_more, **more)
    return policy


def _load_static(ctx: AgentContext, state: dict) -> RoutingPolicy:
    more = state["mask_more"].tolist() if "mask_more" in state else None
    return StaticPolicy(state["mask"].tolist(), more, float(state.get("share_more", 0.0)), ctx.cfg.seed)


register_agent("full", AgentSpec(_train_full, lambda ctx, s: RoutingPolicy(), role="reference", seeded=False))
register_agent(
    "random",
    AgentSpec(
        _train_random, lambda ctx, s: RandomPolicy(float(s["rate"]), ctx.cfg.seed), role="matched",
        takes_budget=True, options=FixedConfig, part="fixed", smoke=("--fixed-rate", "0.5"),
    ),
)  # fmt: skip
register_agent(
    "static",
    AgentSpec(
        _train_static, _load_static, role="matched", takes_budget=True, options=FixedConfig, part="fixed",
        smoke=("--budget", "0.7"),
    ),
)  # fmt: skip
