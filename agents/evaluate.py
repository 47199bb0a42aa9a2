"""One evaluation for every agent: the test images routed by the policy, block by block, on the
environment's own state machine, with hard decisions and real sparse execution."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from agents.policies import RoutingPolicy, ThresholdPolicy
from backbones.base import Backbone
from backbones.batching import batches, evaluation_positions
from backbones.data import Dataset
from backbones.distributed import ranks
from skipnet_env.core import BatchedRouting, RewardConfig


@dataclass
class EvalResult:
    """What a policy achieved on a data set.

    Attributes:
        accuracy: top-1 accuracy of the routed network.
        cross_entropy: mean cross-entropy of its predictions.
        flops_fraction: FLOPs spent per image, gate/policy FLOPs included, over the full backbone's.
        backbone_flops_fraction: the backbone's share of ``flops_fraction``.
        policy_flops_fraction: the gates' (or policy network's) share, counted by the framework.
        blocks_executed: mean number of blocks run per image, always-run blocks included.
        computation_percent: the paper's measure, (executed gated blocks + 1) / (gates + 1) * 100.
        execute_rate: per gated block, the fraction of images that ran it.
        num_images: images evaluated.
        seconds: wall-clock of the evaluation.
        per_image: per test image, in data-set order: ``correct`` ``(n,)`` bool, ``cross_entropy``
            ``(n,)``, ``executed`` ``(n, N)`` bool (gated blocks run), ``label`` ``(n,)``. Not in
            :meth:`as_dict`; saved beside results by the runner for paired comparisons.
    """

    accuracy: float
    cross_entropy: float
    flops_fraction: float
    backbone_flops_fraction: float
    policy_flops_fraction: float
    blocks_executed: float
    computation_percent: float
    execute_rate: list[float] = field(default_factory=list)
    num_images: int = 0
    seconds: float = 0.0
    per_image: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("per_image")
        return out

    @property
    def blocks_per_image(self) -> np.ndarray:
        """Gated blocks run per image ``(n,)``."""
        return self.per_image["executed"].sum(axis=1)


def policy_flops_per_image(policy: RoutingPolicy, core: BatchedRouting, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs one episode of ``policy`` costs per image, counted by running it on one image."""
    obs = core.start(x[:1], y[:1])
    policy.reset(1, x.device)
    with FlopCounterMode(display=False) as counter:
        policy.begin(x[:1])
    total = counter.get_total_flops()
    for k in range(core.num_gates):
        with FlopCounterMode(display=False) as counter:
            execute = policy.act(obs, core.activation, k)
        total += counter.get_total_flops()
        obs, _, _ = core.advance(execute.reshape(1))
    return int(total)


@torch.no_grad()
def evaluate(
    policy: RoutingPolicy,
    backbone: Backbone,
    data: Dataset,
    device: torch.device,
    batch_size: int = 512,
    gate_first_block: bool = False,
    precision: str = "auto",
) -> EvalResult:
    """Route every image of ``data`` with ``policy`` (deterministic decisions) and measure, on the
    frozen execution engine at ``precision``. Under ``torchrun`` (while the job's ranks are together)
    each rank routes its part of every batch and the per-image outcomes are gathered back into
    data-set order: the figures are one process's."""
    t0 = time.perf_counter()
    here = ranks()
    core = BatchedRouting(
        backbone.to(device).eval(), RewardConfig(alpha=0.0), gate_first_block, precision=precision,
        early_exit=policy.early_exit, exit_heads=policy.exit_heads,
    )  # fmt: skip
    correct, cross_entropy, executed, labels = [], [], [], []
    spent = 0.0
    policy_flops = None
    for x, y in batches(data, batch_size, device, train=False, num_workers=2, ranks=here):
        if len(y) == 0:  # a last batch smaller than the number of ranks
            continue
        if policy_flops is None:
            policy_flops = policy_flops_per_image(policy, core, x, y)
        obs = core.start(x, y)
        policy.reset(x.shape[0], device)
        policy.begin(x)
        info: dict = {}
        for k in range(core.num_gates):
            execute = policy.act(obs, core.activation, k).to(device)
            obs, _, info = core.advance(execute, exit=policy.exited if policy.early_exit else None)
        correct.append(info["correct"])
        cross_entropy.append(F.cross_entropy(info["logits"], y, reduction="none"))
        executed.append(info["executed"])
        labels.append(y)
        spent += float(info["flops"].sum())
    per_image = {
        name: torch.cat(parts).cpu().numpy()
        for name, parts in (
            ("correct", correct),
            ("cross_entropy", cross_entropy),
            ("executed", executed),
            ("label", labels),
        )
    }
    if here.distributed:  # every rank's outcomes, back in data-set order
        positions = evaluation_positions(data, batch_size, here).numpy()
        parts = here.gather((positions, per_image, spent, policy_flops))
        order = np.argsort(np.concatenate([p[0] for p in parts]), kind="stable")
        per_image = {name: np.concatenate([p[1][name] for p in parts])[order] for name in per_image}
        spent = sum(p[2] for p in parts)
        policy_flops = next(p[3] for p in parts if p[3] is not None)
    n = len(per_image["label"])
    rate = per_image["executed"].mean(axis=0, dtype=np.float64).tolist()
    backbone_frac = spent / n / core.full_flops
    policy_frac = (policy_flops or 0) / core.full_flops
    gated_run = sum(rate)
    return EvalResult(
        accuracy=float(per_image["correct"].mean()),
        cross_entropy=float(per_image["cross_entropy"].mean(dtype=np.float64)),
        flops_fraction=backbone_frac + policy_frac,
        backbone_flops_fraction=backbone_frac,
        policy_flops_fraction=policy_frac,
        blocks_executed=core.first_gated + gated_run,
        computation_percent=100.0 * (gated_run + 1) / (core.num_gates + 1),
        execute_rate=rate,
        num_images=n,
        seconds=time.perf_counter() - t0,
        per_image=per_image,
    )


