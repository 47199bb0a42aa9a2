"""The price of compute in a loss: a fixed ``alpha``, or a Lagrange multiplier that meets a budget.

``alpha`` lands at different compute on different data (alpha 1: 60% of the FLOPs on the embedded
set, 36% on natural images), so a user cannot ask for "half the compute" with it. With a budget,
training solves ``min loss s.t. FLOPs fraction <= budget`` by dual ascent: the price rises while
the gates spend more than the budget and falls (never below 0) while they spend less, so the
training itself finds the alpha that spends the budget.

The price lives on the device and is updated from device tensors: no host sync.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from agents.gates import GatePolicy
from backbones.base import Backbone


def execute_cost(backbone: Backbone, first_gated: int) -> Tensor:
    """``(N,)``: what executing gated block ``k`` rather than skipping it costs, as a share of the
    full network's FLOPs (the block's FLOPs minus its shortcut's)."""
    f = backbone.flops
    executed = torch.tensor(f.block_executed[first_gated:], dtype=torch.float32)
    skipped = torch.tensor(f.block_skipped[first_gated:], dtype=torch.float32)
    return (executed - skipped) / f.full


def check_budget(budget: float | None) -> None:
    if budget is not None and not (math.isfinite(budget) and 0.0 < budget <= 1.0):
        raise ValueError(f"budget must be a fraction of the full network's FLOPs in (0, 1], got {budget}")


class ComputePrice:
    """The weight of compute: ``alpha``, or with ``budget`` a multiplier starting at ``alpha``.

    Args:
        alpha: the fixed weight, or the multiplier's starting value.
        budget: the target FLOPs fraction (``None``: the weight stays ``alpha``).
        step: dual-ascent step: the price moves by ``step x (spent - budget)`` per update.
        device: where the price lives.
    """

    def __init__(self, alpha: float, budget: float | None, step: float, device: torch.device) -> None:
        check_budget(budget)
        self.budget, self.step = budget, step
        self.value = torch.tensor(float(alpha), device=device)  # () float32

    def update(self, spent: Tensor) -> None:
        """One dual-ascent step from the FLOPs fractions ``spent`` (any shape) of the last batch."""
        if self.budget is not None:
            gap = spent.detach().float().mean() - self.budget
            self.value = (self.value + self.step * gap).clamp_min(0.0)

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
