"""The recipe's second stage: SkipNet's hybrid RL (HRL) after joint SP, cached like the stages before it.

    base training ──► joint SP (backbone + gates) ──► HRL (backbone + gates) ──► skip-ready backbone (+ its gates)

From the joint gates, REINFORCE on routes sampled in the environment (its reward is the one
optimised: the negative cross-entropy minus ``alpha`` times the compute; with a budget, the compute's
price is a multiplier that meets it), the self-critical baseline, and the backbone trained by
cross-entropy through the blocks the sampled routes execute: the paper's HRL, :class:`agents.hybrid.
HybridTrainer` with the backbone fine-tuned. The result is a skip-ready backbone checkpoint like joint
SP's (``metadata["skip_ready"]`` holds joint SP's record and this stage's, ``hrl``), with the gates HRL
trained beside it; from there on it is frozen and every agent routes it (SkipNet's gates start from
its gates, PPO may too). Joint SP's gates are thresholds, with logits close to 0: HRL samples from
``sigmoid(s x logit)``, ``s`` set at its start so that a decision leaves the greedy one 10% of the
time (``explore``), not from their own near-coin-flip probabilities. Validation chose this stage
over joint SP alone at 50% of the FLOPs, 3 seeds, each with its own base network: +1.42 points on
validation with 300 iterations on one machine (BENCHMARKS.md section 18; test +1.55), +0.53 with
200 on a second (section 20; test +0.46 [+0.25, +0.68]); on better trained base networks with joint SP's
distillation it adds nothing validation can see (section 21: +0.02 [-0.28, +0.35] with 100 iterations); with
its price held at the budget (from joint SP's multiplier, moved every 10 iterations), validation +0.37 [+0.07,
+0.68] and test +0.00 [-0.21, +0.19] (section 23).

The stage is keyed by everything that changes its result: the joint backbone and gates, this
stage's options, the budget, the seed, the precision and the training images. It writes its
trainer's checkpoint every ``checkpoint_every`` iterations and resumes an interrupted run exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from agents.evaluate import calibrate_threshold, evaluate
from agents.hybrid import EXPLORE, HRLConfig, HybridConfig, HybridTrainer, SPConfig
from agents.policies import GateRoutingPolicy
from agents.skip_ready import JOINT_GATE_KIND, load_gates
from agents.trainer import CHECKPOINT_EVERY
from backbones.base import Backbone
from backbones.cache import building, cache_dir, content_key, file_name
from backbones.checkpoint import atomic_save, backbone_metadata, fingerprint, load_backbone, safe_load
from backbones.data import Dataset
from backbones.device import resolve_precision
from backbones.distributed import ranks
from backbones.options import COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT, check_options, option
from skipnet_env.core import DEFAULT_ALPHA

log = logging.getLogger(__name__)

# part of the cache key: raise it when a change to this stage changes the backbones it makes
RECIPE_HRL_VERSION = 3


# the budget's price reaches the reward every PRICE_EVERY iterations (the hybrid agents' log_every, 50, moved it once
# in the stage's 100: the gates fell to 28-36% of the FLOPs for a budget of 50%, BENCHMARKS.md section 23)
PRICE_EVERY = 10


def start_price(joint_meta: dict[str, Any]) -> float:
    """The compute's price HRL starts at: the multiplier joint SP ended with, which held its gates at the budget
    (``DEFAULT_ALPHA`` for a joint backbone without its history)."""
    history = joint_meta["skip_ready"].get("history") or []
    return float(history[-1]["compute_weight"]) if history else DEFAULT_ALPHA


@dataclass
class RecipeHRLConfig:
    """The recipe's HRL (--backbone-recipe skip_ready): after joint SP, REINFORCE through the environment with the
    backbone trained through the executed blocks; the backbone is then frozen for every agent.

    Its budget is joint SP's (--joint-budget), its seed the run's; the compute's price starts where joint SP's
    multiplier ended, whatever a run's --alpha (every agent routes the same backbone)."""

    flag_prefix: ClassVar[str] = "recipe_hrl_"

    iterations: int = option(100, COUNT)
    """skip_ready: HRL iterations after joint SP, one batch of --recipe-hrl-batch episodes each (0: no HRL stage; 100:
    validation prefers it to 200 and 300 (BENCHMARKS.md sections 21 and 23) at a third of the time)"""
    lr: float = option(1e-4, POSITIVE)
    """skip_ready: Adam learning rate of the gates in the recipe's HRL"""
    finetune_lr: float = option(1e-4, POSITIVE)
    """skip_ready: Adam learning rate of the backbone in the recipe's HRL"""
    rl_weight: float = option(0.01, NON_NEGATIVE)
    """skip_ready: weight of the REINFORCE term beside the cross-entropy in the recipe's HRL (paper: 0.01)"""
    batch: int = option(128, POSITIVE_INT)
    """skip_ready: episodes (images) per iteration of the recipe's HRL, on every device"""
    baseline: Literal["self_critical", "batch_mean", "none"] = "self_critical"
    """skip_ready: REINFORCE's baseline in the recipe's HRL: self_critical (the greedy route's return on the same
    image: a second forward of every batch, about a third of an iteration), batch_mean (none), none"""
    explore: float | None = option(0.1, EXPLORE)
    """skip_ready: the recipe's HRL samples each decision off joint SP's greedy one with this probability at its start
    (--hrl-explore; 0.1 chosen on validation over 0.03 and None, the gates' own probabilities, which for joint SP's
    thresholded gates are close to coin flips: BENCHMARKS.md section 18)"""
    keep: Literal["validation", "always"] = "validation"
    """skip_ready: validation: HRL's network and gates are kept only where, both calibrated to the budget, they score
    at least joint SP's on validation images (else the stage hands joint SP's on: BENCHMARKS.md section 12, a harder
    data set where HRL loses 3 points); always: HRL's"""

    def __post_init__(self) -> None:
        check_options(self)

    def hybrid(self) -> HybridConfig:
        """The hybrid trainer's settings for this stage: no SP, HRL with the backbone trained."""
        hrl = HRLConfig(
            iterations=self.iterations, lr=self.lr, explore=self.explore, baseline=self.baseline,
            rl_weight=self.rl_weight, finetune_backbone=True, finetune_lr=self.finetune_lr, log_every=PRICE_EVERY,
        )  # fmt: skip
        return HybridConfig(SPConfig(epochs=0), hrl)

    def epochs(self, train_size: int) -> float:
        """Epochs of training the stage gives the backbone (for a same-epochs control)."""
        return self.iterations * self.batch / train_size


