"""Sweep any run option on Ray Tune and map the accuracy / compute trade-off (``pip install -e '.[sweep]'``).

    python experiments/sweep.py --grid alpha=0.5,1,2,4                       # a grid, 4 trials
    python experiments/sweep.py --search optuna --samples 16 \\
        --space alpha=loguniform:0.2:4 --space hrl_lr=loguniform:1e-5:1e-3     # multi-objective search
    python experiments/sweep.py --grid agent=hybrid_rnn,blockdrop --grid alpha=1,2 --hrl-iterations 200
    python experiments/sweep.py --address auto ...                            # join a running Ray cluster
    python experiments/sweep.py --name my-sweep --restore                     # a killed sweep, restored

Every trial is one ``run.py`` run (its ``results.json``, ``per_image.npz``, checkpoint and
TensorBoard logs under ``<out>/<name>/trials/<trial>``), reporting its training scalars to Tune
as it logs them (so a scheduler, ``--scheduler asha``, can stop bad trials early) and, at the end,
the two objectives, measured on the validation split: ``val_accuracy`` (up) and
``val_flops_fraction`` (down). The search is a grid or Optuna's multi-objective sampler (NSGA-II)
over both objectives at once. The Pareto front is chosen on validation too and written as
``pareto.csv`` (every trial, the front flagged, test figures beside: reported, never optimised)
and ``pareto.png`` (the front's test accuracy and FLOPs, with intervals).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from backbones.options import POSITIVE_INT, build, check_options, flatten, former_names, option, option_fields, replace
from experiments.cli import one_line_errors, parse, parse_value
from experiments.config import RunConfig

log = logging.getLogger("skipnet_gym.sweep")
OBJECTIVES = {"val_accuracy": "max", "val_flops_fraction": "min"}  # chosen on validation, never on test
REPORTED = (
    "val_accuracy",
    "val_flops_fraction",
    "accuracy",
    "accuracy_ci95_low",
    "accuracy_ci95_high",
    "flops_fraction",
)


@dataclass
class SweepConfig:
    """Sweep run options on Ray Tune; write the accuracy / FLOPs Pareto front."""

    search: Literal["grid", "optuna"] = "grid"
    """grid (every combination of --grid values) or optuna (multi-objective search over --space)"""
    grid: tuple[str, ...] = ("alpha=0.5,1,2,4",)
    """NAME=V1,V2,...: values of a run option (any of run.py's, e.g. alpha, budget, hrl_lr, agent, seed)"""
    space: tuple[str, ...] = ("alpha=loguniform:0.2:4",)
    """NAME=uniform:LO:HI | loguniform:LO:HI | int:LO:HI | choice:A|B|...: a distribution for optuna"""
    samples: int = option(8, POSITIVE_INT)
    """optuna: trials to run (a grid runs each combination once)"""
    max_concurrent: int = option(2, POSITIVE_INT)
    """trials at a time"""
    cpus_per_trial: int = option(1, POSITIVE_INT)
    """CPU cores per trial (also its torch threads)"""
    gpus_per_trial: float | None = None
    """GPUs (a fraction shares one) per trial; default: 1/--max-concurrent when there is a GPU, else 0"""
    scheduler: Literal["none", "asha"] = "none"
    """none, or asha (stops trials whose --scheduler-metric lags, as they report it)"""
    scheduler_metric: str = "charts/episodic_return"
    """asha: the reported training scalar to compare trials by (higher is better; a return depends on alpha)"""
    address: str | None = None
    """Ray cluster to join (e.g. auto); default: start Ray on this machine"""
    name: str = "sweep"
    """experiment name: the folder under --out, and what --restore restores"""
    out: str = "results/sweeps"
    """where experiments are written"""
    restore: bool = False
    """restore the killed sweep --out/--name (finished trials kept, unfinished ones resumed)"""
    run: RunConfig = field(default_factory=lambda: RunConfig(progress=False))
    """every trial's run options (--agent, --backbone, --hrl-iterations, ...), the swept ones set per trial"""

    def __post_init__(self) -> None:
        check_options(self)


RUN_FIELDS = option_fields(RunConfig)
RENAMED = former_names(RunConfig)


def option_value(name: str, text: str) -> Any:
    """``text`` as run option ``name`` takes it on the command line (an unknown option is an error
    that lists them)."""
    if name not in RUN_FIELDS:
        raise ValueError(f"unknown run option {name!r} in the sweep; options: {', '.join(sorted(RUN_FIELDS))}")
    return parse_value(RunConfig, name, text)


def _split(spec: str, what: str) -> tuple[str, str]:
    """``(option, values)`` of ``NAME=values``: the option by today's name (a renamed one's former name
    is taken: ``gamma`` is ``hrl_gamma``)."""
    name, sep, values = spec.partition("=")
    if not sep or not values:
        raise ValueError(f"{what} must look like NAME=..., got {spec!r}")
    name = name.strip().replace("-", "_")
    return RENAMED.get(name, name), values


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    """Tune's search space from ``--grid`` (grid) or ``--space`` (optuna)."""
    from ray import tune

    space: dict[str, Any] = {}
    if cfg.search == "grid":
        for spec in cfg.grid:
            name, values = _split(spec, "--grid")
            space[name] = tune.grid_search([option_value(name, v) for v in values.split(",")])
        return space
    for spec in cfg.space:
        name, dist = _split(spec, "--space")
        kind, _, args = dist.partition(":")
        if kind == "choice":
            space[name] = tune.choice([option_value(name, v) for v in args.split("|")])
            continue
        lo, hi = (option_value(name, v) for v in args.split(":"))
        makers = {"uniform": tune.uniform, "loguniform": tune.loguniform, "int": lambda a, b: tune.randint(a, b + 1)}
        if kind not in makers:
            raise ValueError(f"--space {spec!r}: the distribution is one of uniform, loguniform, int, choice")
        space[name] = makers[kind](lo, hi)
    return space


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For each (accuracy, flops) point: no other point is at least as accurate and at most as
    costly, and strictly better in one of the two."""
    return [
        not any(a2 >= a and f2 <= f and (a2 > a or f2 < f) for j, (a2, f2) in enumerate(points) if j != i)
        for i, (a, f) in enumerate(points)
    ]


def trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """One Tune trial: ``run.py`` with ``config``'s options, reporting as it trains. A trial that
    was interrupted resumes its run from the checkpoint in its folder."""
    import torch
    from ray import tune

    from agents.registry import import_agents
    from experiments.run import run

    base = dict(base)  # a worker may run several trials on the same object
    for source in (*base.get("agents_from", ()), *config.get("agents_from", ())):
        import_agents(source)  # the user's agents, whose options the run's configuration holds
    trial_dir = Path(base.pop("trials_dir")) / tune.get_context().get_trial_id()
    torch.set_num_threads(int(base.pop("threads")))
    cfg = build(RunConfig, {**base, **config, "run_dir": str(trial_dir), "progress": False})
    started = sorted(trial_dir.glob("*/agent.pt"))
    finished = sorted(trial_dir.glob("*/results.json"))
    if finished:  # the run had finished before the sweep was killed: report it again
        result = json.loads(finished[-1].read_text())
    else:
        if started:
            cfg = replace(cfg, resume=True, checkpoint=str(started[-1]))
        pending: dict[str, Any] = {}
        step_of: dict[str, int] = {"step": -1}

        def report(tag: str, value: float, step: int) -> None:  # one report per training step
            if step != step_of["step"] and pending:
                tune.report({**pending, "step": step_of["step"]})
                pending.clear()
            step_of["step"] = step
            if not tag.startswith("eval/"):
                pending[tag] = value

        result = run(cfg, None, report)  # resumed: the same options, so nothing differs from the run's
    figures = {
        **result,
        "accuracy_ci95_low": result["accuracy_ci95"][0],
        "accuracy_ci95_high": result["accuracy_ci95"][1],
    }
    tune.report({**{k: figures[k] for k in REPORTED}, "run_dir": result["run_dir"], "done_run": True})


def sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Run (or restore) the sweep; returns the trials and the Pareto front."""
    try:
        import ray
        from ray import tune
    except ImportError as err:
        raise ImportError("the sweep needs Ray Tune: pip install -e '.[sweep]'") from err
    import torch

    from experiments.recipe import load_backbone_for, run_splits

    space = param_space(cfg)  # a bad --grid or --space is refused before any work, and so is a wrong --name
    out = Path(cfg.out).resolve()
    path = out / cfg.name
    if cfg.restore and not tune.Tuner.can_restore(str(path)):
        raise FileNotFoundError(f"no sweep to resume at {path}; start it without --restore")
    if not cfg.restore and path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} holds a sweep already: pass --restore to continue it or another --name")
    trials_dir = path / "trials"
    base = flatten(cfg.run)
    if not ray.is_initialized():
        env_vars = {k: os.environ[k] for k in ("SKIPNET_CACHE", "SKIPNET_DATA") if k in os.environ}
        ray.init(address=cfg.address, runtime_env={"env_vars": env_vars}, include_dashboard=False, log_to_driver=False)
    # the backbone is trained (and cached) once here, not by concurrent trials racing to the cache
    from backbones.device import resolve_device

    load_backbone_for(cfg.run, resolve_device(cfg.run.device), run_splits(cfg.run))

    # a trial reports its training scalars as it goes and the objectives once, at the end: the
    # searcher (and a scheduler) read the reports that carry their metrics and skip the others
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    gpus = cfg.gpus_per_trial
    if gpus is None:
        gpus = 1.0 / cfg.max_concurrent if torch.cuda.is_available() else 0.0
    trainable = tune.with_resources(
        tune.with_parameters(trial, base={**base, "trials_dir": str(trials_dir), "threads": cfg.cpus_per_trial}),
        {"cpu": cfg.cpus_per_trial, "gpu": gpus},
    )
    if cfg.restore:
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, restart_errored=True)
    else:
        search_alg = None
        if cfg.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(metric=list(OBJECTIVES), mode=list(OBJECTIVES.values()), seed=cfg.run.seed)
        scheduler = None
        if cfg.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(metric=cfg.scheduler_metric, mode="max", time_attr="training_iteration")
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                search_alg=search_alg,
                scheduler=scheduler,
                num_samples=cfg.samples if cfg.search == "optuna" else 1,
                max_concurrent_trials=cfg.max_concurrent,
            ),
            run_config=tune.RunConfig(name=cfg.name, storage_path=str(out), verbose=0),
        )
    grid = tuner.fit()
    return write_front(grid, path)


