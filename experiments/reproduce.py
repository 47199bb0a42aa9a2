"""SkipNet's CIFAR table, reproduced by one command: base -> joint SP -> HRL, our figures beside the paper's.

    python experiments/reproduce.py                      # the embedded preset: CPU minutes
    python experiments/reproduce.py --preset cifar10     # the paper's ResNet-38/74/110 on CIFAR-10 (a GPU's hours)
    python experiments/reproduce.py --preset tiny        # a smoke test

Each model of the preset runs the paper's recipe through ``experiments/run.py`` (``--backbone-recipe
skip_ready``) at every seed: the seed's base network is trained (cached), then trained further with
its gates (joint SP, cached: the skip-ready backbone), then the gates trained beside it continue
with HRL (REINFORCE in the environment, the network trained through the executed blocks) and are
calibrated to the budget on validation images: ``run.py``'s default. Beside it, per seed, a
same-epochs control: the base network trained for as many epochs as the recipe's network received
in all (``--no-control`` leaves it out). The table gives, per
model, the base network's, the control's and SkipNet's test accuracy (means over seeds, with 95%
intervals that resample the test images' independent units: the source digits of the embedded set),
the paired differences to the base and to the control on the same images with a verdict read off the
interval ("within 0.5 points": yes only when the whole interval is above -0.5), the validation
figures, and the compute in the paper's measure ((executed gated blocks + 1) / (gates + 1)) and in
FLOPs (gates included), each beside the paper's figure. Written to ``<out-dir>/<preset>/reproduce.md``
and ``reproduce.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.statistics import bootstrap_ci, paired_difference
from backbones.distributed import RankIdle, end, join, keep_ranks, ranks, start, stop
from backbones.options import replace
from experiments.cli import given_fields, one_line_errors, parse
from experiments.config import RunConfig
from experiments.report import read_per_image
from experiments.run import run

log = logging.getLogger("skipnet_gym.reproduce")


@dataclass(frozen=True)
class PaperRow:
    """One model of the paper's table: base accuracy, SkipNet's accuracy, computation (percent)."""

    model: str
    base: float | None
    skipnet: float | None
    computation: float | None


# the paper's CIFAR-10 table (SP + HRL), PAPER.md
PAPER_CIFAR10 = {
    "cifar_resnet38": PaperRow("ResNet-38", 92.50, 92.75, 70.3),
    "cifar_resnet74": PaperRow("ResNet-74", 92.95, 92.77, 52.3),
    "cifar_resnet110": PaperRow("ResNet-110", 93.60, 93.30, 49.5),
}

# preset -> (the runs' shared settings, the models); figures to compare with where the paper has them
PRESETS: dict[str, tuple[dict[str, Any], dict[str, PaperRow]]] = {
    # the paper's models and data: base 160 epochs would be the paper's 64k iterations; 60 here with a cosine
    # schedule, joint SP 30; a GPU's job
    "cifar10": (
        {"dataset": "cifar10", "width": 1.0, "backbone_epochs": 60, "joint_epochs": 30},
        PAPER_CIFAR10,
    ),
    # the same recipe scaled to the embedded data set and a 2-core CPU (the paper's figures shown for reference)
    "embedded": ({"dataset": "cluttered_digits"}, {"cifar_resnet38": PaperRow("ResNet-38 w0.5", None, None, None)}),
    # a smoke test of the whole path
    "tiny": (
        {
            "dataset": "digits",
            "width": 0.25,
            "backbone_epochs": 1,
            "joint_epochs": 1,
            "recipe_hrl_iterations": 2,
            "num_envs": 32,
        },
        {"cifar_resnet20": PaperRow("ResNet-20 w0.25", None, None, None)},
    ),
}


@dataclass
class ReproduceConfig:
    """SkipNet's CIFAR table by the paper's recipe (base, joint SP, HRL), beside the paper's figures."""

    preset: str = "embedded"
    """cifar10 (the paper's models; needs the data and a GPU's hours), embedded (CPU minutes), tiny (a smoke test)"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds: each trains its own base network, joint SP, gates and control"""
    control: bool = True
    """train the same-epochs control: the base network trained as long as the recipe's network, per seed"""
    out_dir: str = "results/reproduce"
    """where reproduce.md and reproduce.json go"""
    run: RunConfig = field(default_factory=lambda: RunConfig(progress=False, backbone_recipe="skip_ready"))
    """every run's settings (the preset's override these; --alpha, --joint-budget, --device, ...)"""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")


