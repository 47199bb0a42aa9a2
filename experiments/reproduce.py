"""SkipNet's CIFAR table, reproduced by one command: base -> joint SP -> gates, our figures beside the paper's.

    python experiments/reproduce.py                      # the embedded preset: CPU minutes
    python experiments/reproduce.py --preset cifar10     # the paper's ResNet-38/74/110 on CIFAR-10 (a GPU's hours)
    python experiments/reproduce.py --preset tiny        # a smoke test

Each model of the preset runs the paper's recipe through ``experiments/run.py`` (``--backbone-recipe
skip_ready``): the base network is trained (cached), then trained further with its gates (joint SP,
cached: the skip-ready backbone), and SkipNet's recurrent gates trained beside it route it, frozen,
for every seed (HRL after joint SP did not help on the embedded set, BENCHMARKS.md section 9:
``--hrl-iterations N --sp-epochs 3`` adds it). The table gives, per model, the base
network's test accuracy and SkipNet's (mean over seeds, with the 95% bootstrap interval of the
seed-averaged per-image correctness, and the paired difference to the base network on the same
images), and the compute in the paper's measure ((executed gated blocks + 1) / (gates + 1)) and in
FLOPs (gates included), each beside the paper's figure. Written to ``<out-dir>/<preset>/reproduce.md``
and ``reproduce.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.statistics import bootstrap_ci, paired_difference
from backbones.options import replace
from experiments.cli import given_fields, one_line_errors, parse
from experiments.config import RunConfig
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
            "sp_epochs": 1,
            "hrl_iterations": 2,
            "num_envs": 32,
        },
        {"cifar_resnet20": PaperRow("ResNet-20 w0.25", None, None, None)},
    ),
}


@dataclass
class ReproduceConfig:
    """SkipNet's CIFAR table by the paper's recipe (base, joint SP, the gates), beside the paper's figures."""

    preset: str = "embedded"
    """cifar10 (the paper's models; needs the data and a GPU's hours), embedded (CPU minutes), tiny (a smoke test)"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds of the joint SP stage and the gates (the base network is trained once)"""
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
    apply where the command line (``given``: the fields it set) did not set them."""
    preset, models = PRESETS[cfg.preset]
    shared = {k: v for k, v in preset.items() if k not in (given or set())}
    rows = []
    for arch, paper in models.items():
        runs = []
        for seed in cfg.seeds:
            run_cfg = replace(
                cfg.run, **shared, backbone=arch, agent="hybrid_rnn", backbone_recipe="skip_ready", seed=seed
            )
            runs.append(run(run_cfg))
            log.info(
                "%s seed %d: accuracy %.4f at %.3f FLOPs", arch, seed, runs[-1]["accuracy"], runs[-1]["flops_fraction"]
            )
        rows.append(summarize(arch, paper, runs, cfg.seeds[0]))
    return rows


def summarize(arch: str, paper: PaperRow, runs: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """The table row of one model from its runs (one per seed) on the same test images."""
    correct, base_correct = [], []
    for r in runs:
        with np.load(Path(r["run_dir"]) / "per_image.npz", allow_pickle=False) as f:
            correct.append(f["correct"].astype(np.float64))
            base_correct.append(f["base_correct"].astype(np.float64))
    ours, base = np.stack(correct).mean(0), np.stack(base_correct).mean(0)
    return {
        "arch": arch,
        "model": paper.model,
        "seeds": len(runs),
        "base_accuracy": float(base.mean()),
        "base_accuracy_ci95": list(bootstrap_ci(base, seed)),
        "skipnet_accuracy": float(ours.mean()),
        "skipnet_accuracy_seed_std": float(np.std([r["accuracy"] for r in runs])),
        "skipnet_accuracy_ci95": list(bootstrap_ci(ours, seed)),
        "vs_base": paired_difference(ours, base, seed),
        "computation_percent": float(np.mean([r["computation_percent"] for r in runs])),
        "flops_fraction": float(np.mean([r["flops_fraction"] for r in runs])),
        "skip_ready_full_accuracy": float(np.mean([r["full_backbone_accuracy"] for r in runs])),
        "paper": dataclasses.asdict(paper),
        "run_dirs": [r["run_dir"] for r in runs],
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_markdown(preset: str, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"SkipNet's recipe (base -> joint SP -> gates), preset `{preset}`: ours beside the paper's "
        "(accuracy %, mean over seeds [95% interval]; computation % in the paper's measure; FLOPs % gates included)",
        "",
        "| model | base (paper) | base (ours) | SkipNet (paper) | SkipNet (ours) | ours vs base, paired "
        "| computation % (paper) | computation % (ours) | FLOPs % (ours) | skip-ready net, all blocks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p, d = r["paper"], r["vs_base"]
        lines.append(
            f"| {r['model']} | {_pct(p['base'])} | {100 * r['base_accuracy']:.2f} "
            f"[{100 * r['base_accuracy_ci95'][0]:.2f}, {100 * r['base_accuracy_ci95'][1]:.2f}] "
            f"| {_pct(p['skipnet'])} | {100 * r['skipnet_accuracy']:.2f} ± {100 * r['skipnet_accuracy_seed_std']:.2f} "
            f"[{100 * r['skipnet_accuracy_ci95'][0]:.2f}, {100 * r['skipnet_accuracy_ci95'][1]:.2f}] "
            f"| {100 * d['difference']:+.2f} [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}] "
            f"| {_pct(p['computation'])} | {r['computation_percent']:.1f} | {100 * r['flops_fraction']:.1f} "
            f"| {100 * r['skip_ready_full_accuracy']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    with one_line_errors(argv):
        cfg = parse(ReproduceConfig, argv, description=__doc__.strip().splitlines()[0])
        rows = reproduce(cfg, given_fields(ReproduceConfig, argv))
    out = Path(cfg.out_dir) / cfg.preset
    out.mkdir(parents=True, exist_ok=True)
    table = format_markdown(cfg.preset, rows)
    (out / "reproduce.md").write_text(table + "\n")
    (out / "reproduce.json").write_text(json.dumps(rows, indent=2))
    print(table)
    return rows


if __name__ == "__main__":
    main()