def write_front(grid: Any, path: Path) -> dict[str, Any]:
    """``pareto.csv`` and ``pareto.png`` in ``path`` from Tune's results."""
    rows, failed, stopped = [], [], []
    for result in grid:
        m = result.metrics or {}
        if result.error is not None:
            log.warning("trial %s failed: %s", result.path, result.error)
            failed.append(str(result.path))
            continue
        if not m.get("done_run"):  # stopped early by the scheduler: no test figures, not on the front
            stopped.append(str(result.path))
            continue
        rows.append({**result.config, **{k: m[k] for k in REPORTED}, "run_dir": m["run_dir"]})
    front = pareto_front([(r["val_accuracy"], r["val_flops_fraction"]) for r in rows])  # chosen on validation
    for r, on in zip(rows, front):
        r["pareto"] = on
    rows.sort(key=lambda r: r["flops_fraction"])
    names = list(dict.fromkeys(k for r in rows for k in r))
    with open(path / "pareto.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, path / "pareto.png")
    return {"trials": rows, "front": [r for r in rows if r["pareto"]], "failed": failed, "stopped": stopped}


def _plot(rows: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    styles: tuple[tuple[bool, dict[str, Any]], ...] = (
        (False, {"color": "0.6", "label": "trials"}),
        (True, {"color": "C3", "label": "Pareto front (chosen on validation)"}),
    )
    for on, style in styles:
        pts = [r for r in rows if r["pareto"] == on]
        if pts:
            ax.errorbar(
                [100 * r["flops_fraction"] for r in pts],
                [100 * r["accuracy"] for r in pts],
                yerr=[
                    [100 * (r["accuracy"] - r["accuracy_ci95_low"]) for r in pts],
                    [100 * (r["accuracy_ci95_high"] - r["accuracy"]) for r in pts],
                ],
                fmt="o",
                capsize=2,
                **style,
            )
    front = [r for r in rows if r["pareto"]]
    ax.plot([100 * r["flops_fraction"] for r in front], [100 * r["accuracy"] for r in front], color="C3", lw=1)
    ax.set_xlabel("FLOPs (% of the full network)")
    ax.set_ylabel("test accuracy (%, 95% interval)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    with one_line_errors(argv):
        cfg = parse(SweepConfig, argv, description=__doc__.strip().splitlines()[0])
        result = sweep(cfg)
    stopped = f" ({len(result['stopped'])} more stopped early by the scheduler)" if result["stopped"] else ""
    print(f"{len(result['trials'])} trials{stopped}; Pareto front, chosen on validation (FLOPs, accuracy):")
    for r in result["front"]:
        swept = {k: v for k, v in r.items() if k in RUN_FIELDS and k != "run_dir"}
        print(
            f"  validation {r['val_flops_fraction']:.3f} {r['val_accuracy']:.4f}  "
            f"test {r['flops_fraction']:.3f} {r['accuracy']:.4f}  {swept}"
        )
    if result["failed"]:
        print(f"error: {len(result['failed'])} trial(s) failed (their error.txt says why): rerun with --restore")
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