def reproduce(cfg: ReproduceConfig, given: set[str] | None = None) -> list[dict[str, Any]]:
    """Run every model of the preset at every seed; returns one row per model. The preset's settings
    apply where the command line (``given``: the fields it set) did not set them.

    Each seed trains everything it depends on (its own base network, joint SP, the gates), and a
    same-epochs control: the base network trained, at that seed, for as many epochs as the recipe
    trained the routed network in all (:func:`experiments.recipe.training_epochs`)."""
    preset, models = PRESETS[cfg.preset]
    shared = {k: v for k, v in preset.items() if k not in (given or set())}
    rows = []
    for arch, paper in models.items():
        runs, controls = [], []
        for seed in cfg.seeds:
            run_cfg = replace(
                cfg.run, **shared, backbone=arch, agent="hybrid_rnn", backbone_recipe="skip_ready", seed=seed
            )
            runs.append(run_on_ranks(run_cfg))
            log.info(
                "%s seed %d: accuracy %.4f at %.3f FLOPs", arch, seed, runs[-1]["accuracy"], runs[-1]["flops_fraction"]
            )
            if cfg.control and runs[-1]["training_epochs"]:
                epochs = math.ceil(sum(runs[-1]["training_epochs"].values()))
                control_cfg = replace(  # the full network: no budget, nothing to search
                    run_cfg, agent="full", backbone_recipe="base", backbone_epochs=epochs, budget=None, max_drop=None
                )
                controls.append(run_on_ranks(control_cfg))
                log.info("%s seed %d: control (%d epochs) %.4f", arch, seed, epochs, controls[-1]["accuracy"])
        rows.append(summarize(arch, paper, runs, cfg.seeds[0], controls))
    return rows


def run_on_ranks(cfg: RunConfig) -> dict[str, Any]:
    """:func:`experiments.run.run` on every rank of a ``torchrun`` job (its training stages
    data-parallel, the rest on rank 0), every rank then holding rank 0's results; ``run`` alone."""
    try:
        result = run(cfg)
    except RankIdle:  # the run went on on rank 0 alone
        result = None
    join()
    return ranks().from_main(result)


def _verdict(d: dict[str, Any], tolerance: float) -> str:
    """``yes`` where the interval says the difference is above ``-tolerance``, ``no`` where it says it
    is below, ``undecided`` where the interval holds both."""
    low, high = d["ci95"]
    return "yes" if low >= -tolerance else "no" if high < -tolerance else "undecided"


