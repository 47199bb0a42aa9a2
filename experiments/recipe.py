"""The recipe's stages before an agent trains: the base network, joint SP, the recipe's HRL (the
skip-ready backbone), ``--max-drop``'s search for the cheapest joint budget that keeps the accuracy,
and how many epochs the routed network was trained in all (what a same-epochs control trains for)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, cast

import torch

from agents.evaluate import calibrate_threshold, evaluate
from agents.policies import GateRoutingPolicy, RoutingPolicy
from agents.recipe_hrl import get_recipe_hrl
from agents.skip_ready import JOINT_GATE_KIND, get_skip_ready, load_gates
from agents.statistics import paired_difference
from backbones.checkpoint import load_backbone
from backbones.data import Dataset, data_fingerprint, groups_of, load_splits, with_flip
from backbones.options import replace
from backbones.pretrained import get_trained
from backbones.registry import options
from experiments.config import JOINT_GATES_AGENT, RunConfig

log = logging.getLogger("skipnet_gym.recipe")


def run_splits(cfg: RunConfig) -> dict[str, Dataset]:
    """The run's data: its train, val and test splits."""
    return load_splits(cfg.dataset, cfg.data_root, cfg.download, cfg.image_size)


def load_backbone_for(cfg: RunConfig, device: torch.device, splits: dict[str, Dataset]) -> tuple[Any, dict]:
    """The backbone the run's agents route, and its checkpoint's metadata.

    The base network is ``--backbone-checkpoint`` (refused when it was made on other data), or the
    registry backbone trained on the data (cached by the data's contents). With ``--backbone-recipe
    skip_ready`` it is trained further with its gates (joint SP, then the recipe's HRL; each cached)
    and the metadata holds ``base``, the base network; a checkpoint that is skip-ready already is used
    as it is.

    Under ``torchrun`` every stage trains on every rank (data-parallel); ``run.py`` decides where the
    ranks other than 0 end (before an agent that trains in one process, else after it).
    """
    base, meta = load_base_backbone(cfg, device, splits)
    if cfg.backbone_recipe == "base" or "skip_ready" in meta:
        return base, meta
    if cfg.max_drop is not None:
        net, ready_meta = search_budget(cfg, device, splits, base, meta)
        cfg = replace(cfg, joint_budget=ready_meta["max_drop"]["chosen_budget"])
    else:
        net, ready_meta = skip_ready(cfg, device, splits, base, meta)
    net, hrl_meta = recipe_hrl(cfg, device, splits, net, ready_meta)
    return net, {**hrl_meta, **{k: ready_meta[k] for k in ("max_drop",) if k in ready_meta}, "base": base}


def skip_ready(cfg: RunConfig, device: torch.device, splits: dict[str, Dataset], base: Any, meta: dict) -> tuple:
    """The skip-ready backbone joint SP makes from ``base`` with ``cfg.joint`` (cached), and its metadata."""
    train = with_flip(splits["train"], cfg.backbone_training.flip)  # joint SP augments as the base training did
    return get_skip_ready(
        base, meta, train, cfg.joint, JOINT_GATE_KIND, cfg.gates.options(), device,
        progress=cfg.progress, seed=cfg.seed, precision=cfg.backbone_training.precision,
    )  # fmt: skip


def recipe_hrl(cfg: RunConfig, device: torch.device, splits: dict[str, Dataset], joint: Any, joint_meta: dict) -> tuple:
    """The skip-ready backbone the recipe's HRL makes from joint SP's (``--recipe-hrl-*``, cached), at
    joint SP's budget, and its metadata (joint SP's, where the stage is off)."""
    return get_recipe_hrl(
        joint, joint_meta, splits["train"], cfg.recipe_hrl, device, budget=cfg.joint.budget, seed=cfg.seed,
        precision=cfg.precision, val_data=splits["val"], eval_batch=cfg.for_device(device).batch_sizes()[1],
        progress=cfg.progress, checkpoint_every=cfg.checkpoint_every,
    )  # fmt: skip


def keeps_accuracy(vs_base: dict[str, Any], max_drop: float) -> bool:
    """Whether a paired difference against the base network (:func:`agents.statistics.paired_difference`,
    as fractions) is within ``max_drop`` points, its whole 95% interval: the interval's low end is at most
    ``max_drop`` points below zero (exactly ``max_drop`` counts, whatever the float rounding)."""
    return -100 * vs_base["ci95"][0] <= max_drop + 1e-9