# how close to a budget a calibrated threshold lands (a FLOPs fraction), and the most evaluations it may take (5-8
# on trained gates and the embedded validation images; more where the FLOPs jump at a threshold, as untrained gates')
CALIBRATION_TOLERANCE = 0.005
CALIBRATION_STEPS = 24


def calibrate_threshold(
    policy: ThresholdPolicy,
    backbone: Backbone,
    data: Dataset,
    budget: float,
    device: torch.device,
    batch_size: int = 512,
    precision: str = "auto",
    start: EvalResult | None = None,
) -> tuple[float, EvalResult]:
    """The gates' threshold (a logit) at which ``policy`` spends ``budget`` of the FLOPs on ``data``
    (validation images), within :data:`CALIBRATION_TOLERANCE`, and the evaluation there. ``start``:
    the evaluation at ``policy.threshold`` on ``data``, where the caller made it already.

    Gates trained for a budget spend it on their training images; on other images they land a few
    points off (on the embedded set 47.7-53.0% for 0.5). A higher threshold executes fewer blocks, so
    the FLOPs fall as it rises, and a root search over it (:class:`ThresholdSearch`: at most
    :data:`CALIBRATION_STEPS` evaluations, starting at the trained threshold, kept when it is within
    the tolerance) meets the budget. Where the budget is out of the gates' reach, the closest end is
    returned. ``policy.threshold`` is left at the result."""
    search = ThresholdSearch(budget)
    tried: list[tuple[float, EvalResult]] = []
    t = policy.threshold
    for _ in range(CALIBRATION_STEPS):
        policy.threshold = t
        result = (
            start
            if start is not None and not tried
            else evaluate(policy, backbone, data, device, batch_size, precision=precision)
        )
        tried.append((t, result))
        if abs(result.flops_fraction - budget) <= CALIBRATION_TOLERANCE:
            break
        t = search.next(t, result.flops_fraction)
    best_t, best = min(tried, key=lambda tr: abs(tr[1].flops_fraction - budget))  # the first of equals
    policy.threshold = best_t
    return best_t, best


class ThresholdSearch:
    """Where to evaluate the threshold next, for FLOPs that fall as it rises, to meet ``budget``:
    outward in doubling steps (1, 2, 4, ... logits) from the start until the budget is bracketed,
    then the Illinois method (regula falsi whose end kept twice in a row counts half) inside the
    bracket, with a bisection wherever the last step did not halve the bracket (gates whose FLOPs
    jump at a threshold: the interpolation alone crawls there); within the logits [-12, 12] (every
    gate executes / skips: p = 6e-6 .. 1 - 6e-6)."""

    LIMIT = 12.0

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.above: tuple[float, float] | None = None  # (threshold, FLOPs - budget > 0): spends too much
        self.below: tuple[float, float] | None = None  # (threshold, FLOPs - budget < 0)
        self.step, self.kept, self.width = 1.0, "", math.inf

    def next(self, t: float, flops: float) -> float:
        gap = flops - self.budget
        side = "above" if gap > 0 else "below"
        other = "below" if side == "above" else "above"
        end = getattr(self, other)
        if self.kept == side and end is not None:  # the other end was kept again: halve its weight (Illinois)
            setattr(self, other, (end[0], end[1] / 2))
        setattr(self, side, (t, gap))
        self.kept = side
        if self.above is None or self.below is None:  # not yet bracketed: step outward, doubling
            t = t + self.step if gap > 0 else t - self.step
            self.step *= 2
            return min(max(t, -self.LIMIT), self.LIMIT)
        (ta, ga), (tb, gb) = self.above, self.below
        width, halved = abs(tb - ta), abs(tb - ta) <= self.width / 2
        self.width = width
        return (ta * gb - tb * ga) / (gb - ga) if halved else (ta + tb) / 2