def summarize(
    arch: str, paper: PaperRow, runs: list[dict[str, Any]], seed: int, controls: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The table row of one model from its runs (one per seed) on the same test images, against the
    base networks (one per seed) and, given ``controls`` (one per seed), the same-epochs controls.
    Accuracies are seed means of per-image correctness; intervals resample the test images'
    independent units (``group`` in the per-image outcomes, where the data has them)."""
    per_image = [read_per_image(r["run_dir"]) for r in runs]
    groups = per_image[0].get("group")
    ours = np.stack([f["correct"] for f in per_image]).astype(np.float64).mean(0)
    base = np.stack([f["base_correct"] for f in per_image]).astype(np.float64).mean(0)
    vs_base = paired_difference(ours, base, seed, groups)
    row = {
        "arch": arch,
        "model": paper.model,
        "seeds": len(runs),
        "interval_unit": "source digits (a cluster bootstrap)" if groups is not None else "test images",
        "base_accuracy": float(base.mean()),
        "base_accuracy_ci95": list(bootstrap_ci(base, seed, groups=groups)),
        "skipnet_accuracy": float(ours.mean()),
        "skipnet_accuracy_seed_std": float(np.std([r["accuracy"] for r in runs])),
        "skipnet_accuracy_ci95": list(bootstrap_ci(ours, seed, groups=groups)),
        "vs_base": vs_base,
        "within_half_a_point_of_base": _verdict(vs_base, 0.005),
        "computation_percent": float(np.mean([r["computation_percent"] for r in runs])),
        "flops_fraction": float(np.mean([r["flops_fraction"] for r in runs])),
        "flops_fraction_per_seed": [r["flops_fraction"] for r in runs],
        "val_accuracy": float(np.mean([r["val_accuracy"] for r in runs])),
        "val_flops_fraction": float(np.mean([r["val_flops_fraction"] for r in runs])),
        "skip_ready_full_accuracy": float(np.mean([r["full_backbone_accuracy"] for r in runs])),
        "training_epochs": runs[0].get("training_epochs", {}),
        "paper": dataclasses.asdict(paper),
        "run_dirs": [r["run_dir"] for r in runs],
    }
    if controls:
        control = np.stack([read_per_image(r["run_dir"])["correct"] for r in controls]).astype(np.float64).mean(0)
        vs_control = paired_difference(ours, control, seed, groups)
        row |= {
            "control_epochs": controls[0]["config"]["backbone_epochs"],
            "control_accuracy": float(control.mean()),
            "control_accuracy_ci95": list(bootstrap_ci(control, seed, groups=groups)),
            "vs_control": vs_control,
            "within_half_a_point_of_control": _verdict(vs_control, 0.005),
            "control_run_dirs": [r["run_dir"] for r in controls],
        }
    return row


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ci(r: dict[str, Any], key: str) -> str:
    return f"[{100 * r[key][0]:.2f}, {100 * r[key][1]:.2f}]"


def _diff(d: dict[str, Any]) -> str:
    return f"{100 * d['difference']:+.2f} [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]"


def format_markdown(preset: str, rows: list[dict[str, Any]]) -> str:
    unit = rows[0]["interval_unit"] if rows else "test images"
    lines = [
        f"SkipNet's recipe (base -> joint SP -> HRL), preset `{preset}`: ours beside the paper's (test accuracy %, "
        f"mean over seeds, each seed with its own base network; 95% intervals resample the {unit}; computation % in "
        "the paper's measure; FLOPs % gates included). The control is the base network trained as many epochs as "
        "the recipe's network; 'within 0.5' is yes only when the whole interval is above -0.5 points.",
        "",
        "| model | base (paper) | base (ours) | control (ours, epochs) | SkipNet (paper) | SkipNet (ours) "
        "| vs base, paired | within 0.5 of base | vs control, paired | within 0.5 of control "
        "| computation % (paper) | computation % (ours) | FLOPs % (ours, per seed) | validation: accuracy at FLOPs "
        "| skip-ready net, all blocks |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = r["paper"]
        control = (
            f"{100 * r['control_accuracy']:.2f} {_ci(r, 'control_accuracy_ci95')} ({r['control_epochs']})"
            if "control_accuracy" in r
            else "-"
        )
        vs_control = _diff(r["vs_control"]) if "vs_control" in r else "-"
        per_seed = " / ".join(f"{100 * f:.1f}" for f in r["flops_fraction_per_seed"])
        lines.append(
            f"| {r['model']} | {_pct(p['base'])} | {100 * r['base_accuracy']:.2f} {_ci(r, 'base_accuracy_ci95')} "
            f"| {control} | {_pct(p['skipnet'])} "
            f"| {100 * r['skipnet_accuracy']:.2f} ± {100 * r['skipnet_accuracy_seed_std']:.2f} "
            f"{_ci(r, 'skipnet_accuracy_ci95')} | {_diff(r['vs_base'])} | {r['within_half_a_point_of_base']} "
            f"| {vs_control} | {r.get('within_half_a_point_of_control', '-')} "
            f"| {_pct(p['computation'])} | {r['computation_percent']:.1f} "
            f"| {100 * r['flops_fraction']:.1f} ({per_seed}) "
            f"| {100 * r['val_accuracy']:.2f} at {100 * r['val_flops_fraction']:.1f} "
            f"| {100 * r['skip_ready_full_accuracy']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    with one_line_errors(argv):
        cfg = parse(ReproduceConfig, argv, description=__doc__.strip().splitlines()[0], data_parallel=True)
        here, device = start(cfg.run.device)  # under torchrun: every run's training stages on every rank
        if here.distributed:
            cfg = dataclasses.replace(cfg, run=replace(cfg.run, device=str(device)))
        try:
            with keep_ranks():
                rows = reproduce(cfg, given_fields(ReproduceConfig, argv))
        finally:
            stop()
    if not here.main:
        end(here)
        return rows
    out = Path(cfg.out_dir) / cfg.preset
    out.mkdir(parents=True, exist_ok=True)
    table = format_markdown(cfg.preset, rows)
    (out / "reproduce.md").write_text(table + "\n")
    (out / "reproduce.json").write_text(json.dumps(rows, indent=2))
    print(table)
    end(here)
    return rows


if __name__ == "__main__":
    main()
