"""Routing policies: what every agent exposes for evaluation on the same ground.

A policy sees, at each gated block ``k``, the environment's observation ``(B, D)`` and the
activation entering the block ``(B, C, H, W)`` (both device tensors) and returns the execute
mask ``(B,)`` bool. ``reset(B)`` starts new episodes (recurrent policies clear their state);
``begin(images)`` shows the images first (one-shot policies decide from them).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from agents.gates import GatePolicy
from backbones.exits import ExitHeads


class SeededDraws:
    """One ``torch.Generator`` per device, seeded with ``seed``: a policy's random draws are the
    same on every run, on whichever device it evaluates."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def rand(self, n: int, device: torch.device) -> Tensor:
        """``(n,)`` uniform draws in [0, 1) on ``device``."""
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return torch.rand(n, device=device, generator=g)


class RoutingPolicy:
    """Interface (and the ``full`` policy: execute everything).

    A policy with a ``threshold`` (a log-odds of *execute*) can be calibrated to a budget on
    validation images (:func:`agents.evaluate.calibrate_threshold`); ``calibrate_to`` names the
    FLOPs fraction a run calibrates it to where the agent asks for it (``None``: the run decides).
    A policy that decides in the environment with ``early_exit`` (its observations carry the exited
    flag) says so in ``early_exit`` and marks the episodes it stopped in ``exited`` ``(B,)``."""

    name = "full"
    calibrate_to: float | None = None
    early_exit = False
    exited: Tensor
    exit_heads: ExitHeads | None = None  # where its exited episodes are classified, if not by the head

    def reset(self, batch_size: int, device: torch.device) -> None:
        """Start ``batch_size`` new episodes (stateless policies need nothing)."""

    def begin(self, images: Tensor) -> None:
        """The episodes' normalised images ``(B, C, H, W)``, before the first block: one-shot
        policies (BlockDrop) decide the whole mask from them; others ignore them."""

    def act(self, obs: Tensor, activation: Tensor, k: int) -> Tensor:
        """Execute mask ``(B,)`` bool for gated block ``k``."""
        return torch.ones(obs.shape[0], dtype=torch.bool, device=obs.device)


class RandomPolicy(RoutingPolicy):
    """Execute each gated block independently with probability ``rate``."""

    name = "random"

    def __init__(self, rate: float, seed: int = 0) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"execute rate must be in [0, 1], got {rate}")
        self.rate, self.seed = rate, seed
        self._draws = SeededDraws(seed)

    def act(self, obs: Tensor, activation: Tensor, k: int) -> Tensor:
        return self._draws.rand(obs.shape[0], obs.device) < self.rate


class StaticPolicy(RoutingPolicy):
    """The same subset of blocks for every image: ``mask[k]`` says whether gated block ``k`` runs.

    With ``mask_more`` and ``share_more``, a random ``share_more`` of the images (drawn from
    ``seed``, independent of the image) runs the larger subset ``mask_more`` instead: two fixed
    subsets mixed so that the policy spends a budget between theirs exactly, on average, which is
    what a comparison at equal compute needs. Still data-independent.
    """

    name = "static"

    def __init__(
        self, mask: list[bool], mask_more: list[bool] | None = None, share_more: float = 0.0, seed: int = 0
    ) -> None:
        if not 0.0 <= share_more <= 1.0:
            raise ValueError(f"share_more must be in [0, 1], got {share_more}")
        self.mask = [bool(m) for m in mask]
        self.mask_more = [bool(m) for m in mask_more] if mask_more is not None else None
        self.share_more, self.seed = share_more, seed
        self._draws = SeededDraws(seed)
        self._more: Tensor | None = None

    def reset(self, batch_size: int, device: torch.device) -> None:
        if self.mask_more is not None:
            self._more = self._draws.rand(batch_size, device) < self.share_more  # (B,)

    def act(self, obs: Tensor, activation: Tensor, k: int) -> Tensor:
        base = torch.full((obs.shape[0],), self.mask[k], dtype=torch.bool, device=obs.device)
        if self.mask_more is None or self._more is None:
            return base
        return torch.where(self._more, torch.full_like(base, self.mask_more[k]), base)


class GateRoutingPolicy(RoutingPolicy):
    """SkipNet's gates at evaluation: execute where ``p(execute) >= 0.5``, or where the gate's logit
    is at least ``threshold`` (0 is ``p >= 0.5``; a budget's calibration moves it:
    :func:`agents.evaluate.calibrate_threshold`)."""

    def __init__(self, gates: GatePolicy, name: str, threshold: float = 0.0) -> None:
        self.gates, self.name, self.threshold = gates, name, threshold

    def reset(self, batch_size: int, device: torch.device) -> None:
        self.state = self.gates.initial_state(batch_size, device)

    @torch.no_grad()
    def act(self, obs: Tensor, activation: Tensor, k: int) -> Tensor:
        logit, self.state = self.gates(activation, k, self.state)
        return logit >= self.threshold  # at threshold 0: sigmoid(logit) >= 0.5


