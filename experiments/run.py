"""Train and evaluate one routing agent on a frozen backbone.

    python experiments/run.py --agent hybrid_rnn                 # SkipNet's recurrent gates, embedded data
    python experiments/run.py --agent ppo --alpha 0.5
    python experiments/run.py --agent static --budget 0.6
    python experiments/run.py --eval-only --checkpoint runs/<run>/agent.pt --agent hybrid_rnn
    python experiments/run.py --help

Every default works offline: the backbone (CIFAR ResNet-38, width 0.5, on scikit-learn's digits)
is trained and cached on first use. TensorBoard logs and ``results.json`` go to
``runs/{env}__{agent}__{seed}__{time}/``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from agents.evaluate import EvalResult, calibrate_threshold, evaluate
from agents.policies import RoutingPolicy, ThresholdPolicy
from agents.registry import AGENTS, AgentContext, agents_taking_budget, get_agent, part_of
from agents.skipnet import starts_from_joint_gates
from agents.statistics import bootstrap_ci, paired_difference
from backbones.checkpoint import CheckpointMismatchError, atomic_save, fingerprint, mismatches, safe_load
from backbones.data import Dataset, data_fingerprint, groups_of
from backbones.device import Precision, resolve_device, seed_everything
from backbones.distributed import end, leave, ranks, start, stop
from backbones.options import build, current_names, flag, flatten, option_fields, replace
from backbones.registry import options as backbone_options
from experiments.cli import given_fields, one_line_errors, parse
from experiments.config import JOINT_GATES_AGENT, SAFE_ON_RESUME, RunConfig
from experiments.recipe import load_backbone_for, run_splits, training_epochs
from experiments.report import format_table, write_evaluation

log = logging.getLogger("skipnet_gym.run")


def new_run_dir(parent: Path, name: str) -> Path:
    """``parent/name``, or ``parent/name-2``, ``-3``, ... : a folder no other run has, created
    atomically (two runs started in the same second never share one)."""
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        path = parent / (name if i == 1 else f"{name}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not find a free run folder for {name} in {parent}")


def check_agent_checkpoint(state: dict, path: str, agent: str, metadata: dict) -> None:
    """Refuse an agent checkpoint made for another agent, backbone or data (named in the error)."""
    keys = ("agent", "backbone", "dataset", "backbone_fingerprint", "data_fingerprint")
    wrong = mismatches(state.get("metadata", {}), path, {k: metadata[k] for k in keys}, "this run has")
    if wrong:
        raise CheckpointMismatchError(
            f"agent checkpoint {path} does not fit this run ({'; '.join(wrong)}). Pass the --agent, --backbone, "
            f"--dataset and --data-root it was trained with."
        )


def resumed_config(cfg: RunConfig, saved: dict[str, Any] | None, given: set[str] | None = None) -> RunConfig:
    """The configuration a ``--resume`` continues: the one the checkpoint's run was started with,
    with the options in :data:`SAFE_ON_RESUME` taken from ``cfg``.

    Args:
        cfg: this invocation's configuration.
        saved: the run configuration stored in the checkpoint.
        given: the fields set on the command line (``None``: every field of ``cfg`` counts as given).

    Raises:
        ValueError: naming every given option that differs from the saved run and may not change.
    """
    if saved is None:
        raise CheckpointMismatchError(
            f"{cfg.checkpoint} holds no run configuration (written by an older version): it cannot be resumed "
            "exactly; start a new run"
        )
    names = set(option_fields(RunConfig))
    # a run saved before the recipes existed routed the base network, the only recipe then
    saved = current_names(RunConfig, saved)  # stored under an option's former name: today's
    started: RunConfig = build(RunConfig, {"backbone_recipe": "base", **{k: v for k, v in saved.items() if k in names}})
    given = names if given is None else given
    changed = {k: v for k, v in started.differences(cfg).items() if k in given and k not in SAFE_ON_RESUME}
    if changed:
        listed = "; ".join(f"{flag(k)}: the run has {a!r}, given {b!r}" for k, (a, b) in changed.items())
        raise ValueError(
            f"--resume continues the run as it was started, and these options differ: {listed}. Leave them out "
            f"(the run's values apply) or start a new run. Options that may change on resume: "
            f"{', '.join(flag(k) for k in sorted(SAFE_ON_RESUME))}"
        )
    mine = flatten(cfg)
    return replace(started, **{k: mine[k] for k in SAFE_ON_RESUME & given})


class ReportingWriter:
    """A TensorBoard writer that also hands every scalar to ``report(tag, value, step)``: how a
    sweep's trial reports its metrics while it trains."""

    def __init__(self, writer: Any, report: Callable[[str, float, int], None]) -> None:
        self.writer, self.report = writer, report

    def add_scalar(self, tag: str, value: Any, step: int | None = None, *args: Any, **kwargs: Any) -> None:
        self.writer.add_scalar(tag, value, step, *args, **kwargs)
        self.report(tag, float(value), int(step or 0))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.writer, name)


