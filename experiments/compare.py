"""Compare routing agents over the accuracy/compute trade-off, with seeds and intervals.

    python experiments/compare.py                                    # the default set, embedded data
    python experiments/compare.py --agents hybrid_rnn ppo --alphas 0.5 1 2 --seeds 0 1 2

Learned agents run at every ``--alphas`` (those that take a budget: at every ``--budgets``, when
given) and ``--seeds``. Data-independent agents (``static``, ``random``: the registry's "matched"
role) then run at the mean compute each learned point reached on the validation images (a choice,
so never made on test), so that every learned point has a fixed subset of blocks and a random
policy spending the same FLOPs beside it; ``full`` runs once.
Every run is ``experiments/run.py`` with its own folder.

What is reported (``compare.md``, ``compare.json``, ``compare.csv``, ``compare.png``):

* per agent and setting: accuracy (mean over seeds, the seeds' standard deviation, and the 95%
  bootstrap interval over test images of the seed-averaged per-image correctness), FLOPs, how
  dynamic the routing is (``dynamic_blocks``, ``difficulty_spearman``);
* per learned point: the paired difference in accuracy to ``static`` and ``random`` at its compute,
  on the same test images, with its 95% interval;
* per agent: the area under its accuracy-vs-FLOPs curve over the FLOPs range every agent covers
  (mean accuracy over that range), with its interval and the paired difference to ``static``.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.registry import get_agent
from agents.statistics import auc_difference, bootstrap_ci, common_range, curve_auc, paired_difference
from backbones.device import resolve_device
from backbones.options import build, current_names, flatten, option_fields, replace
from experiments.cli import one_line_errors, parse
from experiments.config import RunConfig
from experiments.report import read_per_image
from experiments.run import run

log = logging.getLogger("skipnet_gym.compare")


@dataclass
class CompareConfig:
    """Compare routing agents at several compute weights and seeds on one backbone and data set."""

    agents: tuple[str, ...] = ("hybrid_rnn", "ppo", "static", "random", "full")
    """agents to compare"""
    alphas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)
    """compute weights the learned agents are trained at (one curve point each)"""
    budgets: tuple[float, ...] = ()
    """FLOPs budgets the learned agents that take one (hybrid_*) are trained to meet, instead of --alphas"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds of every seeded run"""
    fallback_budgets: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8)
    """FLOPs budgets of the matched agents when no learned agent is compared"""
    out_dir: str = "results/compare"
    """where the table, CSV, JSON and plot go"""
    run: RunConfig = field(default_factory=lambda: RunConfig(progress=False))
    """every run's settings (--backbone, --dataset, --hrl-iterations, ...); agent, alpha, seed, budget set per run"""


@dataclass
class Point:
    """One agent at one setting, over its seeds."""

    agent: str
    setting: str
    runs: list[dict[str, Any]]
    correct: np.ndarray  # (seeds, n) per-image correctness
    groups: np.ndarray | None = None  # (n,) the test images' independent units, what intervals resample

    @property
    def flops(self) -> float:
        """FLOPs spent on the test images (reported)."""
        return float(np.mean([r["flops_fraction"] for r in self.runs]))

    @property
    def val_flops(self) -> float:
        """FLOPs spent on the validation images: what the matched baselines' budgets are set to (a
        choice, so never made on test)."""
        return float(np.mean([r["val_flops_fraction"] for r in self.runs]))

    def mean(self, key: str) -> float:
        return float(np.mean([r[key] for r in self.runs]))

    def std(self, key: str) -> float:
        return float(np.std([r[key] for r in self.runs]))


def _point(agent: str, setting: str, runs: list[dict[str, Any]]) -> Point:
    per_image = [read_per_image(r["run_dir"]) for r in runs]
    correct = np.stack([f["correct"].astype(np.float64) for f in per_image])
    return Point(agent, setting, runs, correct, per_image[0].get("group"))


def _config_key(cfg: RunConfig | dict) -> str | None:
    """What makes two runs the same run: every option but how it was shown and where it was
    written. A stored configuration that lacks an option of this version matches nothing: it was
    run before the option existed, and taking today's default for it would reuse a run made with a
    different setting whenever that default changed (returns ``None``)."""
    run_cfg: RunConfig
    if isinstance(cfg, dict):
        cfg = current_names(RunConfig, cfg)
        names = set(option_fields(RunConfig))
        if not names <= set(cfg):
            return None
        run_cfg = build(RunConfig, {k: v for k, v in cfg.items() if k in names})
    else:
        run_cfg = cfg
    d = flatten(run_cfg.for_device(resolve_device(run_cfg.device)))
    for name in ("progress", "run_dir", "debug", "device"):
        d.pop(name, None)
    return json.dumps(d, sort_keys=True)


