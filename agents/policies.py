"""Routing policies: what every agent exposes for evaluation on the same ground.

A policy sees, at each gated block ``k``, the environment's observation ``(B, D)`` and the
activation entering the block ``(B, C, H, W)`` (both device tensors) and returns the execute
mask ``(B,)`` bool. ``reset(B)`` starts new episodes (recurrent policies clear their state).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from agents.gates import GatePolicy


class RoutingPolicy:
    """Interface (and the ``full`` policy: execute everything)."""

    name = "full"

    def reset(self, batch_size: int, device: torch.device) -> None:
        """Start ``batch_size`` new episodes (stateless policies need nothing)."""

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
        self._generators: dict[torch.device, torch.Generator] = {}

    def act(self, obs: Tensor, activation: Tensor, k: int) -> Tensor:
        g = self._generators.get(obs.device)
        if g is None:
            g = self._generators[obs.device] = torch.Generator(device=obs.device).manual_seed(self.seed)
        return torch.rand(obs.shape[0], device=obs.device, generator=g) < self.rate


class StaticPolicy(RoutingPolicy):
    """The same subset of blocks for every image: ``mask[k]`` says whether gated block ``k`` runs."""

    name = "static"

    def __init__(self, mask: list[bool]) -> None:
        self.mask = [bool(m) for m in mask]

    def act(self, obs: Tensor, activation: Tensor, k: int) -> Tensor:
        return torch.full((obs.shape[0],), self.mask[k], dtype=torch.bool, device=obs.device)


class GateRoutingPolicy(RoutingPolicy):
    """SkipNet's gates at evaluation: execute where ``p(execute) >= 0.5``."""

    def __init__(self, gates: GatePolicy, name: str) -> None:
        self.gates, self.name = gates, name

    def reset(self, batch_size: int, device: torch.device) -> None:
        self.state = self.gates.initial_state(batch_size, device)

    @torch.no_grad()
    def act(self, obs: Tensor, activation: Tensor, k: int) -> Tensor:
        logit, self.state = self.gates(activation, k, self.state)
        return logit >= 0.0  # sigmoid(logit) >= 0.5


class SB3RoutingPolicy(RoutingPolicy):
    """A Stable-Baselines3 model acting on the environment's observations (deterministically)."""

    def __init__(self, model: Any, name: str) -> None:
        self.model, self.name = model, name
        self.recurrent = hasattr(model.policy, "lstm_actor")

    def reset(self, batch_size: int, device: torch.device) -> None:
        self.state = None
        self.episode_start = np.ones(batch_size, dtype=bool)

    def act(self, obs: Tensor, activation: Tensor, k: int) -> Tensor:
        obs_np = obs.cpu().numpy()
        if self.recurrent:
            actions, self.state = self.model.predict(
                obs_np, state=self.state, episode_start=self.episode_start, deterministic=True
            )
            self.episode_start = np.zeros_like(self.episode_start)
        else:
            actions, _ = self.model.predict(obs_np, deterministic=True)
        return torch.as_tensor(actions, device=obs.device) == 1