def checked(cfg: RunConfig, given: set[str] | None) -> tuple[RunConfig, dict | None]:
    """Stage 1: the options checked against each other before any work, and for ``--resume`` the
    configuration the run was started with (:func:`resumed_config`); returns it and the agent
    checkpoint's state (``--eval-only``, ``--resume``)."""
    get_agent(cfg.agent)  # fail on an unknown agent before any work
    if (cfg.eval_only or cfg.resume) and not cfg.checkpoint:
        raise ValueError("--eval-only and --resume need --checkpoint PATH (an agent checkpoint)")
    if cfg.eval_only and cfg.resume:
        raise ValueError("--eval-only and --resume exclude each other: evaluate a checkpoint, or continue its run")
    state = safe_load(cfg.checkpoint) if (cfg.eval_only or cfg.resume) and cfg.checkpoint else None
    if cfg.resume:
        assert state is not None
        cfg = resumed_config(cfg, state.get("metadata", {}).get("run_config"), given)
    if cfg.max_drop is not None and (
        cfg.agent != JOINT_GATES_AGENT or cfg.backbone_recipe != "skip_ready" or cfg.budget is not None
    ):
        raise ValueError(
            f"--max-drop searches the joint SP budget of --agent {JOINT_GATES_AGENT} on --backbone-recipe skip_ready, "
            "without --budget (it chooses the compute)"
        )
    if cfg.backbone_args and (cfg.backbone_checkpoint or "model_args" not in backbone_options(cfg.backbone)):
        raise ValueError(
            f"--backbone-args applies to zoo backbones (timm:<model>, torchvision:<model>), not {cfg.backbone}"
        )
    foreign = options_of_other_agents(cfg.agent, given or set())
    if foreign:
        raise ValueError(f"{foreign} (leave them out, or choose one of those agents)")
    if cfg.budget is not None and not get_agent(cfg.agent).takes_budget:  # a resumed run's agent: its own
        raise ValueError(
            f"--budget does not apply to --agent {cfg.agent}: price compute with --alpha (agents that take a budget: "
            f"{', '.join(agents_taking_budget())})"
        )
    return cfg, state


def options_of_other_agents(agent: str, given: set[str]) -> str:
    """What is wrong where ``given`` (flat option names) holds options of other agents' parts than
    ``agent``'s, which it would ignore; "" where nothing is."""
    mine = part_of(agent, get_agent(agent))
    owners: dict[str, list[str]] = {}
    for name in sorted(given):
        path = option_fields(RunConfig)[name].path
        if path[0] == "agent_options" and path[1] != mine:
            owners[flag(name)] = [n for n, spec in AGENTS.items() if part_of(n, spec) == path[1]]
    return "; ".join(f"{f} is an option of {', '.join(a)}, not of --agent {agent}" for f, a in owners.items())


