"""SkipNet's hybrid algorithm on the SkipNet-Gym environment, read top to bottom.

Stage 1, supervised pre-training (SP): hard gates in the forward pass, ``g = 1[p >= 0.5]``, with
the straight-through gradient ``g = stopgrad(1[p >= 0.5] - p) + p``; loss = cross-entropy of the
routed network's prediction. Every block runs on every image here (the gradient of a skipped
block's gate needs the block's output), so SP is masked, not sparse.

Stage 2, hybrid RL (HRL): the gates act in the batched environment, sampling ``a ~ Bernoulli(p)``
at each block; the environment's reward is SkipNet's: a per-block compute cost (``alpha`` times the
block's share of the network's FLOPs) and the negative cross-entropy at the end. REINFORCE on the
returns ``R_i = r_i + gamma R_{i+1}`` with a baseline, the mean return of the batch at each gate
(the reference code has none; ``--baseline none`` reproduces that), plus, when the backbone is
fine-tuned, the cross-entropy of the routed prediction (the "supervised term").

BatchNorm: the backbone stays in eval mode in both stages, so its running statistics are the base
network's and sampled routes cannot shift them (the reference code's known accuracy drop); when
fine-tuning, the convolutions and BatchNorm affine parameters still train.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from agents.gates import GatePolicy
from backbones.base import Backbone
from backbones.checkpoint import atomic_save, safe_load
from backbones.data import ImageTensors
from backbones.train import batches
from skipnet_env.vector_env import SkipNetVectorEnv

log = logging.getLogger(__name__)


@dataclass
class HybridConfig:
    """The hybrid trainer's settings (see :class:`agents.config.RunConfig` for their meaning)."""

    sp_epochs: int = 10
    sp_lr: float = 1e-3
    hrl_iterations: int = 2000
    hrl_lr: float = 1e-3
    alpha: float = 1.0
    gamma: float = 1.0
    baseline: str = "batch_mean"
    rl_weight: float = 0.01
    num_envs: int = 128
    finetune_backbone: bool = False
    backbone_lr: float = 1e-4
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.baseline not in ("batch_mean", "none"):
            raise ValueError(f"baseline must be 'batch_mean' or 'none', got {self.baseline!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")


def straight_through(p: Tensor) -> Tensor:
    """Forward ``1[p >= 0.5]``, backward the identity to ``p``."""
    hard = (p >= 0.5).to(p.dtype)
    return (hard - p).detach() + p


def sp_forward(backbone: Backbone, gates: GatePolicy, x: Tensor) -> tuple[Tensor, Tensor]:
    """Routed logits ``(B, classes)`` with straight-through hard gates, and ``p(execute)`` ``(B, N)``."""
    h = backbone.stem(x)
    for block in backbone.blocks[: gates.first_gated]:
        h = block(h)
    state = gates.initial_state(x.shape[0], x.device)
    probs = []
    for k, block in enumerate(backbone.blocks[gates.first_gated :]):
        logit, state = gates(h, k, state)
        p = torch.sigmoid(logit)
        g = straight_through(p)[:, None, None, None]  # (B, 1, 1, 1)
        h = g * block(h) + (1.0 - g) * block.shortcut(h)
        probs.append(p)
    return backbone.head(h), torch.stack(probs, dim=1)


