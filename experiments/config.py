"""The configuration of one run: which agent, on which backbone and data, with which budget.

One tree: the run's own options at the top (the agent, the backbone and data, the cross-cutting
values every part is given explicitly: ``alpha``, ``budget``, ``seed``, ``device``, ``precision``,
the batch sizes), and below them the parts each module owns, with their defaults, rules and help
(:class:`backbones.train.BaseTraining`, :class:`agents.skip_ready.JointConfig`,
:class:`agents.recipe_hrl.RecipeHRLConfig`, :class:`agents.hybrid.HybridConfig`,
:class:`agents.gates.RecurrentGateConfig`; and each agent's own, as the agent registered it:
``agent_options``, :func:`agents.registry.agent_parts`). The command line sees it flat, one flag per
option (``--sp-lr``, ``--joint-budget``, ``--blockdrop-width``): :mod:`backbones.options`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from agents.gates import RecurrentGateConfig
from agents.hybrid import HRL_ITERATIONS, SP_EPOCHS, HybridConfig
from agents.recipe_hrl import RecipeHRLConfig
from agents.registry import agent_parts
from agents.skip_ready import JOINT_GATE_KIND, JointConfig
from agents.trainer import CHECKPOINT_EVERY, RunValues
from backbones.device import Precision
from backbones.options import (
    COUNT,
    FLOPS_FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Rule,
    check_options,
    flatten,
    nested,
    option,
    parts,
    replace,
    resumable_options,
)
from backbones.train import BaseTraining
from skipnet_env.core import DEFAULT_ALPHA

BackboneRecipe = Literal["base", "skip_ready"]

# the hybrid agents' stages by backbone recipe: on a skip-ready backbone the recipe trained the gates already (joint
# SP, then its HRL: agents.recipe_hrl), for --joint-budget; other gates than the recipe's get the full SP there, and
# no HRL (RunConfig.for_device)
RECIPE_STAGES: dict[str, dict[str, Any]] = {
    "base": {"sp_epochs": SP_EPOCHS, "hrl_iterations": HRL_ITERATIONS, "hrl_finetune_backbone": False},
    "skip_ready": {"sp_epochs": 0, "hrl_iterations": 0, "hrl_finetune_backbone": False},
}
# SP epochs that re-price a skip-ready backbone's gates for a budget other than the one joint SP trained them for
SKIP_READY_REPRICE_EPOCHS = 3
# the agent whose gates joint SP trains
JOINT_GATES_AGENT = f"hybrid_{JOINT_GATE_KIND}"

# batch sizes by device: a GPU needs about a thousand images in flight to be busy, a CPU core does not
DEVICE_BATCHES = {
    "cuda": {"num_envs": 1024, "eval_batch": 2048},
    "cpu": {"num_envs": 128, "eval_batch": 512},
}


@dataclass
class RunConfig:
    """Train and evaluate a routing agent on a frozen backbone (SkipNet-Gym)."""

    flag_prefix: ClassVar[str] = ""  # an entry point's run, nested (reproduce.py, sweep.py): its flags as run.py's

    agent: str = "hybrid_rnn"
    """routing agent (listed below the options; an unknown name lists them too)"""
    agents_from: tuple[str, ...] = ()
    """import these .py files or modules first: their agents register themselves and can be given to --agent
    (README: "Add an agent")"""
    # what the agents route: the backbone and its data
    backbone: str = "cifar_resnet38"
    """backbone registry name (trained on --dataset and cached on first use), or a model zoo's: timm:<model> (ResNets,
    ViTs: timm:vit_tiny_patch16_224), torchvision:<model> (ResNets)"""
    backbone_args: tuple[str, ...] = ()
    """zoo backbones (timm:<model>, torchvision:<model>): the model's own keyword arguments, key=value (depth=6
    embed_dim=64 num_heads=2 patch_size=4)"""
    backbone_checkpoint: str | None = None
    """use this backbone checkpoint instead of the cached one"""
    dataset: str = "cluttered_digits"
    """data set: cluttered_digits, cluttered_digits_hard or digits (embedded, offline), mnist, cifar10, cifar100, svhn,
    imagefolder, npz"""
    data_root: str | None = None
    """folder with the data set's files (default $SKIPNET_DATA or ./data)"""
    download: bool = True
    """download the data set when its files are missing"""
    width: float = option(0.5, POSITIVE)
    """channel multiplier of CIFAR ResNet backbones"""
    image_size: int | None = option(None, POSITIVE_INT)
    """square input side (default: the data set's own; 16 for digits)"""
    backbone_recipe: BackboneRecipe = "skip_ready"
    """base: the backbone as trained (frozen); skip_ready: the base backbone trained further with its gates (joint
    SP, the paper's recipe), then frozen: every agent runs on it"""
    # the cross-cutting values, given to every part as they are
    alpha: float = option(DEFAULT_ALPHA, NON_NEGATIVE)
    """weight of compute in the reward: each block costs alpha x its share of the full network's FLOPs"""
    budget: float | None = option(None, FLOPS_FRACTION)
    """fraction of the full network's FLOPs to spend: static (at most) and random (on average), default 0.6; hybrid
    agents (met by the training: the compute weight becomes a Lagrange multiplier, starting at --alpha), default: none,
    --alpha prices compute"""
    max_drop: float | None = option(None, NON_NEGATIVE)
    """hybrid_rnn on a skip-ready backbone: ask for accuracy, get the least compute: the cheapest of
    --max-drop-budgets whose joint gates, calibrated to the budget, keep the validation accuracy within this many
    points of the base network's, the whole 95% interval of the paired difference (searched from the cheapest up,
    each a cached joint SP; replaces --joint-budget)"""
    max_drop_budgets: tuple[float, ...] = option(
        (0.35, 0.5, 0.6, 0.7, 0.85), Rule(lambda v: len(v) > 0 and all(0 < b <= 1 for b in v), "fractions in (0, 1]")
    )
    """the joint SP budgets --max-drop searches, cheapest first"""
    seed: int = option(0, COUNT)
    """seed for python, numpy, torch and the environment"""
    device: str = option("auto", resumable=True)
    """torch device: auto, cpu, cuda, ..."""
    precision: Precision = "auto"
    """compute precision of the frozen backbone: auto (bf16 on CUDA, fp32 elsewhere), fp32 or bf16"""
    num_envs: int | None = option(None, POSITIVE_INT)
    """images per batch in the environment (B; default 128 on the CPU, 1024 on CUDA)"""
    eval_batch: int | None = option(None, POSITIVE_INT, resumable=True)
    """images per evaluation batch (default 512 on the CPU, 2048 on CUDA)"""
    entropy_coef: float = option(0.0, NON_NEGATIVE)
    """hybrid, blockdrop: weight of the policy's entropy bonus (keeps the decisions exploring)"""
    calibrate: bool = True
    """hybrid agents, and PPO started from the recipe's gates: after training, move the threshold until the
    validation images spend the budget (--budget; on a skip-ready backbone without --budget or --alpha, and for PPO,
    --joint-budget) to within 0.5% of the FLOPs (p >= 0.5 where it already does); --no-calibrate: as trained"""
    checkpoint_every: int = option(CHECKPOINT_EVERY, POSITIVE_INT, resumable=True)
    """hybrid, blockdrop: write the checkpoint every this many iterations"""
    # the parts, each owned by the module it configures: the recipe's, then each agent's own as it registered it
    backbone_training: BaseTraining = nested(BaseTraining)
    joint: JointConfig = nested(JointConfig)
    recipe_hrl: RecipeHRLConfig = nested(RecipeHRLConfig)
    hybrid: HybridConfig = nested(HybridConfig)
    gates: RecurrentGateConfig = nested(RecurrentGateConfig)
    agent_options: dict[str, Any] = parts(agent_parts)
    # run control
    eval_only: bool = False
    """evaluate --checkpoint without training"""
    checkpoint: str | None = option(None, resumable=True)
    """agent checkpoint to evaluate (--eval-only) or to write (default: in the run folder)"""
    resume: bool = option(False, resumable=True)
    """continue the run whose checkpoint is --checkpoint"""
    run_dir: str = option("runs", resumable=True)
    """TensorBoard and results folder"""
    torch_deterministic: bool = option(False, resumable=True)
    """ask cuDNN for deterministic kernels"""
    progress: bool = option(True, resumable=True)
    """show progress bars"""
    debug: bool = option(False, resumable=True)
    """show the full traceback of an error (by default a bad option or file gets one line)"""

    def __post_init__(self) -> None:
        check_options(self)  # the parts checked themselves as they were made

    def asks_other_compute(self) -> bool:
        """Whether ``--budget`` or ``--alpha`` asks the hybrid gates for another compute than the one
        joint SP trained them to spend (``--joint-budget``)."""
        return self.budget not in (None, self.joint.budget) or (self.budget is None and self.alpha != DEFAULT_ALPHA)

    def with_budget_recipe(self) -> RunConfig:
        """On a skip-ready backbone, ``hybrid_rnn``'s ``--budget B`` is met by joint SP at ``B`` (its
        own skip-ready backbone, cached), not by re-pricing the gates of another budget on a frozen
        network: validation chose it (BENCHMARKS.md section 12: +2.6 points at 0.35, +0.4 at 0.7)."""
        reprices = self.budget is not None and self.budget != self.joint.budget
        if self.agent == JOINT_GATES_AGENT and self.backbone_recipe == "skip_ready" and reprices:
            return replace(self, joint_budget=self.budget)
        return self

    def for_device(self, device: torch.device, max_batch: int | None = None, joint_gates: bool = True) -> RunConfig:
        """This configuration with the options left unset filled in: the batch sizes for ``device``
        (the environment's at most ``max_batch``, the training set's size) and the hybrid stages'
        lengths for the backbone recipe. ``joint_gates``: whether the skip-ready backbone carries gates
        the agent starts from (:func:`agents.skipnet.starts_from_joint_gates`); gates that start new
        are trained by the full SP, never evaluated untrained."""
        cfg = self.with_budget_recipe()
        defaults: dict[str, Any] = {**DEVICE_BATCHES["cuda" if device.type == "cuda" else "cpu"]}
        if max_batch is not None:
            defaults["num_envs"] = min(defaults["num_envs"], max_batch)
        defaults.update(RECIPE_STAGES[cfg.backbone_recipe])
        if cfg.backbone_recipe == "skip_ready" and cfg.agent.startswith("hybrid_"):
            if cfg.agent != JOINT_GATES_AGENT or not joint_gates:  # gates that start untrained: the full SP
                defaults["sp_epochs"] = SP_EPOCHS
            elif cfg.asks_other_compute():  # the recipe's gates re-priced for another compute (--alpha)
                defaults["sp_epochs"] = SKIP_READY_REPRICE_EPOCHS
        mine = flatten(cfg)
        return replace(cfg, **{k: v for k, v in defaults.items() if mine[k] is None})

    def calibration_budget(self, joint_gates: bool) -> float | None:
        """The FLOPs fraction a hybrid agent's gates are calibrated to spend on validation images
        (``--calibrate``): ``--budget``, or the joint budget where the agent uses the joint gates as
        joint SP trained them (``joint_gates``, no other compute asked for); ``None``: no budget applies."""
        if not (self.agent.startswith("hybrid_") and self.calibrate):
            return None
        if self.budget is not None:
            return self.budget
        reused = self.agent == JOINT_GATES_AGENT and self.backbone_recipe == "skip_ready" and joint_gates
        return self.joint.budget if reused and not self.asks_other_compute() else None

    def batch_sizes(self) -> tuple[int, int]:
        """``(num_envs, eval_batch)`` of a configuration :meth:`for_device` has resolved."""
        if self.num_envs is None or self.eval_batch is None:
            raise RuntimeError("the batch sizes are set by the device: call for_device() first")
        return self.num_envs, self.eval_batch

    def run_values(self) -> RunValues:
        """What every trainer is given of the run (a configuration :meth:`for_device` has resolved)."""
        return {
            "num_envs": self.batch_sizes()[0],
            "alpha": self.alpha,
            "entropy_coef": self.entropy_coef,
            "seed": self.seed,
            "precision": self.precision,
            "checkpoint_every": self.checkpoint_every,
        }

    def differences(self, other: RunConfig) -> dict[str, tuple]:
        """``{option: (mine, other's)}`` for every option that differs (flat names)."""
        mine, theirs = flatten(self), flatten(other)
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}


# the options a resumed run may change: those declared resumable
SAFE_ON_RESUME = resumable_options(RunConfig)