class SB3RoutingPolicy(RoutingPolicy):
    """A Stable-Baselines3 model acting on the environment's observations: *execute* where its
    log-odds (execute over skip) is above ``threshold`` (0: the likelier action, which a budget's
    calibration moves); a recurrent policy carries its actor's LSTM state through the episode."""

    def __init__(
        self,
        model: Any,
        name: str,
        threshold: float = 0.0,
        calibrate_to: float | None = None,
        early_exit: bool = False,
        exit_heads: ExitHeads | None = None,
    ) -> None:
        self.model, self.name, self.threshold, self.calibrate_to = model, name, threshold, calibrate_to
        self.recurrent, self.early_exit, self.exit_heads = hasattr(model.policy, "lstm_actor"), early_exit, exit_heads

    def reset(self, batch_size: int, device: torch.device) -> None:
        self.exited = torch.zeros(batch_size, dtype=torch.bool, device=device)
        if self.recurrent:  # the actor's LSTM state (zeros: every episode starts here)
            zeros = torch.zeros(self.model.policy.lstm_hidden_state_shape[0], batch_size,
                                self.model.policy.lstm_hidden_state_shape[2], device=self.model.device)  # fmt: skip
            self.state = (zeros, zeros)

    def act(self, obs: Tensor, activation: Tensor, k: int) -> Tensor:
        from agents.sb3_agents import action_logits  # SB3 is imported where it is used

        with torch.no_grad():
            if self.recurrent:
                starts = torch.zeros(obs.shape[0], device=self.model.device)  # the state is reset above
                distribution, self.state = self.model.policy.get_distribution(
                    obs.to(self.model.device), self.state, starts
                )
                logits = distribution.distribution.logits.to(obs.device)
            else:
                logits = action_logits(self.model.policy, obs.to(self.model.device)).to(obs.device)
        execute = logits[:, 1] - logits[:, 0] > self.threshold
        # with the exit action (a third logit): exit where it is the likeliest of the three
        action = torch.where(logits.argmax(1) == 2, 2, execute.long())
        self.exited |= action == 2
        return (action == 1) & ~self.exited


class SB3OneShotPolicy(RoutingPolicy):
    """A Stable-Baselines3 model trained on ``SkipNetOneShot-v0``: the whole mask from the images
    (deterministically), then block ``k`` of it at each step."""

    def __init__(self, model: Any, name: str) -> None:
        self.model, self.name = model, name
        self._mask: Tensor | None = None

    def begin(self, images: Tensor) -> None:
        actions, _ = self.model.predict(images.float().cpu().numpy(), deterministic=True)
        self._mask = torch.as_tensor(actions, device=images.device) == 1  # (B, N)

    def act(self, obs: Tensor, activation: Tensor, k: int) -> Tensor:
        if self._mask is None:
            raise RuntimeError("a one-shot policy decides from the images: call begin(images) first")
        return self._mask[:, k]


class ExitPolicy(RoutingPolicy):
    """Early exit: at each gated block an image exits where its exit score reaches the
    ``threshold``'s level (a higher threshold exits sooner and spends less, as a gate's does: what a
    budget's calibration moves); once out it stays out, every later block skipped. ``classifier``
    (called ``(h, k)``, :func:`backbones.exits.exit_classifier`) classifies the activation entering
    gated block ``k``: the network's own head where it reads any depth, else exit heads, which then
    classify the exited images in the environment too."""

    early_exit = True

    def __init__(self, classifier: nn.Module, threshold: float = 0.0) -> None:
        self.classifier, self.threshold = classifier, threshold
        self.exit_heads = classifier if isinstance(classifier, ExitHeads) else None

    def reset(self, batch_size: int, device: torch.device) -> None:
        self.exited = torch.zeros(batch_size, dtype=torch.bool, device=device)


class ConfidenceExitPolicy(ExitPolicy):
    """Exit where the head's top probability reaches ``confidence``; ``threshold`` is its log-odds
    turned round (``confidence = sigmoid(-threshold)``)."""

    name = "confidence_exit"

    @property
    def confidence(self) -> float:
        return 1.0 / (1.0 + math.exp(self.threshold))

    @torch.no_grad()
    def act(self, obs: Tensor, activation: Tensor, k: int) -> Tensor:
        top = self.classifier(activation.float(), k).float().softmax(dim=1).amax(dim=1)  # (B,) the top probability
        self.exited |= top >= self.confidence
        return ~self.exited


# the policies a budget's calibration can move (a threshold: higher, fewer blocks)
ThresholdPolicy = GateRoutingPolicy | SB3RoutingPolicy | ExitPolicy