def recipe_hrl_identity(cfg: RecipeHRLConfig, budget: float | None, seed: int, precision: str) -> dict[str, Any]:
    """What names the stage in a checkpoint's metadata and its cache key (with the joint backbone's)."""
    named = dataclasses.asdict(cfg)
    # named only where they differ from the stage before them, so that the stages cached then keep their keys
    for option_name, before in (("baseline", "self_critical"), ("explore", None)):
        if named[option_name] == before:
            del named[option_name]
    return {**named, "budget": budget, "seed": seed, "precision": precision}


def recipe_hrl_path(
    joint_meta: dict[str, Any], joint_fingerprint: str, identity: dict[str, Any], data: str, validation: str | None
) -> Path:
    """Where the cache keeps the backbone HRL makes from the joint backbone ``joint_fingerprint`` (its
    gates: ``joint_meta``'s) with ``identity`` on the training images of fingerprint ``data``, and the
    validation images of fingerprint ``validation`` (they choose which gates the stage hands on)."""
    key = content_key(
        {
            "version": RECIPE_HRL_VERSION,
            "joint": joint_fingerprint,
            "gates": joint_meta["skip_ready"]["gates"],
            "joint_config": joint_meta["skip_ready"]["joint_config"],
            "hrl": identity,
            "data": data,
            "validation": validation,
        }
    )
    return (
        cache_dir()
        / "backbones"
        / f"skipready-{file_name(joint_meta['arch'])}-{file_name(joint_meta['dataset'])}-hrl-{key}.pt"
    )


