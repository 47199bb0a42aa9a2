"""SkipNet's gate networks: feedforward (FFGate-I, FFGate-II) and recurrent.

A gate policy decides, for each gated block ``k``, whether to execute it, from the activation
entering that block ``h_k`` ``(B, C_k, H_k, W_k)``. Every gate returns one logit per image: the
log-odds of *execute* (equivalent to the paper's two-way softmax over skip/execute).

FLOPs are counted with ``torch.utils.flop_counter`` per gated block (:meth:`GatePolicy.flops`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Literal, cast

import torch
from torch import Tensor, nn

from backbones.base import FIRST_GATED, Backbone
from backbones.flops import count_flops
from backbones.options import POSITIVE_INT, check_options, option


class GatePolicy(nn.Module):
    """Base class: one decision per gated block of ``backbone``.

    Args:
        backbone: the network to gate (only its shapes are read).
        first_gated: index of the first gated block (:data:`backbones.base.FIRST_GATED`: block 0 always runs).
    """

    def __init__(self, backbone: Backbone, first_gated: int = FIRST_GATED) -> None:
        super().__init__()
        self.first_gated = first_gated
        self.input_shapes = [backbone.activation_shapes[i] for i in range(first_gated, backbone.num_blocks)]
        self.num_gates = len(self.input_shapes)

    def initial_state(self, batch_size: int, device: torch.device) -> Any:
        """Recurrent state at the start of an episode (``None`` for feedforward gates)."""
        return None

    def forward(self, h: Tensor, k: int, state: Any = None) -> tuple[Tensor, Any]:
        """Logit of *execute* ``(B,)`` for gated block ``k`` given its input ``h``, and the new state."""
        raise NotImplementedError

    def __call__(self, h: Tensor, k: int, state: Any = None) -> tuple[Tensor, Any]:
        # the gates compute in their own precision (fp32), under a trainer's bf16 autocast too: their
        # thresholds and probabilities are what the routes and REINFORCE's log-probabilities read
        with torch.autocast(h.device.type, enabled=False):
            return super().__call__(h, k, state)

    @cached_property
    def flops(self) -> list[int]:
        """FLOPs per image of each gate, counted by the framework."""
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        state = self.initial_state(1, device)
        out = []
        for k, shape in enumerate(self.input_shapes):
            n, (_, state) = count_flops(
                functools.partial(self, k=k, state=state), torch.zeros(1, *shape, device=device)
            )
            out.append(n)
        self.train(was_training)
        return out


def _conv_bn_relu(c: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]


def _logit_head(c: int) -> list[nn.Module]:
    """Global average pool and a 1x1 conv to the execute logit: ``(B, C, H, W)`` -> ``(B,)``."""
    return [nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, 1, 1), nn.Flatten(0)]


def _ff_gate_1(c: int) -> nn.Sequential:
    return nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), *_conv_bn_relu(c, 1), *_conv_bn_relu(c, 2), *_logit_head(c))


def _ff_gate_2(c: int) -> nn.Sequential:
    return nn.Sequential(*_conv_bn_relu(c, 2), *_logit_head(c))


FF_GATE_KINDS = {"I": _ff_gate_1, "II": _ff_gate_2}


class FeedforwardGates(GatePolicy):
    """One independent gate per gated block, looking at the block's whole input map.

    ``kind="I"`` (ResNet-38/74 in the paper): max-pool 2x2, 3x3 conv, BN, ReLU, 3x3 conv stride 2,
    BN, ReLU, global average pool, 1x1 conv. ``kind="II"`` (deeper nets): 3x3 conv stride 2, BN,
    ReLU, average pool, 1x1 conv.
    """

    def __init__(
        self, backbone: Backbone, first_gated: int = FIRST_GATED, kind: str = "I", init_execute: float = 2.0
    ) -> None:
        super().__init__(backbone, first_gated)
        if kind not in FF_GATE_KINDS:
            raise ValueError(f"feedforward gate kind must be one of {sorted(FF_GATE_KINDS)}, got {kind!r}")
        self.gates = nn.ModuleList(FF_GATE_KINDS[kind](c) for c, _, _ in self.input_shapes)
        for gate in self.gates:  # start by executing (logit init_execute), as the backbone was trained
            logit_conv = cast(nn.Conv2d, list(gate.children())[-2])
            nn.init.constant_(cast(Tensor, logit_conv.bias), init_execute)

    def forward(self, h: Tensor, k: int, state: Any = None) -> tuple[Tensor, Any]:
        # the gates compute in their own precision, whatever the backbone's (bf16 on a frozen CUDA one);
        # when gradients flow, on a copy: the convolution's backward reads its input, and the environment
        # writes the next block's output into the activation in place
        dtype = next(self.gates[k].parameters()).dtype
        return self.gates[k](h.to(dtype, copy=torch.is_grad_enabled())), None


class LSTMCell(nn.Module):
    """A plain LSTM cell, written out so that the FLOP counter sees its matrix multiplies."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.x2h = nn.Linear(input_size, 4 * hidden_size)
        self.h2h = nn.Linear(hidden_size, 4 * hidden_size)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, c = state
        i, f, g, o = (self.x2h(x) + self.h2h(h)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


# what the recurrent gate reads off the activation: SkipNet's global average pool, or that with the
# spatial max and standard deviation beside it (contrast and clutter show in them)
# (in fp32, whatever the backbone computes in)
POOL_FNS = {
    "mean": lambda h: h.mean(dim=(2, 3), dtype=torch.float32),
    "max": lambda h: h.amax(dim=(2, 3)).float(),
    "std": lambda h: h.float().std(dim=(2, 3)),
}
POOLINGS = {"mean": ("mean",), "mean_max_std": ("mean", "max", "std")}
Pooling = Literal["mean", "mean_max_std"]


@dataclass
class RecurrentGateConfig:
    """The recurrent gate: hybrid_rnn's, and the gates joint SP trains beside the backbone.

    The defaults are the runs' (BENCHMARKS.md section 4: 16-d, a learned bias per block)."""

    flag_prefix: ClassVar[str] = "rnn_"

    hidden: int = option(16, POSITIVE_INT)
    """hybrid_rnn: LSTM hidden size (reference code: 10 in SP, 64 in RL; 64 costs 5% of the default network)"""
    embed: int = option(16, POSITIVE_INT)
    """hybrid_rnn: size of the pooled activation's embedding fed to the LSTM"""
    pooling: Pooling = "mean"
    """hybrid_rnn: what the gate reads off the activation: mean (SkipNet's average pool) or mean_max_std"""
    position_bias: bool = True
    """hybrid_rnn: a learned logit offset per gated block (the data-independent part of the decision)"""

    def __post_init__(self) -> None:
        check_options(self)

    def options(self) -> dict[str, Any]:
        """:class:`RecurrentGate`'s keyword arguments (and the gates' identity in a skip-ready checkpoint)."""
        return {
            "hidden_size": self.hidden,
            "embed_dim": self.embed,
            "pooling": self.pooling,
            "position_bias": self.position_bias,
        }


class RecurrentGate(GatePolicy):
    """SkipNet's recurrent gate: per block, global average pool and a 1x1 projection to an
    embedding (one projection per stage, as the reference code); one LSTM shared by all blocks,
    state reset per image; a linear layer to the execute logit."""

    def __init__(
        self,
        backbone: Backbone,
        first_gated: int = FIRST_GATED,
        embed_dim: int = RecurrentGateConfig.embed,
        hidden_size: int = RecurrentGateConfig.hidden,
        init_execute: float = 2.0,
        position_bias: bool = RecurrentGateConfig.position_bias,
        pooling: str = RecurrentGateConfig.pooling,
    ) -> None:
        super().__init__(backbone, first_gated)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.hidden_size = hidden_size
        self.pooling = pooling
        channels = sorted({c for c, _, _ in self.input_shapes})
        width = len(POOLINGS[pooling])
        # per stage, a 1x1 conv on the pooled map (a linear layer on the pooled statistics)
        self.proj = nn.ModuleDict({str(c): nn.Linear(width * c, embed_dim) for c in channels})
        self.lstm = LSTMCell(embed_dim, hidden_size)
        self.out = nn.Linear(hidden_size, 1)
        nn.init.constant_(self.out.bias, init_execute)
        # a learned logit offset per gated block: the data-independent part of the decision (which
        # positions usually run) gets one parameter each, and the LSTM learns the per-image part
        self.position_bias = nn.Parameter(torch.zeros(self.num_gates)) if position_bias else None

    def initial_state(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        zeros = torch.zeros(batch_size, self.hidden_size, device=device)
        return zeros, zeros

    def forward(self, h: Tensor, k: int, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Any]:
        if state is None:
            state = self.initial_state(h.shape[0], h.device)
        pooled = torch.cat([POOL_FNS[name](h) for name in POOLINGS[self.pooling]], dim=1)  # (B, width * C)
        x = self.proj[str(h.shape[1])](pooled)  # (B, embed)
        hidden, cell = self.lstm(x, state)
        logit = self.out(hidden).squeeze(1)  # (B,)
        if self.position_bias is not None:
            logit = logit + self.position_bias[k]
        return logit, (hidden, cell)


def create_gates(kind: str, backbone: Backbone, first_gated: int = FIRST_GATED, **kwargs: Any) -> GatePolicy:
    """``kind``: ``"rnn"``, ``"ff1"`` (FFGate-I) or ``"ff2"`` (FFGate-II)."""
    builders = {
        "rnn": lambda: RecurrentGate(backbone, first_gated, **kwargs),
        "ff1": lambda: FeedforwardGates(backbone, first_gated, "I", **kwargs),
        "ff2": lambda: FeedforwardGates(backbone, first_gated, "II", **kwargs),
    }
    if kind not in builders:
        raise ValueError(f"unknown gate kind {kind!r}; valid: {', '.join(builders)}")
    return builders[kind]()