def run_identity(cfg: RunConfig, backbone: Any, split: dict[str, Dataset]) -> dict[str, Any]:
    """What every checkpoint of the run carries: the agent, the backbone's and data's identity, the
    configuration (flat, under the flags' names)."""
    return {
        "agent": cfg.agent,
        "backbone": backbone.arch,
        "dataset": cfg.dataset,
        "backbone_fingerprint": fingerprint(backbone),
        "data_fingerprint": data_fingerprint(split.values()),
        "num_classes": backbone.num_classes,
        "input_size": list(backbone.input_size),
        "run_config": flatten(cfg),
    }


def run_folder(cfg: RunConfig, env: str) -> Path:
    """Where the run writes: a resumed run continues in its own folder; a new run, or an evaluation,
    gets a folder of its own, never the checkpoint's."""
    if cfg.resume and cfg.checkpoint:
        return Path(cfg.checkpoint).parent
    kind = "eval" if cfg.eval_only else str(cfg.seed)
    return new_run_dir(Path(cfg.run_dir), f"{env}__{cfg.agent}__{kind}__{int(time.time())}")


def open_writer(run_dir: Path, cfg: RunConfig, report: Callable[[str, float, int], None] | None) -> Any:
    """The run's TensorBoard writer (also reporting every scalar to ``report``), its options logged."""
    from torch.utils.tensorboard import SummaryWriter

    writer: Any = SummaryWriter(str(run_dir))
    if report is not None:
        writer = ReportingWriter(writer, report)
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in flatten(cfg).items())
    )
    return writer


def calibrate(
    policy: ThresholdPolicy,
    backbone: Any,
    val: Dataset,
    budget: float,
    device: torch.device,
    batch: int,
    precision: Precision,
    checkpoint: Path,
) -> tuple[dict[str, float], EvalResult]:
    """``--calibrate``: the gates' threshold moved until the validation images spend ``budget``
    (:func:`agents.evaluate.calibrate_threshold`), written into the agent checkpoint beside the gates
    (``threshold``: what an evaluation of the checkpoint uses); returns what it did, and the
    validation images' evaluation at the threshold."""
    before = evaluate(policy, backbone, val, device, batch, precision=precision)
    threshold, result = calibrate_threshold(policy, backbone, val, budget, device, batch, precision, start=before)
    if ranks().main:  # under torchrun the ranks calibrate together (each evaluating its part); rank 0 writes
        atomic_save({**safe_load(checkpoint), "threshold": threshold}, checkpoint)
    log.info(
        "calibrated the gates to --budget %.3f on validation: threshold %+.3f, %.1f%% -> %.1f%% of the FLOPs",
        budget, threshold, 100 * before.flops_fraction, 100 * result.flops_fraction,
    )  # fmt: skip
    record = {
        "budget": budget,
        "threshold": threshold,
        "val_accuracy_before": before.accuracy,
        "val_flops_before": before.flops_fraction,
        "val_flops": result.flops_fraction,
    }
    return record, result


def recipe_hrl_stages(backbone_meta: dict[str, Any]) -> list[dict[str, Any]]:
    """What the recipe's HRL did on validation images (the recipe's gates before and after it, as
    the stage recorded it), as lines of the run's stage table; none where the stage did not run."""
    hrl = backbone_meta.get("skip_ready", {}).get("hrl", {})
    if "val_accuracy_after" not in hrl:
        return []
    named = (("joint SP's gates", "before"), (f"after the recipe's HRL ({hrl['iterations']} it.)", "after"))
    lines = [
        {"stage": what, "val_accuracy": hrl[f"val_accuracy_{when}"], "val_flops_fraction": hrl[f"val_flops_{when}"]}
        for what, when in named
    ]
    if hrl.get("kept") == "joint":  # validation handed joint SP's network on
        lines.append(
            {
                "stage": "kept: joint SP's (validation, at the budget)",
                "val_accuracy": hrl["val_accuracy_before_at_budget"],
            }
        )
    return lines