def get_recipe_hrl(
    joint: Backbone,
    joint_meta: dict[str, Any],
    train_data: Dataset,
    cfg: RecipeHRLConfig,
    device: torch.device,
    *,
    budget: float | None,
    seed: int = 0,
    precision: str = "auto",
    val_data: Dataset | None = None,
    eval_batch: int = 512,
    progress: bool = True,
    checkpoint_every: int = CHECKPOINT_EVERY,
    path: Path | None = None,
) -> tuple[Backbone, dict[str, Any]]:
    """The skip-ready backbone HRL makes from joint SP's (``joint``, its checkpoint's metadata
    ``joint_meta``, whose gates HRL starts from): trained on first use, then cached. With
    ``cfg.iterations == 0``, the joint backbone as it is.

    ``joint`` is not modified (the stage trains a copy). Returns the backbone (eval mode, frozen) and
    its checkpoint's metadata, with ``metadata["checkpoint"]`` its path (its gates stored there too:
    :func:`agents.skip_ready.load_gates`) and ``metadata["skip_ready"]["hrl"]`` the stage's identity
    and, with ``val_data``, what it did on validation images (the gates before and after, greedy).
    """
    if cfg.iterations == 0:
        return joint, joint_meta
    if joint_meta["skip_ready"]["gates"]["kind"] != JOINT_GATE_KIND:
        raise ValueError(f"the recipe's HRL continues joint SP's {JOINT_GATE_KIND} gates; this backbone has others")
    precision_name = str(resolve_precision(precision, device)).removeprefix("torch.")
    identity = recipe_hrl_identity(cfg, budget, seed, precision_name)
    validation = None if val_data is None else val_data.fingerprint
    path = path or recipe_hrl_path(joint_meta, fingerprint(joint), identity, train_data.fingerprint, validation)
    training = path.with_name(path.stem + ".training.pt")  # the trainer's own checkpoint, while it runs
    with building(path):  # a second process wanting this backbone waits, then reuses it
        if path.is_file():
            log.info("reusing the recipe's HRL backbone %s", path)
            net, meta = load_backbone(path, map_location=device)
            return net.to(device).eval(), {**meta, "checkpoint": str(path)}
        backbone = copy.deepcopy(joint).to(device)
        gates = load_gates(joint_meta["checkpoint"], backbone, device)
        trainer = HybridTrainer(
            backbone, gates, train_data, cfg.hybrid(), device, training, {"recipe_hrl": identity}, None, progress,
            budget=budget, num_envs=cfg.batch, alpha=start_price(joint_meta), seed=seed, precision=precision,
            checkpoint_every=checkpoint_every,
        )  # fmt: skip
        if training.is_file():
            trainer.resume()
        gates = trainer.train()
        backbone.eval().requires_grad_(False)
        record: dict[str, Any] = {**identity, "kept": "hrl"}
        if val_data is not None:
            joint_gates = load_gates(joint_meta["checkpoint"], joint, device)
            for name, net, g in (("before", joint, joint_gates), ("after", backbone, gates)):
                policy = GateRoutingPolicy(g, "recipe")
                result = evaluate(policy, net, val_data, device, eval_batch, precision=precision)
                record[f"val_accuracy_{name}"], record[f"val_flops_{name}"] = result.accuracy, result.flops_fraction
                if budget is not None and cfg.keep == "validation":  # the two compared at the same compute
                    _, at_budget = calibrate_threshold(
                        policy, net, val_data, budget, device, eval_batch, precision, start=result
                    )
                    record[f"val_accuracy_{name}_at_budget"] = at_budget.accuracy
            log.info(
                "the recipe's HRL (%d iterations): validation %.2f%% at %.1f%% of the FLOPs -> %.2f%% at %.1f%%",
                cfg.iterations, 100 * record["val_accuracy_before"], 100 * record["val_flops_before"],
                100 * record["val_accuracy_after"], 100 * record["val_flops_after"],
            )  # fmt: skip
            if record.get("val_accuracy_after_at_budget", 1.0) < record.get("val_accuracy_before_at_budget", 0.0):
                record["kept"] = "joint"  # validation chose joint SP's network and gates: the stage hands them on
                backbone, gates = joint, joint_gates
                log.info(
                    "validation keeps joint SP's gates: %.2f%% against HRL's %.2f%%, both at %.0f%% of the FLOPs",
                    100 * record["val_accuracy_before_at_budget"], 100 * record["val_accuracy_after_at_budget"],
                    100 * (budget or 0.0),
                )  # fmt: skip
        identity_of_data = {k: v for k, v in joint_meta.items() if k == "data_fingerprint"}
        meta = backbone_metadata(
            backbone,
            joint_meta["dataset"],
            complete=True,
            skip_ready={**joint_meta["skip_ready"], "hrl": record, "joint_checkpoint": joint_meta["checkpoint"]},
            **identity_of_data,
        )
        here = ranks()  # under torchrun: every rank trained, rank 0 writes
        if here.main:
            atomic_save({"metadata": meta, "model": backbone.state_dict(), "gates": gates.state_dict()}, path)
        here.barrier()
        training.unlink(missing_ok=True)
        return backbone, {**safe_load(path)["metadata"], "checkpoint": str(path)}
