"""Compare routing agents on the same backbone and data: one table (markdown and CSV) and one
accuracy-vs-compute plot (PNG).

    python experiments/compare.py                                   # the default set, embedded data
    python experiments/compare.py --agents hybrid_rnn ppo random --alphas 0.5 1 2

Learned agents run at every ``--alphas``; ``static`` and ``random`` run at the compute the first
learned agent reached at each alpha (matched compute), so every learned policy is compared with
data-independent ones spending the same FLOPs; ``full`` runs once.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.config import RunConfig  # noqa: E402
from agents.fixed import random_rate_for_budget  # noqa: E402
from agents.registry import get_agent  # noqa: E402
from backbones.dataclass_cli import parse  # noqa: E402

FIXED = ("random", "static", "full")


@dataclass
class CompareConfig:
    """Compare routing agents at several compute weights on one backbone and data set."""

    agents: tuple[str, ...] = ("hybrid_rnn", "hybrid_ff", "ppo", "recurrent_ppo", "random", "static", "full")
    """agents to compare"""
    alphas: tuple[float, ...] = (0.5, 1.0, 2.0)
    """compute weights the learned agents are trained at"""
    fallback_budgets: tuple[float, ...] = (0.4, 0.6, 0.8)
    """FLOPs budgets of static/random when no learned agent is compared"""
    backbone: str = "cifar_resnet38"
    """backbone registry name"""
    width: float = 0.5
    """channel multiplier of CIFAR ResNet backbones"""
    backbone_epochs: int | None = None
    """epochs when the backbone has to be trained first (default: the trainer's for the data set)"""
    dataset: str = "digits"
    """data set name"""
    data_root: str | None = None
    """folder with the data set's files"""
    device: str = "auto"
    """torch device"""
    seed: int = 0
    """seed of every run"""
    hrl_iterations: int = 2000
    """hybrid agents: REINFORCE iterations"""
    sp_epochs: int = 10
    """hybrid agents: supervised pre-training epochs"""
    timesteps: int = 150_000
    """SB3 agents: environment steps"""
    out_dir: str = "results/compare"
    """where the table, CSV, plot and per-run JSON go"""
    run_dir: str = "runs"
    """TensorBoard folder of the runs"""
    progress: bool = False
    """show the runs' progress bars"""


def run_one(cfg: CompareConfig, **overrides: Any) -> dict[str, Any]:
    from run import run  # experiments/run.py

    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig) if hasattr(cfg, f.name)}
    return run(RunConfig(**{**shared, **overrides}))


def compare(cfg: CompareConfig, log: logging.Logger) -> list[dict[str, Any]]:
    for name in cfg.agents:
        get_agent(name)  # unknown names fail before hours of work
    learned = [a for a in cfg.agents if a not in FIXED]
    rows: list[dict[str, Any]] = []
    budgets: list[float] = []
    backbone = None
    for agent in learned:
        for alpha in cfg.alphas:
            r = run_one(cfg, agent=agent, alpha=alpha)
            rows.append({**r, "setting": f"alpha={alpha:g}"})
            log.info("%s alpha=%g: accuracy %.4f at %.3f FLOPs", agent, alpha, r["accuracy"], r["flops_fraction"])
            if agent == learned[0]:
                budgets.append(r["flops_fraction"])
    budgets = [min(b, 1.0) for b in budgets] or list(cfg.fallback_budgets)  # gates can push past 100%
    for agent in (a for a in cfg.agents if a in FIXED):
        if agent == "full":
            settings = [{"setting": "all blocks"}]
        else:
            settings = [{"budget": b, "setting": f"budget={b:.3f}"} for b in budgets]
        for s in settings:
            overrides: dict[str, Any] = {"agent": agent}
            if agent == "static":
                overrides["budget"] = s["budget"]
            if agent == "random":
                if backbone is None:
                    backbone = _backbone(cfg)
                overrides["rate"] = random_rate_for_budget(backbone, s["budget"])
            r = run_one(cfg, **overrides)
            rows.append({**r, "setting": s["setting"]})
            log.info("%s %s: accuracy %.4f at %.3f FLOPs", agent, s["setting"], r["accuracy"], r["flops_fraction"])
    return rows


def _backbone(cfg: CompareConfig):
    from run import load_backbone_for

    from backbones.data import load_dataset
    from backbones.device import resolve_device

    rc = RunConfig(
        backbone=cfg.backbone,
        dataset=cfg.dataset,
        data_root=cfg.data_root,
        width=cfg.width,
        backbone_epochs=cfg.backbone_epochs,
        progress=False,
    )
    train = load_dataset(cfg.dataset, "train", cfg.data_root)
    return load_backbone_for(rc, resolve_device(cfg.device), train)[0]


COLUMNS = [
    ("agent", "agent"),
    ("setting", "setting"),
    ("accuracy", "accuracy %"),
    ("flops_fraction", "FLOPs %"),
    ("policy_flops_fraction", "policy FLOPs %"),
    ("blocks_executed", "blocks run"),
    ("computation_percent", "computation % (paper)"),
    ("train_seconds", "train s"),
]


def write_outputs(rows: list[dict[str, Any]], out_dir: Path, title: str) -> tuple[Path, Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)

    def cell(r: dict, key: str) -> str:
        v = r[key]
        if key in ("accuracy", "flops_fraction", "policy_flops_fraction"):
            return f"{100 * v:.2f}"
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    md = out_dir / "compare.md"
    lines = [
        f"# {title}",
        "",
        "| " + " | ".join(h for _, h in COLUMNS) + " |",
        "|" + "|".join("---:" if k not in ("agent", "setting") else "---" for k, _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(cell(r, k) for k, _ in COLUMNS) + " |" for r in rows]
    md.write_text("\n".join(lines) + "\n")
    csv_path = out_dir / "compare.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([k for k, _ in COLUMNS])
        w.writerows([[r[k] for k, _ in COLUMNS] for r in rows])
    (out_dir / "compare.json").write_text(json.dumps(rows, indent=2))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for agent in dict.fromkeys(r["agent"] for r in rows):
        pts = sorted((100 * r["flops_fraction"], 100 * r["accuracy"]) for r in rows if r["agent"] == agent)
        ax.plot(*zip(*pts), marker="o", label=agent)
    ax.set_xlabel("FLOPs spent, % of the full network (policy included)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = out_dir / "compare.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return md, csv_path, png


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("skipnet_gym.compare")
    cfg = parse(CompareConfig, argv)
    rows = compare(cfg, log)
    md, csv_path, png = write_outputs(rows, Path(cfg.out_dir), f"{cfg.backbone} on {cfg.dataset}")
    print(md.read_text())
    print(f"wrote {md}, {csv_path}, {png}")
    return rows


if __name__ == "__main__":
    main()