def run(
    cfg: RunConfig, given: set[str] | None = None, report: Callable[[str, float, int], None] | None = None
) -> dict[str, Any]:
    """Train (or load) ``cfg.agent``, evaluate it on the validation split (``val_*``: what choices
    between runs are made on) and, with the full backbone, on the test split (what is reported);
    write ``results.json`` in a new run folder; returns the results.

    ``given``: the options set on the command line, for ``--resume`` (see :func:`resumed_config`).
    ``report``: called with every scalar the run logs, as it logs it (see :class:`ReportingWriter`).
    """
    cfg, state = checked(cfg, given)
    cfg = cfg.with_budget_recipe()
    spec = get_agent(cfg.agent)
    if not cfg.backbone_checkpoint:
        backbone_options(cfg.backbone)  # an unknown name is refused before the data is read
    t0 = time.perf_counter()
    seed_everything(cfg.seed, cfg.torch_deterministic)
    device = resolve_device(cfg.device)
    split = run_splits(cfg)
    # batch sizes left unset: the device's defaults (at most the training set), recorded with the run
    num_envs, eval_batch = cfg.for_device(device, max_batch=len(split["train"])).batch_sizes()
    if len(split["train"]) < num_envs:
        raise ValueError(
            f"--num-envs {num_envs} is more than the {len(split['train'])} training images of {cfg.dataset}"
        )
    backbone, backbone_meta = load_backbone_for(cfg, device, split)
    if not spec.data_parallel or cfg.eval_only:
        leave()  # under torchrun, the stages from here on run on rank 0 alone
    here = ranks()  # under torchrun, with a data-parallel agent: until it has trained
    if "max_drop" in backbone_meta:  # the run goes on at the joint budget the search chose
        cfg = replace(cfg, joint_budget=backbone_meta["max_drop"]["chosen_budget"])
    # the stages' lengths depend on whether the agent's gates start from the backbone's joint ones
    joint_gates = starts_from_joint_gates(cfg.agent, cfg.gates.options(), backbone_meta)
    cfg = cfg.for_device(device, max_batch=len(split["train"]), joint_gates=joint_gates)
    base = backbone_meta.pop("base", None)  # the network a skip-ready backbone was made from
    backbone = backbone.to(device).eval()
    metadata = run_identity(cfg, backbone, split)
    stage = None
    if state is not None:
        assert cfg.checkpoint is not None  # the state was read from it
        check_agent_checkpoint(state, cfg.checkpoint, cfg.agent, metadata)
        stage = state["metadata"].get("stage")
    if cfg.eval_only and stage != "done":
        log.warning(
            "warning: %s is unfinished (stage %r): evaluating the policy as it was when the checkpoint was written",
            cfg.checkpoint,
            stage,
        )
    run_dir = Path(here.from_main(str(run_folder(cfg, spec.env)) if here.main else None))  # rank 0's alone
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else run_dir / "agent.pt"
    writer = open_writer(run_dir, cfg, report) if here.main else None
    own = cfg.agent_options.get(part_of(cfg.agent, spec)) if spec.options is not None else None
    ctx = AgentContext(cfg, backbone, split["train"], device, checkpoint, metadata, writer, backbone_meta, own)

    def test(policy: RoutingPolicy, net: Any, part: str = "test") -> Any:
        return evaluate(policy, net, split[part], device, eval_batch, precision=cfg.precision)

    # the frozen backbone's own accuracy, before --hrl-finetune-backbone (or a loaded checkpoint) changes it
    full = test(RoutingPolicy(), backbone)
    base_result = None if base is None else test(RoutingPolicy(), base)
    # what each stage of the recipe did, on validation images: first the networks with every block run
    networks = [("base network", base)] if base is not None else []
    stages = [
        {"stage": f"{name}, every block", "val_accuracy": test(RoutingPolicy(), net, "val").accuracy}
        for name, net in [*networks, ("routed network", backbone)]
    ]
    stages += recipe_hrl_stages(backbone_meta)
    log.info("full backbone: test accuracy %.4f", full.accuracy)
    t_train = time.perf_counter()
    policy = spec.load(ctx, state) if cfg.eval_only and state is not None else spec.train(ctx, state)
    train_seconds = time.perf_counter() - t_train
    log.info("%s trained in %.1f s", cfg.agent, train_seconds)
    target = cfg.calibration_budget(joint_gates)
    if target is None and cfg.calibrate:  # an agent that asks for one (PPO started from the recipe's gates: theirs)
        target = policy.calibrate_to
    calibration, val = None, None
    if target is not None and isinstance(policy, ThresholdPolicy) and not cfg.eval_only:
        calibration, val = calibrate(
            policy, backbone, split["val"], target, device, eval_batch, cfg.precision, checkpoint
        )
    # validation figures, what any choice between runs (a sweep, a front, a budget) is made on; test is reported
    val, result = val if val is not None else test(policy, backbone, "val"), test(policy, backbone)
    leave()  # a data-parallel agent trained and was evaluated on every rank (each its part); rank 0 writes
    if calibration is not None:
        stages.append(
            {"stage": f"{cfg.agent} as trained", "val_accuracy": calibration["val_accuracy_before"],
             "val_flops_fraction": calibration["val_flops_before"]}
        )  # fmt: skip
    stages.append(
        {"stage": f"{cfg.agent}" + (f", calibrated to {target:g}" if calibration else ""),
         "val_accuracy": val.accuracy, "val_flops_fraction": val.flops_fraction}
    )  # fmt: skip
    groups = groups_of(split["test"])  # what the test intervals resample: its independent units
    out = {
        "agent": cfg.agent,
        "backbone": backbone.arch,
        "dataset": cfg.dataset,
        "alpha": cfg.alpha,
        "seed": cfg.seed,
        "device": str(device),
        **result.as_dict(),
        **write_evaluation(run_dir, writer, result, val, full, base_result, split, cfg.seed),
        "full_backbone_accuracy": full.accuracy,
        "full_backbone_accuracy_ci95": list(bootstrap_ci(full.per_image["correct"], cfg.seed, groups=groups)),
        "backbone_test_accuracy_at_training": backbone_meta.get("test_accuracy"),
        "training_epochs": training_epochs(cfg, backbone_meta, len(split["train"])),
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - t0,
        "checkpoint": str(checkpoint),
        "run_dir": str(run_dir),
        "config": flatten(cfg),
    }
    if base_result is not None:  # the skip-ready recipe against the network it started from
        out["base_backbone_accuracy"] = base_result.accuracy
        out["accuracy_vs_base"] = paired_difference(
            result.per_image["correct"], base_result.per_image["correct"], cfg.seed, groups
        )
    if "max_drop" in backbone_meta:
        out["max_drop"] = backbone_meta["max_drop"]
    if calibration is not None:
        out["calibration"] = calibration
    out["stages"] = stages
    if "skip_ready" in backbone_meta:
        out["skip_ready_backbone"] = backbone_meta.get("checkpoint", cfg.backbone_checkpoint)
    if cfg.eval_only:
        out["evaluated_checkpoint"] = {"path": str(checkpoint), "stage": stage, "finished": stage == "done"}
    (run_dir / "results.json").write_text(json.dumps(out, indent=2))
    return out


def agents_listed() -> str:
    """The registered agents, for ``--help`` (a parser's epilog is formatted when it is printed,
    after ``--agents-from`` registered the user's)."""
    return "agents: " + ", ".join(AGENTS)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line: user errors print one line (``--debug`` for the traceback); bugs print theirs."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    with one_line_errors(argv):
        cfg = parse(
            RunConfig, argv, description=__doc__.strip().splitlines()[0], epilog=agents_listed(), data_parallel=True
        )
        here, device = start(cfg.device)  # under torchrun: the recipe's training stages on every rank
        if here.distributed:
            cfg = replace(cfg, device=str(device))
        try:
            result = run(cfg, given_fields(RunConfig, argv))
        finally:
            stop()
    print(format_table(result))
    end(here)  # under torchrun: rank 0, alone since the agent was evaluated, ends here
    return result


if __name__ == "__main__":
    main()
