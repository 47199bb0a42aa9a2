"""The state machine both environments share: B episodes advancing block by block in lockstep.

Everything here stays on the backbone's device; the only host round trip per step is the
executed-row count that :func:`route_block` needs to size the executed sub-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from backbones.base import FIRST_GATED, Backbone
from backbones.exits import ExitHeads, exit_shapes
from skipnet_env.engine import BlockExecutor, freeze
from skipnet_env.routing import route_block

AccuracyReward = Literal["correct", "neg_ce"]
CostTiming = Literal["terminal", "per_step"]

DEFAULT_ALPHA = 1.0  # the weight of compute, wherever a default is needed: the env, the agents, the runs
# SkipNet's own reward: the negative cross-entropy at the end, each block's cost as it is spent
SKIPNET_REWARD: dict[str, Any] = {"accuracy_reward": "neg_ce", "cost_timing": "per_step"}


@dataclass(frozen=True)
class RewardConfig:
    """How an episode is scored.

    Attributes:
        alpha: weight of compute. The total return of an episode is
            ``accuracy_term - alpha * (FLOPs spent / FLOPs of the full network)``. Below 0 (a
            budget's price where the gates spend less than the budget), compute is rewarded.
        accuracy: ``"correct"``: 1 if the prediction is right, else 0. ``"neg_ce"``: the negative
            cross-entropy of the prediction, SkipNet's terminal reward.
        cost_timing: ``"terminal"``: the whole compute cost is charged at the last step.
            ``"per_step"``: each step is charged the FLOPs it spent (the stem and always-run
            blocks on the first step, the head on the last), as SkipNet's per-gate reward does;
            the return is the same, the credit assignment denser.
    """

    alpha: float = DEFAULT_ALPHA
    accuracy: AccuracyReward = "correct"
    cost_timing: CostTiming = "terminal"

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite number (the weight of compute), got {self.alpha!r}")
        if self.accuracy not in ("correct", "neg_ce"):
            raise ValueError(f"accuracy reward must be 'correct' or 'neg_ce', got {self.accuracy!r}")
        if self.cost_timing not in ("terminal", "per_step"):
            raise ValueError(f"cost_timing must be 'terminal' or 'per_step', got {self.cost_timing!r}")


class BatchedRouting:
    """B episodes of one backbone, one step per gated block.

    Args:
        backbone: put in eval mode; run under ``torch.no_grad`` unless ``differentiable``.
        reward: the scoring rule.
        gate_first_block: let the agent skip the first block too (SkipNet always runs it).
        differentiable: keep the autograd graph through the backbone (for agents that fine-tune
            it, as SkipNet's full recipe does); off, everything runs under ``torch.no_grad`` on
            the frozen execution engine (:mod:`skipnet_env.engine`).
        precision: the engine's compute precision when not ``differentiable``: ``"auto"`` (bf16
            on CUDA, fp32 elsewhere), ``"fp32"`` or ``"bf16"``.
        buckets, graphs: the engine's routing (:class:`skipnet_env.engine.BlockExecutor`); default by device.
        early_exit: an episode may stop at a block (:meth:`advance`'s ``exit``): that block and every
            later one are skipped (their shortcuts run: the identity in a ViT, a downsampling
            block's projection in a CNN) and the head classifies what the last executed block left.
        exit_heads: with ``early_exit``, what classifies an episode where it exits, called ``(h, k)``
            on the activation entering gated block ``k`` (:class:`backbones.exits.ExitHeads`, fitted
            beside a CNN): the exited episode is charged that head's FLOPs and nothing after it.

    The observation of each episode is ``[pooled activation (zero-padded to the widest block),
    one-hot position of the next gated block, (with early_exit: 1 once the episode has exited),
    fraction of the full network's FLOPs spent]``.
    """

    def __init__(
        self,
        backbone: Backbone,
        reward: RewardConfig,
        gate_first_block: bool = False,
        differentiable: bool = False,
        precision: str = "auto",
        buckets: int | None = None,
        graphs: bool | None = None,
        early_exit: bool = False,
        exit_heads: ExitHeads | None = None,
    ) -> None:
        if exit_heads is not None and not early_exit:
            raise ValueError("exit_heads classify where episodes exit: they need early_exit=True")
        self.backbone = backbone.eval()
        self.early_exit = early_exit
        self.differentiable = differentiable
        # what runs: the backbone itself when gradients flow through it, else its frozen copy
        self.net = backbone if differentiable else freeze(backbone, precision=precision)
        self.executor = None if differentiable else BlockExecutor(self.net, buckets, graphs)
        self.reward = reward
        self.device = next(backbone.parameters()).device
        self.first_gated = 0 if gate_first_block else FIRST_GATED
        self.num_gates = backbone.num_blocks - self.first_gated
        if self.num_gates < 1:
            raise ValueError(f"backbone {backbone.arch} has {backbone.num_blocks} block(s): nothing to gate")
        flops = backbone.flops
        self.full_flops = float(flops.full)
        gated = range(self.first_gated, backbone.num_blocks)
        self.exec_flops = torch.tensor(
            [flops.block_executed[i] for i in gated], dtype=torch.float64, device=self.device
        )
        self.skip_flops = torch.tensor([flops.block_skipped[i] for i in gated], dtype=torch.float64, device=self.device)
        self.prefix_flops = float(flops.stem + sum(flops.block_executed[: self.first_gated]))
        self.head_flops = float(flops.head)
        self.exit_heads = None if exit_heads is None else exit_heads.to(self.device)
        if exit_heads is not None:
            shapes = exit_shapes(backbone, self.first_gated)
            self.exit_flops = torch.tensor(exit_heads.flops(shapes), dtype=torch.float64, device=self.device)
        self.max_channels = max(c for c, _, _ in backbone.activation_shapes)
        self.obs_dim = self.max_channels + self.num_gates + int(early_exit) + 1
        self.step_index = 0
        self.h: Tensor | None = None

    @property
    def activation(self) -> Tensor:
        """The activation entering the next gated block ``(B, C, H, W)``, in the compute precision."""
        if self.h is None:
            raise RuntimeError("no activation before start() or begin()")
        return self.h

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_gates

    def start(self, images: Tensor, labels: Tensor) -> Tensor:
        """Begin B episodes on ``images`` ``(B, C, H, W)``; returns the first observation ``(B, obs_dim)``."""
        with torch.set_grad_enabled(self.differentiable):
            h = self.net.enter(images, self.first_gated)
        return self._begin(h, labels)

    def begin(self, h: Tensor, labels: Tensor) -> Tensor:
        """Begin B episodes from ``h`` ``(B, C, H, W)``, the activation entering the first gated
        block (what :meth:`start` computes from images): replays episodes on the same images.
        ``h`` itself is never written."""
        h = self.net.prepare(h)
        if self.executor is not None and not self.executor.buckets:
            h = h.clone()  # the eager engine routes in place
        return self._begin(h, labels)

    def _begin(self, h: Tensor, labels: Tensor) -> Tensor:
        b = h.shape[0]
        # (B, C, H, W); on the frozen engine it is written in place by the next step
        self.h = h if self.executor is None else self.executor.begin(h)
        self.labels = labels  # (B,)
        self.step_index = 0
        self.spent_flops = torch.full((b,), self.prefix_flops, dtype=torch.float64, device=self.device)  # (B,)
        self.executed = torch.zeros(b, self.num_gates, dtype=torch.bool, device=self.device)  # (B, N)
        self.exited = torch.zeros(b, dtype=torch.bool, device=self.device)  # (B,): stopped early (early_exit)
        self.exit_logits: Tensor | None = None  # (B, classes): where they stopped (exit_heads)
        self.logits: Tensor | None = None
        return self.observe()

    def observe(self) -> Tensor:
        """``(B, obs_dim)`` float32; after the last step the position one-hot is all zero."""
        assert self.h is not None
        b, c = self.h.shape[:2]
        obs = torch.zeros(b, self.obs_dim, device=self.device)  # (B, D)
        obs[:, :c] = self.h.detach().mean(dim=(2, 3), dtype=torch.float32)
        if not self.done:
            obs[:, self.max_channels + self.step_index] = 1.0
        if self.early_exit:
            obs[:, self.max_channels + self.num_gates] = self.exited.float()
        obs[:, -1] = (self.spent_flops / self.full_flops).float()
        return obs

    def advance(
        self, execute: Tensor, num_execute: int | None = None, exit: Tensor | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Run (or skip) the next gated block for every episode.

        Args:
            execute: ``(B,)`` bool on the device, true where the block runs.
            num_execute: how many of them run (``execute.sum()``, less the exited ones), if already
                known on the host.
            exit: with ``early_exit``, ``(B,)`` bool on the device: the episodes that stop here (this
                block and every later one skipped, whatever ``execute`` says).

        Returns:
            observation ``(B, obs_dim)``, reward ``(B,)`` float32, info of ``(B, ...)`` tensors:
            ``label``, ``flops`` (spent so far), ``flops_fraction``, ``executed`` ``(B, N)``
            (``exited`` ``(B,)`` with early_exit); after the last step also ``prediction``,
            ``correct`` and ``logits``.
        """
        if self.h is None or self.done:
            raise RuntimeError("the episode is over: call reset() before step()")
        if exit is not None and not self.early_exit:
            raise ValueError("exit needs early_exit=True (the env option early_exit)")
        exit_flops = None
        if self.early_exit:
            if exit is not None:
                if self.exit_heads is not None:
                    exit_flops = self._classify_exits(exit & ~self.exited)
                self.exited |= exit
            execute = execute & ~self.exited
        with torch.set_grad_enabled(self.differentiable):
            return self._advance(execute, num_execute, exit_flops)

    def _classify_exits(self, new: Tensor) -> Tensor:
        """The exit heads' logits for the episodes that exit at this block ``new`` ``(B,)`` (kept
        until the last step); returns what that costs each episode ``(B,)``."""
        assert self.exit_heads is not None
        k = self.step_index
        with torch.no_grad():
            logits = self.exit_heads(self.activation, k).float()  # (B, classes)
        self.exit_logits = logits if self.exit_logits is None else torch.where(new[:, None], logits, self.exit_logits)
        return torch.where(new, self.exit_flops[k], 0.0)

    def _advance(
        self, execute: Tensor, num_execute: int | None, exit_flops: Tensor | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        k = self.step_index
        index = self.first_gated + k
        if self.executor is None:
            self.h = route_block(self.net.blocks[index], self.activation, execute, num_execute)
        else:
            if num_execute is None:
                num_execute = int(execute.sum())  # the one device sync: the executed row count sets the shapes
            self.h = self.executor.route(index, self.activation, execute, num_execute)
        step_flops = torch.where(execute, self.exec_flops[k], self.skip_flops[k])  # (B,)
        if self.exit_heads is not None:  # an exited episode stopped at its exit head: nothing after it runs
            step_flops = torch.where(self.exited, 0.0, step_flops)
            if exit_flops is not None:
                step_flops = step_flops + exit_flops
        self.spent_flops += step_flops
        if k == 0:  # the per-step charge of the first step includes the stem and always-run blocks
            step_flops = step_flops + self.prefix_flops
        self.executed[:, k] = execute
        self.step_index += 1
        info: dict[str, Tensor] = {"label": self.labels, "executed": self.executed.clone()}
        if self.early_exit:
            info["exited"] = self.exited.clone()
        if self.done:
            self.logits = self.net.head(self.h).float()  # (B, num_classes)
            head_flops = torch.full_like(step_flops, self.head_flops)
            if self.exit_logits is not None:  # the exited episodes were classified where they stopped
                self.logits = torch.where(self.exited[:, None], self.exit_logits, self.logits)
                head_flops = torch.where(self.exited, 0.0, head_flops)
            self.spent_flops += head_flops
            step_flops = step_flops + head_flops
            prediction = self.logits.argmax(dim=1)
            correct = prediction == self.labels
            info.update(prediction=prediction, correct=correct, logits=self.logits)
        info.update(flops=self.spent_flops.clone(), flops_fraction=self.spent_flops / self.full_flops)
        reward = self._reward(step_flops).detach()
        return self.observe(), reward, info

    def _reward(self, step_flops: Tensor) -> Tensor:
        cfg = self.reward
        b = step_flops.shape[0]
        if cfg.cost_timing == "per_step":
            reward = -cfg.alpha * step_flops / self.full_flops
        elif self.done:
            reward = -cfg.alpha * self.spent_flops / self.full_flops
        else:
            reward = torch.zeros(b, dtype=torch.float64, device=self.device)
        if self.done:
            assert self.logits is not None
            if cfg.accuracy == "correct":
                reward = reward + (self.logits.argmax(dim=1) == self.labels).double()
            else:
                reward = reward - F.cross_entropy(self.logits.double(), self.labels, reduction="none")
        return reward.float()
