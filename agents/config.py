"""The configuration of one run: which agent, on which backbone and data, with which budget.

The hybrid trainer's fields take their defaults from :class:`agents.hybrid.HybridConfig`, the one
place they are set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch

from agents.blockdrop import BlockDropConfig
from agents.gates import RNN_EMBED, RNN_HIDDEN, RNN_POSITION_BIAS
from agents.hybrid import BASELINES, HybridConfig
from agents.skip_ready import JOINT_GATE_KIND, BatchNormMode, JointConfig
from skipnet_env.core import DEFAULT_ALPHA, AccuracyReward
from skipnet_env.engine import PRECISIONS

BackboneRecipe = Literal["base", "skip_ready"]

# what static and random spend when --budget is not given
FIXED_POLICY_BUDGET = 0.6

# the hybrid agents' stages by backbone recipe: on a skip-ready backbone joint SP trained the gates already, for
# --joint-budget; used as they are, they did best there (BENCHMARKS.md section 9: SP or HRL on top made the routing
# less dynamic and no more accurate)
RECIPE_STAGES: dict[str, dict[str, int]] = {
    "base": {"sp_epochs": HybridConfig.sp_epochs, "hrl_iterations": HybridConfig.hrl_iterations},
    "skip_ready": {"sp_epochs": 0, "hrl_iterations": 0},
}
# SP epochs that re-price a skip-ready backbone's gates for a budget other than the one joint SP trained them for
SKIP_READY_REPRICE_EPOCHS = 3
# the agent whose gates joint SP trains
JOINT_GATES_AGENT = f"hybrid_{JOINT_GATE_KIND}"

# batch sizes by device: a GPU needs about a thousand images in flight to be busy, a CPU core does not
DEVICE_BATCHES = {
    "cuda": {"num_envs": 1024, "eval_batch": 2048},
    "cpu": {"num_envs": HybridConfig.num_envs, "eval_batch": 512},
}


def resumable(default: Any) -> Any:
    """A field a resumed run may change (declared on the field): how the run runs, not what it
    computes; the learning rates too, so that a diverged run can be resumed more gently (they then
    really apply)."""
    return field(default=default, metadata={"resumable": True})


def flag(name: str) -> str:
    """The command-line flag of field ``name``: ``hrl_lr`` -> ``--hrl-lr``."""
    return "--" + name.replace("_", "-")


@dataclass
class RunConfig:
    """Train and evaluate a routing agent on a frozen backbone (SkipNet-Gym)."""

    agent: str = "hybrid_rnn"
    """agent: hybrid_rnn, hybrid_ff, hybrid_ff2, blockdrop, ppo, a2c, recurrent_ppo, ppo_oneshot, random, static,
    full"""
    backbone: str = "cifar_resnet38"
    """backbone registry name (trained on --dataset and cached on first use)"""
    backbone_checkpoint: str | None = None
    """use this backbone checkpoint instead of the cached one"""
    dataset: str = "cluttered_digits"
    """data set: cluttered_digits or digits (embedded, offline), mnist, cifar10, cifar100, svhn, imagefolder"""
    data_root: str | None = None
    """folder with the data set's files (default $SKIPNET_DATA or ./data)"""
    download: bool = True
    """download the data set when its files are missing"""
    width: float = 0.5
    """channel multiplier of CIFAR ResNet backbones"""
    image_size: int | None = None
    """square input side (default: the data set's own; 16 for digits)"""
    backbone_epochs: int | None = None
    """epochs when the backbone has to be trained first (default: the trainer's for the data set)"""
    backbone_drop_rate: float = 0.5
    """stochastic depth of the backbone trainer: drop rate of the last block (0 disables)"""
    backbone_drop_schedule: str = "linear"
    """stochastic depth of the backbone trainer: linear (decaying to 0 at the first block) or uniform"""
    backbone_flip: bool | None = None
    """horizontal flips when the backbone is trained (default: the data set's own: on for CIFAR and your own images,
    off for digits and SVHN)"""
    backbone_recipe: BackboneRecipe = "skip_ready"
    """base: the backbone as trained (frozen); skip_ready: the base backbone trained further with its gates (joint
    SP, the paper's recipe), then frozen: every agent runs on it"""
    joint_epochs: int | None = JointConfig.epochs
    """skip_ready: epochs of joint SP (backbone + gates; default 6, or as many as make 500 steps on a small data set)"""
    joint_lr: float = JointConfig.lr
    """skip_ready: peak SGD learning rate of the backbone in joint SP (cosine decay)"""
    joint_alpha: float = JointConfig.alpha
    """skip_ready: weight of compute in joint SP's loss (0: the paper's SP, cross-entropy alone)"""
    joint_budget: float | None = JointConfig.budget
    """skip_ready: FLOPs fraction joint SP's gates are trained to spend (a Lagrange multiplier replaces
    --joint-alpha as the compute weight)"""
    joint_sample: bool = JointConfig.sample
    """skip_ready: joint SP's gates are samples (logistic noise before the threshold), not thresholds (the paper's)"""
    joint_bn: BatchNormMode = JointConfig.bn
    """skip_ready: BatchNorm in joint SP: train (the routed network's batch statistics) or frozen (the base's)"""
    alpha: float = HybridConfig.alpha
    """weight of compute in the reward: each block costs alpha x its share of the full network's FLOPs"""
    device: str = resumable("auto")
    """torch device: auto, cpu, cuda, ..."""
    seed: int = 0
    """seed for python, numpy, torch and the environment"""
    torch_deterministic: bool = resumable(False)
    """ask cuDNN for deterministic kernels"""
    num_envs: int | None = None
    """images per batch in the environment (B; default 128 on the CPU, 1024 on CUDA)"""
    precision: str = HybridConfig.precision
    """compute precision of the frozen backbone: auto (bf16 on CUDA, fp32 elsewhere), fp32 or bf16"""
    # hybrid (SkipNet) agents
    sp_epochs: int | None = None
    """hybrid: supervised pre-training epochs on the frozen backbone (default: 10, except hybrid_rnn on a skip-ready
    backbone: 0, its gates as joint SP trained them for --joint-budget, or 3 when --budget or --alpha asks for
    another compute)"""
    sp_batch: int = HybridConfig.sp_batch
    """hybrid: images per SP step, on every device (SP's learning rate and steps are tuned for it; --num-envs sizes
    the environment's batch)"""
    sp_lr: float = resumable(HybridConfig.sp_lr)
    """hybrid: Adam learning rate of the gates in supervised pre-training"""
    sp_alpha: float | None = HybridConfig.sp_alpha
    """hybrid: weight of compute in SP's loss (default: --alpha; 0 is the paper's SP, cross-entropy alone)"""
    sp_sample: bool = HybridConfig.sp_sample
    """hybrid: SP gates are samples (logistic noise before the threshold, straight-through), not thresholds"""
    sp_alpha_warmup: int = HybridConfig.sp_alpha_warmup
    """hybrid: SP epochs over which the compute weight ramps up linearly from 0 (0: full weight at once)"""
    hrl_iterations: int | None = None
    """hybrid: REINFORCE iterations, one batch of num_envs episodes each (default: 500 on the base recipe; 0 on a
    skip-ready backbone, where HRL after joint SP did not help: BENCHMARKS.md section 9)"""
    hrl_lr: float = resumable(HybridConfig.hrl_lr)
    """hybrid: Adam learning rate of the gates in hybrid RL"""
    gamma: float = HybridConfig.gamma
    """hybrid: discount of the per-gate returns"""
    baseline: str = HybridConfig.baseline
    """hybrid: REINFORCE baseline: self_critical (the greedy route's return on the same image), batch_mean, none"""
    entropy_coef: float = HybridConfig.entropy_coef
    """hybrid: weight of the gates' entropy bonus in HRL (keeps the decisions exploring)"""
    checkpoint_every: int = resumable(HybridConfig.checkpoint_every)
    """hybrid: write the checkpoint every this many HRL iterations"""
    log_every: int = resumable(HybridConfig.log_every)
    """hybrid: log (and sync with the device) every this many HRL iterations"""
    rl_weight: float = HybridConfig.rl_weight
    """hybrid: weight of the REINFORCE term beside the cross-entropy (paper: 0.01)"""
    finetune_backbone: bool = HybridConfig.finetune_backbone
    """hybrid: train the backbone too (the paper's full recipe); BatchNorm statistics stay frozen"""
    backbone_lr: float = resumable(HybridConfig.backbone_lr)
    """hybrid: learning rate of the backbone when fine-tuning"""
    rnn_hidden: int = RNN_HIDDEN
    """hybrid_rnn: LSTM hidden size (reference code: 10 in SP, 64 in RL; 64 costs 5% of the default network)"""
    rnn_embed: int = RNN_EMBED
    """hybrid_rnn: size of the pooled activation's embedding fed to the LSTM"""
    rnn_pooling: str = "mean"
    """hybrid_rnn: what the gate reads off the activation: mean (SkipNet's average pool) or mean_max_std"""
    rnn_position_bias: bool = RNN_POSITION_BIAS
    """hybrid_rnn: a learned logit offset per gated block (the data-independent part of the decision)"""
    # BlockDrop (one-shot) agent
    blockdrop_iterations: int = BlockDropConfig.iterations
    """blockdrop: REINFORCE iterations (one batch of num_envs images each)"""
    blockdrop_lr: float = resumable(BlockDropConfig.lr)
    """blockdrop: Adam learning rate of the policy network"""
    blockdrop_width: int = 16
    """blockdrop: channels of the policy network's first layer (then 2x, 4x)"""
    blockdrop_reward: AccuracyReward = BlockDropConfig.accuracy_reward
    """blockdrop: the accuracy term of the reward: neg_ce (negative cross-entropy) or correct (1/0)"""
    blockdrop_explore: float = BlockDropConfig.explore
    """blockdrop: masks sampled from explore * p + (1 - explore) * (1 - p) (BlockDrop's paper: 0.8; 1: off)"""
    # SB3 agents
    timesteps: int = 150_000
    """SB3 agents: environment steps to train for (image-blocks; images for ppo_oneshot)"""
    # fixed policies
    rate: float | None = None
    """random: execute probability of each gated block (default: the rate that spends --budget)"""
    static_mix: bool = True
    """static: spend --budget exactly on average, running the next larger subset on a random share of images"""
    budget: float | None = None
    """fraction of the full network's FLOPs to spend: static (at most) and random (on average), default 0.6; hybrid
    agents (met by the training: the compute weight becomes a Lagrange multiplier, starting at --alpha), default: none,
    --alpha prices compute"""
    # run control
    eval_only: bool = False
    """evaluate --checkpoint without training"""
    checkpoint: str | None = resumable(None)
    """agent checkpoint to evaluate (--eval-only) or to write (default: in the run folder)"""
    resume: bool = resumable(False)
    """continue the run whose checkpoint is --checkpoint"""
    run_dir: str = resumable("runs")
    """TensorBoard and results folder"""
    eval_batch: int | None = resumable(None)
    """images per evaluation batch (default 512 on the CPU, 2048 on CUDA)"""
    progress: bool = resumable(True)
    """show progress bars"""
    debug: bool = resumable(False)
    """show the full traceback of an error (by default a bad option or file gets one line)"""

    def __post_init__(self) -> None:
        """Every numeric option checked before any work, the message naming the flag and its range."""
        problems = []

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                problems.append(f"{flag(name)} must be {rule}, got {getattr(self, name)!r}")

        def finite(name: str) -> bool:
            v = getattr(self, name)
            return isinstance(v, int | float) and math.isfinite(v)

        for name in (
            "rnn_hidden",
            "rnn_embed",
            "timesteps",
            "log_every",
            "checkpoint_every",
            "blockdrop_width",
            "sp_batch",
        ):
            need(getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("num_envs", "eval_batch"):
            need(getattr(self, name) is None or getattr(self, name) >= 1, name, "an integer >= 1")
        need(self.precision in ("auto", *PRECISIONS), "precision", "one of auto, " + ", ".join(PRECISIONS))
        for name in ("sp_epochs", "hrl_iterations"):
            need(getattr(self, name) is None or getattr(self, name) >= 0, name, "an integer >= 0")
        for name in ("sp_alpha_warmup", "seed", "blockdrop_iterations"):
            need(getattr(self, name) >= 0, name, "an integer >= 0")
        for name in ("sp_lr", "hrl_lr", "backbone_lr", "width", "blockdrop_lr", "joint_lr"):
            need(finite(name) and getattr(self, name) > 0, name, "a finite number > 0")
        for name in ("alpha", "entropy_coef", "rl_weight", "joint_alpha"):
            need(finite(name) and getattr(self, name) >= 0, name, "a finite number >= 0")
        need(self.sp_alpha is None or (math.isfinite(self.sp_alpha) and self.sp_alpha >= 0), "sp_alpha", ">= 0")
        need(0.0 <= self.gamma <= 1.0, "gamma", "in [0, 1]")
        need(
            self.budget is None or 0.0 < self.budget <= 1.0,
            "budget",
            "a fraction of the full network's FLOPs in (0, 1]",
        )
        need(self.joint_budget is None or 0.0 < self.joint_budget <= 1.0, "joint_budget", "a FLOPs fraction in (0, 1]")
        need(self.rate is None or 0.0 <= self.rate <= 1.0, "rate", "an execute probability in [0, 1]")
        need(0.0 <= self.backbone_drop_rate < 1.0, "backbone_drop_rate", "in [0, 1)")
        need(self.backbone_drop_schedule in ("linear", "uniform"), "backbone_drop_schedule", "linear or uniform")
        need(self.backbone_recipe in ("base", "skip_ready"), "backbone_recipe", "base or skip_ready")
        need(self.joint_bn in ("train", "frozen"), "joint_bn", "train or frozen")
        need(self.joint_epochs is None or self.joint_epochs >= 1, "joint_epochs", "an integer >= 1")
        need(self.backbone_epochs is None or self.backbone_epochs >= 1, "backbone_epochs", "an integer >= 1")
        need(self.baseline in BASELINES, "baseline", "one of " + ", ".join(BASELINES))
        need(self.rnn_pooling in ("mean", "mean_max_std"), "rnn_pooling", "mean or mean_max_std")
        need(self.blockdrop_reward in ("neg_ce", "correct"), "blockdrop_reward", "neg_ce or correct")
        need(0.5 < self.blockdrop_explore <= 1.0, "blockdrop_explore", "in (0.5, 1]")
        if problems:
            raise ValueError("; ".join(problems))

    def joint_config(self) -> JointConfig:
        """The joint SP stage of ``backbone_recipe="skip_ready"``: its seed is the run's, its batch the base
        training's on every device."""
        return JointConfig(
            epochs=self.joint_epochs,
            lr=self.joint_lr,
            alpha=self.joint_alpha,
            budget=self.joint_budget,
            sample=self.joint_sample,
            bn=self.joint_bn,
            seed=self.seed,
        )

    def gate_options(self) -> dict[str, Any]:
        """The recurrent gate's options (``hybrid_rnn``'s, and the gates joint SP trains)."""
        return {
            "hidden_size": self.rnn_hidden,
            "embed_dim": self.rnn_embed,
            "pooling": self.rnn_pooling,
            "position_bias": self.rnn_position_bias,
        }

    def asks_other_compute(self) -> bool:
        """Whether ``--budget`` or ``--alpha`` asks the hybrid gates for another compute than the one
        joint SP trained them to spend (``--joint-budget``)."""
        return self.budget not in (None, self.joint_budget) or (self.budget is None and self.alpha != DEFAULT_ALPHA)

    def for_device(self, device: torch.device, max_batch: int | None = None) -> RunConfig:
        """This configuration with the options left unset filled in: the batch sizes for ``device``
        (the environment's at most ``max_batch``, the training set's size) and the hybrid stages'
        lengths for the backbone recipe."""
        defaults: dict[str, Any] = {**DEVICE_BATCHES["cuda" if device.type == "cuda" else "cpu"]}
        if max_batch is not None:
            defaults["num_envs"] = min(defaults["num_envs"], max_batch)
        defaults.update(RECIPE_STAGES[self.backbone_recipe])
        if self.backbone_recipe == "skip_ready" and self.agent.startswith("hybrid_"):
            if self.agent != JOINT_GATES_AGENT:  # other gates than joint SP's start untrained: the full SP
                defaults["sp_epochs"] = HybridConfig.sp_epochs
            elif self.asks_other_compute():  # the joint gates re-priced for another compute
                defaults["sp_epochs"] = SKIP_READY_REPRICE_EPOCHS
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def batch_sizes(self) -> tuple[int, int]:
        """``(num_envs, eval_batch)`` of a configuration :meth:`for_device` has resolved."""
        if self.num_envs is None or self.eval_batch is None:
            raise RuntimeError("the batch sizes are set by the device: call for_device() first")
        return self.num_envs, self.eval_batch

    def differences(self, other: RunConfig) -> dict[str, tuple]:
        """``{field: (mine, other's)}`` for every field that differs."""
        return {
            f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        }


# the options a resumed run may change: the fields declared resumable()
SAFE_ON_RESUME = frozenset(f.name for f in fields(RunConfig) if f.metadata.get("resumable"))
