"""The price of compute in a loss: a fixed ``alpha``, or a Lagrange multiplier that meets a budget.

``alpha`` lands at different compute on different data (alpha 1: 60% of the FLOPs on the embedded
set, 36% on natural images), so a user cannot ask for "half the compute" with it. With a budget,
training solves ``min loss s.t. FLOPs fraction = budget``: the price rises while the gates spend
more than the budget and falls while they spend less, so the training itself finds the alpha that
spends the budget (:class:`ComputePrice`).

The price lives on the device and is updated from device tensors: no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from agents.fixed import check_budget
from agents.gates import GatePolicy
from backbones.base import Backbone
from backbones.distributed import Ranks

# a budget's price: the dual-ascent step per SP step and the proportional gain (a gap of 0.05 between
# spending and budget moves the multiplier by about 1 an epoch of 94 steps and the price at once by 0.1;
# alpha's useful range is 0.5-4)
BUDGET_STEP = 0.2
BUDGET_GAIN = 2.0
# the step per HRL iteration: HRL's gentle steps move the spending slowly, a fast multiplier would wind up
BUDGET_STEP_HRL = 0.02


def execute_cost(backbone: Backbone, first_gated: int) -> Tensor:
    """``(N,)``: what executing gated block ``k`` rather than skipping it costs, as a share of the
    full network's FLOPs (the block's FLOPs minus its shortcut's)."""
    f = backbone.flops
    executed = torch.tensor(f.block_executed[first_gated:], dtype=torch.float32)
    skipped = torch.tensor(f.block_skipped[first_gated:], dtype=torch.float32)
    return (executed - skipped) / f.full


class ComputePrice:
    """The weight of compute: ``alpha``, or with ``budget`` a multiplier that meets it.

    Without a budget the compute term of a loss is ``alpha x added`` (``added``: the FLOPs fraction
    the executed gated blocks add). With one, the constraint is an equality, ``spent = budget`` (a
    user who asks for half the compute wants half, not less at lower accuracy), met by a
    proportional-integral price: the term is ``(lambda + gain x (spent - budget)) x added``, where
    ``spent`` is what the gates would spend at evaluation (greedy decisions) on this batch, and
    ``lambda`` (starting at ``alpha``) takes a dual-ascent step ``step x (spent - budget)`` per update.
    The proportional part pulls the spending back at once, from either side (even from gates that
    all skip, where a multiplier clamped at 0 had no pull left); the integral part (the Lagrange
    multiplier) removes the offset it would leave. The price may go below 0: then compute is
    rewarded, up to the budget.

    Args:
        alpha: the fixed weight, or the multiplier's starting value.
        budget: the target FLOPs fraction (``None``: the weight stays ``alpha``).
        step: dual-ascent step size.
        device: where the multiplier lives.
        gain: the proportional gain.
        ranks: on several ranks (data-parallel), the spending is the global batch's mean, so that
            every rank holds the same price.
    """

    def __init__(
        self,
        alpha: float,
        budget: float | None,
        device: torch.device,
        step: float = BUDGET_STEP,
        gain: float = BUDGET_GAIN,
        ranks: Ranks | None = None,
    ) -> None:
        if budget is not None:
            check_budget(budget)
        self.budget, self.step, self.gain = budget, step, gain
        self.mean = (ranks or Ranks()).mean
        self.value = torch.tensor(float(alpha), device=device)  # () float32: the multiplier

    def weight(self, spent: Tensor) -> Tensor:
        """The price of compute ``()`` for a batch whose greedy decisions spend ``spent`` ``(B,)``."""
        if self.budget is None:
            return self.value
        return self.value + self.gain * (self.mean(spent.detach().float()) - self.budget)

    def warmup(self, epoch: int, epochs: int) -> float:
        """The scale of a fixed ``alpha`` in ``epoch`` (from 0) of a linear warm-up over ``epochs``
        epochs (0: none). A budget's multiplier needs no ramp: it rises from alpha as far as the
        spending asks."""
        return min(1.0, (epoch + 1) / epochs) if epochs > 0 and self.budget is None else 1.0

    def loss(self, added: Tensor, spent: Tensor, ramp: float = 1.0) -> Tensor:
        """The compute term for ``added`` ``(B,)`` (differentiable: the FLOPs fraction the executed
        gated blocks add) when the greedy decisions spend ``spent`` ``(B,)``; ``ramp`` scales a fixed
        alpha (warm-up)."""
        return ramp * self.weight(spent) * added.mean()

    def update(self, spent: Tensor, step: float | None = None) -> None:
        """One dual-ascent step (of ``step``, default the price's) from the FLOPs fractions ``spent``
        (any shape) of the last batch."""
        if self.budget is not None:
            step = self.step if step is None else step
            self.value = self.value + step * (self.mean(spent.detach().float()) - self.budget)

    def state_dict(self) -> dict[str, Tensor]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.value = state["value"].to(self.value.device)


class SpendingMeter:
    """A batch's FLOPs fraction from its gate decisions, gate FLOPs included, as the evaluation counts.

    ``spent(executed)`` for ``executed`` ``(B, N)`` (1.0 where gated block ``k`` runs) is
    ``floor + executed @ cost``: ``floor`` is what every image spends whatever the gates decide (the
    stem, the always-run blocks, the shortcuts, the head and the gates themselves), ``cost`` ``(N,)``
    what running each gated block adds.
    """

    def __init__(self, backbone: Backbone, gates: GatePolicy, device: torch.device) -> None:
        self.cost = execute_cost(backbone, gates.first_gated).to(device)  # (N,)
        self.floor = 1.0 - float(self.cost.sum()) + sum(gates.flops) / backbone.flops.full

    def spent(self, executed: Tensor) -> Tensor:
        """``(B,)`` FLOPs fractions."""
        return self.floor + executed.detach().to(self.cost.dtype) @ self.cost