def finished_runs(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Finished runs under ``run_dir`` by configuration: a comparison started again (after a kill,
    or with more agents) reuses them instead of training them twice."""
    found = {}
    for path in sorted(run_dir.glob("*/results.json")):
        r = json.loads(path.read_text())
        if "config" in r and not r["config"].get("eval_only") and (path.parent / "per_image.npz").is_file():
            key = _config_key(r["config"])
            if key is not None:
                found[key] = r
    return found


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run every agent, setting and seed; returns the points and the paired statistics."""
    specs = {name: get_agent(name) for name in cfg.agents}  # unknown names fail before hours of work
    learned = [a for a in cfg.agents if specs[a].role == "learned"]

    finished = finished_runs(Path(cfg.run.run_dir))

    def runs_of(agent: str, **overrides: Any) -> list[dict[str, Any]]:
        seeds = cfg.seeds if specs[agent].seeded else cfg.seeds[:1]
        out = []
        for seed in seeds:
            run_cfg = replace(cfg.run, agent=agent, seed=seed, **overrides)
            key = _config_key(run_cfg)
            r = (finished.get(key) if key is not None else None) or run(run_cfg)
            log.info(
                "%s %s seed %d: accuracy %.4f at %.3f FLOPs", agent, overrides, seed, r["accuracy"], r["flops_fraction"]
            )
            out.append(r)
        return out

    points: list[Point] = []
    for agent in learned:
        if cfg.budgets and specs[agent].takes_budget:
            for budget in cfg.budgets:
                points.append(_point(agent, f"budget={budget:g}", runs_of(agent, budget=budget)))
            continue
        for alpha in cfg.alphas:
            points.append(_point(agent, f"alpha={alpha:g}", runs_of(agent, alpha=alpha)))
    # the matched baselines run at each learned point's validation FLOPs, on the network it routed (a budget of
    # hybrid_rnn's is met by a skip-ready backbone of its own: RunConfig.with_budget_recipe)
    networks = {min(p.val_flops, 1.0): p.runs[0]["config"]["joint_budget"] for p in points}
    budgets = sorted(networks) or list(cfg.fallback_budgets)
    matched: dict[str, dict[float, Point]] = defaultdict(dict)
    for agent in (a for a in cfg.agents if specs[a].role == "matched"):
        for b in budgets:
            network = {"joint_budget": networks[b]} if b in networks else {}
            matched[agent][b] = _point(agent, f"budget={b:.3f}", runs_of(agent, budget=b, rate=None, **network))
            points.append(matched[agent][b])
    for agent in (a for a in cfg.agents if specs[a].role == "reference"):
        points.append(_point(agent, "all blocks", runs_of(agent)))

    seed = cfg.seeds[0]
    groups = points[0].groups if points else None  # every point is on the same test images
    paired = []
    for p in (p for p in points if p.agent in learned):
        row: dict[str, Any] = {"agent": p.agent, "setting": p.setting, "flops": p.flops}
        for other, at in matched.items():
            q = at[min(p.val_flops, 1.0)]
            row[f"vs_{other}"] = paired_difference(p.correct.mean(0), q.correct.mean(0), seed, groups)
            row[f"{other}_flops"] = q.flops
        paired.append(row)

    curves: dict[str, list[Point]] = defaultdict(list)
    for p in points:
        if specs[p.agent].role != "reference":
            curves[p.agent].append(p)
    auc: dict[str, Any] = {}
    span = common_range([[p.flops for p in ps] for ps in curves.values()]) if len(curves) > 0 else None
    if span is not None and all(len(ps) > 1 for ps in curves.values()):
        lo, hi = span
        results = {
            agent: curve_auc(
                [p.flops for p in ps], np.stack([p.correct.mean(0) for p in ps]), lo, hi, seed, groups=groups
            )
            for agent, ps in curves.items()
        }
        auc = {"range": [lo, hi]}
        for agent, res in results.items():
            auc[agent] = {"auc": res["auc"], "ci95": res["ci95"]}
            if "static" in results and agent != "static":
                auc[agent]["vs_static"] = auc_difference(res, results["static"])
    return {"points": points, "paired": paired, "auc": auc}


def summarize(p: Point, seed: int) -> dict[str, Any]:
    return {
        "agent": p.agent,
        "setting": p.setting,
        "seeds": len(p.runs),
        "accuracy": p.mean("accuracy"),
        "accuracy_seed_std": p.std("accuracy"),
        "accuracy_ci95": list(bootstrap_ci(p.correct.mean(0), seed, groups=p.groups)),
        "flops_fraction": p.flops,
        "flops_seed_std": p.std("flops_fraction"),
        "policy_flops_fraction": p.mean("policy_flops_fraction"),
        "dynamic_blocks": p.mean("dynamic_blocks"),
        "difficulty_spearman": p.mean("difficulty_spearman"),
        "train_seconds": p.mean("train_seconds"),
        "run_dirs": [r["run_dir"] for r in p.runs],
    }


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _interval(d: dict) -> str:
    return f"{100 * d['difference']:+.2f} [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]"


def write_outputs(result: dict[str, Any], out_dir: Path, title: str, seed: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [summarize(p, seed) for p in result["points"]]
    lines = [
        f"# {title}",
        "",
        "Accuracy: mean over seeds ± their standard deviation, and the 95% bootstrap interval over test images.",
        "",
        "| agent | setting | seeds | accuracy % | 95% interval | FLOPs % | dynamic blocks "
        "| Spearman (blocks, difficulty) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['agent']} | {r['setting']} | {r['seeds']} | {_pct(r['accuracy'])} ± {_pct(r['accuracy_seed_std'])} "
            f"| [{_pct(r['accuracy_ci95'][0])}, {_pct(r['accuracy_ci95'][1])}] "
            f"| {_pct(r['flops_fraction'])} ± {_pct(r['flops_seed_std'])} "
            f"| {r['dynamic_blocks']:.1f} | {r['difficulty_spearman']:+.3f} |"
        )
    if result["paired"]:
        others = [k[3:] for k in result["paired"][0] if k.startswith("vs_")]
        lines += [
            "",
            "Paired differences at equal compute (learned minus matched, points, same test images, 95% interval):",
            "",
            "| agent | setting | FLOPs % | " + " | ".join(f"vs {o}" for o in others) + " |",
            "|---|---|---:|" + "---:|" * len(others),
        ]
        for r in result["paired"]:
            cells = " | ".join(_interval(r[f"vs_{o}"]) for o in others)
            lines.append(f"| {r['agent']} | {r['setting']} | {_pct(r['flops'])} | {cells} |")
    if result["auc"]:
        lo, hi = result["auc"]["range"]
        lines += [
            "",
            f"Area under the accuracy-vs-FLOPs curve over {_pct(lo)}-{_pct(hi)}% FLOPs (mean accuracy over the range):",
            "",
            "| agent | AUC % | 95% interval | vs static |",
            "|---|---:|---:|---:|",
        ]
        for agent, a in result["auc"].items():
            if agent == "range":
                continue
            vs = _interval(a["vs_static"]) if "vs_static" in a else ""
            lines.append(f"| {agent} | {_pct(a['auc'])} | [{_pct(a['ci95'][0])}, {_pct(a['ci95'][1])}] | {vs} |")
    md = out_dir / "compare.md"
    md.write_text("\n".join(lines) + "\n")
    (out_dir / "compare.json").write_text(
        json.dumps({"points": rows, "paired": result["paired"], "auc": result["auc"]}, indent=2)
    )
    csv_path = out_dir / "compare.csv"
    keys = [k for k in rows[0] if k != "run_dirs"]
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        w.writerows([[r[k] for k in keys] for r in rows])

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for agent in dict.fromkeys(r["agent"] for r in rows):
        pts = sorted((r for r in rows if r["agent"] == agent), key=lambda r: r["flops_fraction"])
        x = [100 * r["flops_fraction"] for r in pts]
        y = [100 * r["accuracy"] for r in pts]
        yerr = [[100 * (r["accuracy"] - r["accuracy_ci95"][0]) for r in pts],
                [100 * (r["accuracy_ci95"][1] - r["accuracy"]) for r in pts]]  # fmt: skip
        xerr = [100 * r["flops_seed_std"] for r in pts]
        ax.errorbar(x, y, yerr=yerr, xerr=xerr, marker="o", ms=4, capsize=2, label=agent)
    if result["auc"]:
        for edge in result["auc"]["range"]:
            ax.axvline(100 * edge, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("FLOPs spent, % of the full network (policy included)")
    ax.set_ylabel("test accuracy, % (95% interval)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = out_dir / "compare.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return [md, csv_path, out_dir / "compare.json", png]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    with one_line_errors(argv):
        cfg = parse(CompareConfig, argv)
        result = compare(cfg)
    title = f"{cfg.run.backbone} on {cfg.run.dataset}"
    paths = write_outputs(result, Path(cfg.out_dir), title, cfg.seeds[0])
    print(paths[0].read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    return result


if __name__ == "__main__":
    main()