def search_budget(
    cfg: RunConfig, device: torch.device, splits: dict[str, Dataset], base: Any, meta: dict
) -> tuple[Any, dict]:
    """``--max-drop``: the skip-ready backbone of the cheapest of ``--max-drop-budgets`` whose joint
    gates, calibrated to spend the budget on validation images (as the run's gates will be), keep the
    validation accuracy within ``--max-drop`` points of the base network's: the 95% interval of their
    paired difference on the validation images (over source digits where the data has them) must lie
    above minus the drop, not only its point, which the cheapest budget passes by chance as often as
    not (tried from the cheapest up; each a cached joint SP; the recipe's HRL then runs on the choice
    alone, and keeps its own gates only where they score at least these). Where none is, the one whose
    interval reaches highest, with a warning. The metadata's ``max_drop`` holds the search (every budget
    tried, its validation figures) and the choice. Only validation images are seen."""
    batch, max_drop = cfg.for_device(device).batch_sizes()[1], cfg.max_drop
    assert max_drop is not None
    val_groups = groups_of(splits["val"])

    def on_val(policy: RoutingPolicy, net: Any) -> Any:
        return evaluate(policy, net, splits["val"], device, batch, precision=cfg.precision)

    base_val = on_val(RoutingPolicy(), base)
    tried: list[dict[str, Any]] = []
    best: tuple[Any, dict, dict] | None = None  # the surest so far, the choice where none is within reach
    for budget in sorted(cfg.max_drop_budgets):
        net, ready_meta = skip_ready(replace(cfg, joint_budget=budget), device, splits, base, meta)
        gates = GateRoutingPolicy(load_gates(ready_meta["checkpoint"], net, device), JOINT_GATES_AGENT)
        _, val = calibrate_threshold(gates, net, splits["val"], budget, device, batch, cfg.precision)
        vs_base = paired_difference(val.per_image["correct"], base_val.per_image["correct"], cfg.seed, val_groups)
        low, high = cast(list[float], vs_base["ci95"])
        tried.append(
            {
                "budget": budget, "val_accuracy": val.accuracy, "val_flops_fraction": val.flops_fraction,
                "val_vs_base": vs_base,
            }
        )  # fmt: skip
        log.info(
            "--max-drop: joint budget %.2f, calibrated: validation %.2f%% at %.1f%% of the FLOPs, "
            "%+.2f [%+.2f, %+.2f] against the base network (%.2f%%)",
            budget, 100 * val.accuracy, 100 * val.flops_fraction, 100 * vs_base["difference"],
            100 * low, 100 * high, 100 * base_val.accuracy,
        )  # fmt: skip
        if best is None or low > best[2]["val_vs_base"]["ci95"][0]:
            best = (net, ready_meta, tried[-1])
        if keeps_accuracy(vs_base, max_drop):
            best = (net, ready_meta, tried[-1])
            break
    else:
        log.warning(
            "warning: no joint budget of %s keeps the validation accuracy within %.2f points of the base network's "
            "(%.2f%%; the paired difference's 95%% interval): the one whose interval reaches highest is used. "
            "Try higher --max-drop-budgets, or a larger --max-drop.",
            cfg.max_drop_budgets, max_drop, 100 * base_val.accuracy,
        )  # fmt: skip
    assert best is not None
    net, ready_meta, pick = best
    search = {
        "base_val_accuracy": base_val.accuracy, "tried": tried, "chosen_budget": pick["budget"],
        "met": keeps_accuracy(pick["val_vs_base"], max_drop),
    }  # fmt: skip
    return net, {**ready_meta, "max_drop": search}


def load_base_backbone(cfg: RunConfig, device: torch.device, splits: dict[str, Dataset]) -> tuple[Any, dict]:
    train_data = splits["train"]
    if cfg.backbone_checkpoint:
        net, meta = load_backbone(
            cfg.backbone_checkpoint,
            dataset=cfg.dataset,
            num_classes=train_data.num_classes,
            input_size=train_data.input_size,
            data_fingerprint=data_fingerprint(splits.values()),
            map_location=device,
        )
        return net, {**meta, "checkpoint": cfg.backbone_checkpoint}
    options(cfg.backbone)  # an unknown name is refused with the valid ones
    overrides: dict[str, Any] = {
        "image_size": train_data.input_size[1],
        **dataclasses.asdict(cfg.backbone_training),
        "seed": cfg.seed if cfg.backbone_training.seed is None else cfg.backbone_training.seed,
        "device": str(device),
        "progress": cfg.progress,
        "data_root": cfg.data_root,
        "download": cfg.download,
    }
    if "width" in options(cfg.backbone):
        overrides["width"] = cfg.width
    if "model_args" in options(cfg.backbone):
        overrides["model_args"] = cfg.backbone_args
    return get_trained(cfg.backbone, cfg.dataset, **overrides)


def training_epochs(cfg: RunConfig, backbone_meta: dict[str, Any], train_size: int) -> dict[str, float]:
    """Epochs of training the routed network received, by stage (``base``, ``joint_sp``, ``hrl``: the
    recipe's, and ``agent_hrl`` where the agent's own HRL trains the backbone too): what a same-epochs
    control, the base network trained as long, is trained for. Empty where the base network's training
    is unknown (a checkpoint of unknown origin)."""
    ready = backbone_meta.get("skip_ready")
    base = (ready.get("base_train_config") if ready else backbone_meta.get("train_config")) or {}
    if "epochs" not in base:
        return {}
    epochs = {"base": float(base["epochs"])}
    if ready:
        epochs["joint_sp"] = float(ready["joint_config"]["epochs"])
        hrl = ready.get("hrl")
        if hrl and hrl.get("kept", "hrl") == "hrl":  # the recipe's HRL trained the network handed on
            epochs["hrl"] = hrl["iterations"] * hrl["batch"] / train_size
    if cfg.agent.startswith("hybrid_") and cfg.hybrid.finetunes():
        epochs["agent_hrl"] = cfg.hybrid.stages()[1] * cfg.batch_sizes()[0] / train_size
    return epochs