def discounted_returns(rewards: Tensor, gamma: float) -> Tensor:
    """``R_i = r_i + gamma * R_{i+1}`` over the step axis of ``rewards`` ``(N, B)``."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for i in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[i] + gamma * running
        returns[i] = running
    return returns


def reinforce_loss(log_probs: Tensor, returns: Tensor, baseline: str) -> Tensor:
    """``-mean_b sum_i log pi(a_i) * (R_i - b_i)``; ``log_probs`` and ``returns`` are ``(N, B)``."""
    advantages = returns - returns.mean(dim=1, keepdim=True) if baseline == "batch_mean" else returns
    return -(log_probs * advantages.detach()).sum(dim=0).mean()


class HybridTrainer:
    """Trains ``gates`` on ``backbone`` with SP then HRL; checkpoints atomically and resumes.

    Args:
        backbone: the (frozen unless ``cfg.finetune_backbone``) residual network.
        gates: the gate policy to train.
        train_data: images the gates learn from.
        cfg: stage lengths, learning rates, reward.
        device: where everything runs.
        checkpoint: path of the agent checkpoint (written after each SP epoch and every
            ``checkpoint_every`` HRL iterations).
        metadata: written into every checkpoint (agent, backbone identity, ...).
        writer: a TensorBoard ``SummaryWriter`` (or ``None``).
    """

    def __init__(
        self,
        backbone: Backbone,
        gates: GatePolicy,
        train_data: ImageTensors,
        cfg: HybridConfig,
        device: torch.device,
        checkpoint: Path,
        metadata: dict[str, Any],
        writer: Any = None,
        progress: bool = True,
    ) -> None:
        self.backbone, self.gates, self.data, self.cfg = backbone.to(device).eval(), gates.to(device), train_data, cfg
        self.device, self.checkpoint, self.metadata, self.writer, self.progress = (
            device,
            checkpoint,
            metadata,
            writer,
            progress,
        )
        self.backbone.requires_grad_(cfg.finetune_backbone)
        params = [{"params": gates.parameters()}]
        if cfg.finetune_backbone:
            params.append({"params": backbone.parameters(), "lr": cfg.backbone_lr})
        self.sp_opt = torch.optim.Adam(params, lr=cfg.sp_lr)
        self.hrl_opt = torch.optim.Adam(params, lr=cfg.hrl_lr)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.stage, self.done_units = "sp", 0  # epochs in SP, iterations in HRL

    # -- checkpoints ------------------------------------------------------------------------
    def save(self) -> None:
        state = {
            "metadata": {
                **self.metadata,
                "stage": self.stage,
                "done_units": self.done_units,
                "hybrid_config": dataclasses.asdict(self.cfg),
            },
            "gates": self.gates.state_dict(),
            "sp_opt": self.sp_opt.state_dict(),
            "hrl_opt": self.hrl_opt.state_dict(),
            "generator": self.generator.get_state(),
        }
        if self.cfg.finetune_backbone:
            state["backbone"] = self.backbone.state_dict()
        atomic_save(state, self.checkpoint)

    def resume(self) -> None:
        state = safe_load(self.checkpoint, map_location=self.device)
        self.gates.load_state_dict(state["gates"])
        self.sp_opt.load_state_dict(state["sp_opt"])
        self.hrl_opt.load_state_dict(state["hrl_opt"])
        self.generator.set_state(state["generator"])
        if "backbone" in state:
            self.backbone.load_state_dict(state["backbone"])
        self.stage, self.done_units = state["metadata"]["stage"], state["metadata"]["done_units"]
        log.info("resuming %s at stage %s, %d done", self.checkpoint, self.stage, self.done_units)

    def _check_finite(self, loss: Tensor, where: str) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{where} loss is {loss.item()}: stopping. The last good checkpoint ({self.checkpoint}) is kept; "
                "lower the learning rate and rerun with --resume."
            )

    # -- stage 1 ----------------------------------------------------------------------------
    def train_sp(self) -> None:
        cfg = self.cfg
        steps = math.ceil(len(self.data) / cfg.num_envs)
        bar = tqdm(
            total=cfg.sp_epochs * steps,
            initial=self.done_units * steps,
            desc="SP (straight-through)",
            disable=not self.progress,
            leave=False,
        )
        for epoch in range(self.done_units, cfg.sp_epochs):
            for x, y in batches(self.data, cfg.num_envs, self.device, train=True, generator=self.generator):
                logits, probs = sp_forward(self.backbone, self.gates, x)
                loss = F.cross_entropy(logits, y)
                self._check_finite(loss, "SP")
                self.sp_opt.zero_grad(set_to_none=True)
                loss.backward()
                self.sp_opt.step()
                bar.update(1)
            self.done_units = epoch + 1
            if self.writer:
                self.writer.add_scalar("losses/sp_cross_entropy", loss.item(), epoch)
                self.writer.add_scalar("charts/sp_execute_rate", (probs >= 0.5).float().mean().item(), epoch)
            self.save()
        bar.close()
        self.stage, self.done_units = "hrl", 0
        self.save()

    # -- stage 2 ----------------------------------------------------------------------------
    def make_env(self) -> SkipNetVectorEnv:
        return SkipNetVectorEnv(
            self.cfg.num_envs,
            self.backbone,
            self.data,
            alpha=self.cfg.alpha,
            accuracy_reward="neg_ce",
            cost_timing="per_step",
            device=self.device,
            return_tensors=True,
            differentiable=self.cfg.finetune_backbone,
            gate_first_block=self.gates.first_gated == 0,
        )

    def rollout(self, env: SkipNetVectorEnv) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One batch of episodes with sampled decisions: log-probs and rewards ``(N, B)``, final info."""
        state = self.gates.initial_state(env.num_envs, self.device)
        log_probs, rewards = [], []
        info: dict[str, Any] = {}
        for k in range(env.num_gates):
            logit, state = self.gates(env.activation, k, state)
            # no argument validation: non-finite logits flow into the loss, where they stop the run cleanly
            dist = torch.distributions.Bernoulli(logits=logit, validate_args=False)
            action = (torch.rand_like(logit) < torch.sigmoid(logit)).to(logit.dtype)
            log_probs.append(dist.log_prob(action))
            _, reward, _, _, info = env.step(action.bool())
            rewards.append(reward)
        return torch.stack(log_probs), torch.stack(rewards), info["final_info"]

    def train_hrl(self) -> None:
        cfg = self.cfg
        env = self.make_env()
        env.reset(seed=cfg.seed + self.done_units)
        # linear decay to 0 over the stage: REINFORCE's noisy steps settle instead of wandering at the end
        start = self.done_units
        schedule = torch.optim.lr_scheduler.LambdaLR(self.hrl_opt, lambda it: 1.0 - (start + it) / cfg.hrl_iterations)
        bar = tqdm(
            total=cfg.hrl_iterations,
            initial=self.done_units,
            desc="HRL (REINFORCE)",
            disable=not self.progress,
            leave=False,
        )
        for it in range(self.done_units, cfg.hrl_iterations):
            if cfg.finetune_backbone and it > start:
                # the autoreset computed the next batch's first activation with the weights of before the
                # last update; start it again so the graph holds the current weights
                env.reset()
            log_probs, rewards, final = self.rollout(env)
            returns = discounted_returns(rewards, cfg.gamma)
            rl = reinforce_loss(log_probs, returns, cfg.baseline)
            loss = cfg.rl_weight * rl
            if cfg.finetune_backbone:  # the supervised term: trains the backbone through executed blocks
                loss = loss + F.cross_entropy(final["logits"], final["label"])
            self._check_finite(loss, "HRL")
            self.hrl_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.hrl_opt.step()
            schedule.step()
            self.done_units = it + 1
            acc, frac = final["correct"].float().mean().item(), final["flops_fraction"].mean().item()
            bar.update(1)
            bar.set_postfix(acc=f"{acc:.3f}", flops=f"{frac:.3f}")
            if self.writer:
                self.writer.add_scalar("losses/reinforce", rl.item(), it)
                self.writer.add_scalar("charts/episodic_return", returns[0].mean().item(), it)
                self.writer.add_scalar("charts/train_accuracy", acc, it)
                self.writer.add_scalar("charts/flops_fraction", frac, it)
            if self.done_units % cfg.checkpoint_every == 0:
                self.save()
        bar.close()
        self.stage = "done"
        self.save()

    def train(self) -> GatePolicy:
        if self.stage == "sp":
            self.train_sp()
        if self.stage == "hrl":
            self.train_hrl()
        self.gates.eval()
        return self.gates
