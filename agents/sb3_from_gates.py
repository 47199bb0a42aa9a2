"""RecurrentPPO whose actor *is* the recipe's recurrent gate (``recurrent_ppo --sb3-from-gates``).

Cloning the gates into PPO's ``MlpPolicy`` agrees with them at 99% of the decisions and still loses
half a point (BENCHMARKS.md section 18): the images where the two disagree are the ones that count.
Here nothing is cloned: sb3-contrib's recurrent actor-critic is given the gate's own structure, and
its weights. SkipNet's recurrent gate reads, at gated block ``k``, the activation's global average
pool (what ``SkipNet-v0``'s observation holds), projects it per stage, runs one LSTM over the blocks
and adds a learned offset per block to a linear read-out (:class:`agents.gates.RecurrentGate`):

- :class:`GateFeatures`, the features extractor, is the per-stage projection (the stage read off the
  observation's one-hot position), with the block's offset beside it;
- :class:`GateLSTM` stands in for the actor's ``nn.LSTM``: the gate's LSTM, the offset passed on;
- the action head's *execute* row is the gate's read-out (and the offset), its *skip* row zero,
  so ``logit(execute) - logit(skip)`` is the gate's logit, times one scale that sets how often a
  sampled decision leaves the greedy one (``--sb3-distill-explore``, as ``--hrl-explore``).

The critic (its own LSTM and MLP) starts new. The policy starts where the gates are, decision for
decision, and PPO goes on from there on the frozen environment.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import Tensor, nn

from agents.gates import GatePolicy, LSTMCell, RecurrentGate


def gate_structure(gates: GatePolicy) -> dict[str, Any]:
    """The policy's keyword arguments that give it ``gates``' shapes (refuses gates it cannot be)."""
    if not isinstance(gates, RecurrentGate):
        raise ValueError(
            f"--sb3-from-gates makes RecurrentPPO's actor the recipe's recurrent gate; these gates are "
            f"{type(gates).__name__}: make the skip-ready backbone with recurrent gates (the default)"
        )
    if gates.pooling != "mean":
        raise ValueError(
            f"--sb3-from-gates: the recipe's gates read {gates.pooling!r} off the activation, SkipNet-v0's "
            f"observation holds its mean only: make the skip-ready backbone with --rnn-pooling mean"
        )
    return {
        "channels": [c for c, _, _ in gates.input_shapes],
        "embed_dim": gates.lstm.x2h.in_features,
        "hidden_size": gates.hidden_size,
    }


class GateFeatures(BaseFeaturesExtractor):
    """The gate's input at the observation's block ``k``: the stage's projection of the pooled
    activation ``(B, embed)``, and the block's logit offset beside it: ``(B, embed + 1)``."""

    def __init__(self, observation_space: spaces.Box, channels: list[int], embed_dim: int) -> None:
        super().__init__(observation_space, embed_dim + 1)
        self.num_gates = len(channels)
        # observation: [pooled activation (padded to the widest block), one-hot position, FLOPs spent]
        self.max_channels = observation_space.shape[0] - self.num_gates - 1
        self.proj = nn.ModuleDict({str(c): nn.Linear(c, embed_dim) for c in sorted(set(channels))})
        self.position_bias = nn.Parameter(torch.zeros(self.num_gates))
        self.register_buffer("block_channels", torch.tensor(channels))

    def forward(self, obs: Tensor) -> Tensor:
        m = self.max_channels
        k = obs[:, m : m + self.num_gates].argmax(1)  # (B,): the block (0 after the last: its value is unused)
        channels = cast(Tensor, self.block_channels)[k]
        x = torch.zeros(obs.shape[0], self.features_dim - 1, device=obs.device)
        for c, proj in self.proj.items():  # one projection per stage, each image its own stage's
            rows = channels == int(c)
            x[rows] = proj(obs[rows, : int(c)])
        return torch.cat([x, self.position_bias[k][:, None]], dim=1)


class GateLSTM(nn.Module):
    """The gate's LSTM cell where the policy has its ``nn.LSTM``: input ``(L, N, embed + 1)``,
    output ``(L, N, hidden + 1)``: the cell's output with the block's offset passed on beside it;
    the state ``(1, N, hidden + 1)`` as the rollout buffer holds it (the last unit unused, zero).
    The cell is written out (:class:`agents.gates.LSTMCell`), so that the FLOP counter sees it."""

    def __init__(self, embed_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.cell = LSTMCell(embed_dim, hidden_size)
        # what the policy and its rollout buffer read off an nn.LSTM
        self.input_size, self.hidden_size, self.num_layers = embed_dim + 1, hidden_size + 1, 1

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, c = (s[0, :, :-1] for s in state)  # (N, hidden)
        out = []
        for x_t in x[..., :-1]:  # the sequence's steps
            h, c = self.cell(x_t, (h, c))
            out.append(h)
        state = (F.pad(h, (0, 1))[None], F.pad(c, (0, 1))[None])
        return torch.cat([torch.stack(out), x[..., -1:]], dim=-1), state


class RecurrentGatePolicy(RecurrentActorCriticPolicy):
    """sb3-contrib's recurrent actor-critic with the recurrent gate's structure as its actor
    (:func:`gate_structure`'s ``channels``, ``embed_dim``, ``hidden_size``); the critic its own LSTM
    of the same size and a 64-64 MLP. :func:`load_gates_into` gives it the gate's weights."""

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Any,
        channels: list[int],
        embed_dim: int,
        hidden_size: int,
        **kwargs: Any,
    ) -> None:
        kwargs.update(
            features_extractor_class=GateFeatures,
            features_extractor_kwargs={"channels": channels, "embed_dim": embed_dim},
            lstm_hidden_size=hidden_size + 1,
            net_arch={"pi": [], "vf": [64, 64]},
        )
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)
        self.lstm_actor = cast(nn.LSTM, GateLSTM(embed_dim, hidden_size))  # read as one by the policy's methods
        # the optimizer again, over the actor's new LSTM
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]


@torch.no_grad()
def load_gates_into(policy: RecurrentGatePolicy, gates: RecurrentGate, scale: float = 1.0) -> None:
    """``policy``'s actor := ``gates``, its log-odds of *execute* ``scale`` x the gate's logit."""
    features = policy.features_extractor
    assert isinstance(features, GateFeatures)
    for c, proj in gates.proj.items():
        features.proj[c].load_state_dict(proj.state_dict())
    if gates.position_bias is not None:
        features.position_bias.copy_(gates.position_bias)
    cast(GateLSTM, policy.lstm_actor).cell.load_state_dict(gates.lstm.state_dict())
    head = cast(nn.Linear, policy.action_net)  # (hidden + 1) -> (skip, execute)
    head.weight.zero_()
    head.bias.zero_()
    head.weight[1, :-1] = scale * gates.out.weight[0]
    head.weight[1, -1] = scale  # the block's offset
    head.bias[1] = scale * gates.out.bias[0]
