"""Smoke tests of the real entry points with tiny budgets: their ``main`` called in this process
(:func:`conftest.call_entry_point`), one new process per entry point (``--help``)."""

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.registry import AGENTS
from tests.conftest import call_entry_point

pytestmark = pytest.mark.slow  # entry points end to end

ROOT = Path(__file__).resolve().parents[1]
# the base network as trained (the recipe's skip-ready stage has tests of its own, below)
TINY_BACKBONE = [
    *("--backbone-recipe", "base", "--dataset", "digits", "--backbone", "cifar_resnet20", "--width", "0.25"),
    *("--backbone-epochs", "1"),
]
# every registered agent's seconds-long run, as it declared it
TINY_BUDGETS = {name: list(spec.smoke) for name, spec in AGENTS.items()}


@pytest.fixture
def cache(shared_cache):
    return shared_cache


def run(args, cache, cwd, script="experiments/run.py", check=True):
    with contextlib.chdir(cwd):
        proc = call_entry_point(script, args, cache)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("agent", list(TINY_BUDGETS))
def test_every_agent_trains_evaluates_and_reloads(agent, cache, tmp_path):
    proc = run(
        ["--agent", agent, *TINY_BACKBONE, *TINY_BUDGETS[agent], "--no-progress", "--run-dir", str(tmp_path / "runs")],
        cache,
        tmp_path,
    )
    assert "accuracy" in proc.stdout and "FLOPs spent" in proc.stdout
    (results,) = (tmp_path / "runs").glob("*__*/results.json")
    env = "SkipNetOneShot-v0" if agent in ("blockdrop", "ppo_oneshot") else "SkipNet-v0"
    assert results.parent.name.startswith(f"{env}__{agent}__")  # named by the env the agent decides in
    r = json.loads(results.read_text())
    assert (
        r["agent"] == agent and 0 <= r["accuracy"] <= 1 and 0 < r["flops_fraction"] <= 1.2
    )  # FFGate-I costs ~15% of a block
    assert len(r["execute_rate"]) == 8 and r["full_backbone_accuracy"] > 0
    assert r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1]
    # validation figures beside test ones, on the validation images (digits: 180), what runs are chosen by
    assert r["val_num_images"] == 180 and 0 <= r["val_accuracy"] <= 1 and 0 < r["val_flops_fraction"] <= 1.2
    assert "validation" in proc.stdout
    assert -1 <= r["difficulty_spearman"] <= 1 and 0 <= r["dynamic_blocks"] <= 8
    for name in ("gallery.png", "heatmap.png", "per_image.npz"):
        assert (results.parent / name).stat().st_size > 0
    assert any(results.parent.glob("events.out.tfevents.*"))
    again = run(  # the smoke run's options again: its backbone where it names one
        [
            "--agent",
            agent,
            *TINY_BACKBONE,
            *TINY_BUDGETS[agent],
            "--eval-only",
            "--checkpoint",
            r["checkpoint"],
            "--no-progress",
        ],  # fmt: skip
        cache,
        tmp_path,
    )
    assert "accuracy" in again.stdout
    assert json.loads(results.read_text()) == r  # the evaluation wrote its own folder, not over the training's
    (evaluation,) = (tmp_path / "runs").glob(f"*__{agent}__eval__*/results.json")
    reloaded = json.loads(evaluation.read_text())
    assert reloaded["evaluated_checkpoint"] == {"path": r["checkpoint"], "stage": "done", "finished": True}
    if agent.startswith("hybrid_") or agent in ("blockdrop", "static", "full", "confidence_exit"):  # deterministic
        assert reloaded["accuracy"] == r["accuracy"] and reloaded["flops_fraction"] == r["flops_fraction"]


@pytest.mark.parametrize("agent", list(TINY_BUDGETS))
def test_every_agent_runs_on_a_vit(agent, cache, tmp_path):
    """Issue 22: every registered agent trains and is evaluated on a ViT from timm (its patch tokens
    routed as a CNN's activations are), with its seconds-long options and no agent code of its own."""
    from agents.early_exit import VIT_SMOKE

    args = ["--agent", agent, *TINY_BACKBONE, *TINY_BUDGETS[agent], *VIT_SMOKE]
    run([*args, "--no-progress", "--run-dir", str(tmp_path / "runs")], cache, tmp_path)
    (results,) = (tmp_path / "runs").glob(f"*__{agent}__*/results.json")
    r = json.loads(results.read_text())
    assert r["backbone"] == "timm:vit_tiny_patch16_224" and len(r["execute_rate"]) == 8  # 9 blocks, 8 gated
    assert 0 <= r["accuracy"] <= 1 and 0 < r["flops_fraction"] <= 1.2 and r["full_backbone_accuracy"] > 0


@pytest.mark.parametrize("network", ["vit", "cnn"])
def test_ppo_decides_with_the_exit_action_and_its_exits_are_evaluated_as_they_were_taken(network, cache, tmp_path):
    """``--sb3-early-exit``: PPO in ``SkipNet-v0`` with the exit action (on a ViT, whose head reads any
    depth; on a CNN, with exit heads fitted beside it, kept in the agent's checkpoint); the
    evaluation routes the exits it takes (every later block skipped), and reloads them."""
    from agents.early_exit import VIT_SMOKE
    from backbones.checkpoint import safe_load

    vit = list(VIT_SMOKE) if network == "vit" else []
    args = ["--agent", "ppo", *TINY_BACKBONE, *TINY_BUDGETS["ppo"], *vit, "--sb3-early-exit", "--alpha", "4"]
    args += ["--no-progress", "--run-dir", str(tmp_path / "runs")]
    run(args, cache, tmp_path)
    (results,) = (tmp_path / "runs").glob("*__ppo__*/results.json")
    r = json.loads(results.read_text())
    assert np.load(results.parent / "per_image.npz")["executed"].shape[1] == 8 and 0 < r["flops_fraction"] <= 1
    proc = run([*args[:-3], "--eval-only", "--checkpoint", r["checkpoint"], "--no-progress"], cache, tmp_path)
    assert "accuracy" in proc.stdout
    (evaluation,) = (tmp_path / "runs").glob("*__ppo__eval__*/results.json")
    reloaded = json.loads(evaluation.read_text())  # deterministic: the same
    assert reloaded["flops_fraction"] == r["flops_fraction"] and reloaded["accuracy"] == r["accuracy"]
    assert ("exit_heads" in safe_load(r["checkpoint"])) == (network == "cnn")


def test_finetune_backbone_run_reports_the_frozen_backbone_beside_it(cache, tmp_path):
    args = [
        "--agent",
        "hybrid_rnn",
        *TINY_BACKBONE,
        *TINY_BUDGETS["hybrid_rnn"],
        "--hrl-finetune-backbone",
        "--no-progress",
        "--run-dir",
        str(tmp_path / "runs"),
    ]
    run(args, cache, tmp_path)
    (results,) = (tmp_path / "runs").glob("*/results.json")
    r = json.loads(results.read_text())
    assert r["full_backbone_accuracy"] == pytest.approx(r["backbone_test_accuracy_at_training"])
    again = run(
        ["--agent", "hybrid_rnn", *TINY_BACKBONE, "--eval-only", "--checkpoint", r["checkpoint"], "--no-progress"],
        cache,
        tmp_path,
    )  # the fine-tuned weights travel with the gates
    reloaded = json.loads(results.read_text())
    assert "accuracy" in again.stdout and reloaded["accuracy"] == r["accuracy"]


def test_bad_input_is_explained(cache, tmp_path):
    proc = run(["--agent", "dqn"], cache, tmp_path, check=False)
    assert proc.returncode != 0 and "valid agents" in proc.stderr and "hybrid_rnn" in proc.stderr
    empty = tmp_path / "empty-cache"
    proc = run(["--backbone", "resnet9000", "--no-progress"], empty, tmp_path, check=False)
    assert proc.returncode != 0 and "cifar_resnet110" in proc.stderr
    assert not empty.exists()  # refused before the data was made (the generated data is cached there)
    proc = run(["--dataset", "imagenet22k"], cache, tmp_path, check=False)
    assert proc.returncode != 0 and "valid names" in proc.stderr
    proc = run(["--eval-only"], cache, tmp_path, check=False)
    assert proc.returncode != 0 and "--checkpoint" in proc.stderr
    # another agent's options would be ignored: refused, naming whose they are
    proc = run(["--agent", "hybrid_rnn", "--sb3-early-exit", "--blockdrop-width", "4"], empty, tmp_path, check=False)
    assert proc.returncode == 2 and "--sb3-early-exit is an option of ppo, a2c, recurrent_ppo" in proc.stderr
    assert "--blockdrop-width is an option of blockdrop, not of --agent hybrid_rnn" in proc.stderr
    assert not empty.exists()


@pytest.mark.parametrize(
    ("script", "args", "says"),
    [
        ("run.py", ["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device"),
        ("compare.py", ["--agents", "foo"], "valid agents"),
        ("sweep.py", ["--grid", "alpha="], "--grid"),
        ("train_backbone.py", ["--dataset", "imagenet22k"], "valid names"),
        ("bench.py", ["--backbone", "resnet9000"], "valid"),
        ("reproduce.py", ["--preset", "nope"], "nope"),
    ],
)
def test_every_entry_point_answers_bad_input_with_one_line_before_any_work(script, args, says, tmp_path):
    """Exit status 2, one line that names the fix, no traceback, and nothing trained or written first."""
    if script == "sweep.py":
        pytest.importorskip("ray.tune")
    proc = run(args, tmp_path / "cache", tmp_path, script=f"experiments/{script}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert says in line
    assert not (tmp_path / "cache" / "backbones").exists()


def test_checkpoint_of_another_agent_or_backbone_is_refused(cache, tmp_path):
    run(["--agent", "static", *TINY_BACKBONE, "--no-progress", "--run-dir", str(tmp_path / "runs")], cache, tmp_path)
    (ckpt,) = (tmp_path / "runs").glob("*/agent.pt")
    proc = run(
        ["--agent", "random", *TINY_BACKBONE, "--eval-only", "--checkpoint", str(ckpt)], cache, tmp_path, check=False
    )
    assert proc.returncode != 0 and "agent: checkpoint has 'static'" in proc.stderr
    other = [*TINY_BACKBONE[:-1], "2"]  # other weights
    proc = run(["--agent", "static", *other, "--eval-only", "--checkpoint", str(ckpt)], cache, tmp_path, check=False)
    assert proc.returncode != 0 and "backbone_fingerprint" in proc.stderr


def test_resume_refuses_changed_config(cache, tmp_path):
    args = [*("--agent", "hybrid_rnn"), *TINY_BACKBONE, *("--sp-epochs", "1", "--num-envs", "32", "--no-progress")]
    run([*args, "--hrl-iterations", "2", "--run-dir", str(tmp_path / "runs")], cache, tmp_path)
    (ckpt,) = (tmp_path / "runs").glob("*/agent.pt")
    proc = run([*args, "--hrl-iterations", "5", "--resume", "--checkpoint", str(ckpt)], cache, tmp_path, check=False)
    assert proc.returncode == 2
    assert "--hrl-iterations: the run has 2, given 5" in proc.stderr and "Traceback" not in proc.stderr
    # the options left out take the run's values; the learning rates may change
    proc = run(["--resume", "--checkpoint", str(ckpt), "--hrl-lr", "1e-5", "--no-progress"], cache, tmp_path)
    r = json.loads((ckpt.parent / "results.json").read_text())
    assert r["config"]["hrl_iterations"] == 2 and r["config"]["hrl_lr"] == 1e-5 and r["config"]["sp_epochs"] == 1


def test_resuming_a_finished_sb3_run_evaluates_it_again(cache, tmp_path):
    args = ["--agent", "ppo", *TINY_BACKBONE, *TINY_BUDGETS["ppo"], "--no-progress"]
    run([*args, "--run-dir", str(tmp_path / "runs")], cache, tmp_path)
    (ckpt,) = (tmp_path / "runs").glob("*/agent.pt")
    first = json.loads((ckpt.parent / "results.json").read_text())
    proc = run(["--resume", "--checkpoint", str(ckpt), "--no-progress"], cache, tmp_path)
    assert "accuracy" in proc.stdout
    again = json.loads((ckpt.parent / "results.json").read_text())
    assert again["accuracy"] == first["accuracy"] and again["config"]["sb3_timesteps"] == 600


def test_eval_only_keeps_training_results_and_warns_on_unfinished_checkpoints(cache, tmp_path):
    import torch

    args = ["--agent", "static", *TINY_BACKBONE, "--no-progress"]
    run([*args, "--run-dir", str(tmp_path / "train")], cache, tmp_path)
    (ckpt,) = (tmp_path / "train").glob("*/agent.pt")
    before = {p.name: p.read_bytes() for p in ckpt.parent.iterdir() if p.is_file()}
    proc = run([*args, "--eval-only", "--checkpoint", str(ckpt), "--run-dir", str(tmp_path / "eval")], cache, tmp_path)
    assert {p.name: p.read_bytes() for p in ckpt.parent.iterdir() if p.is_file()} == before
    (evaluation,) = (tmp_path / "eval").glob("SkipNet-v0__static__eval__*/results.json")
    assert json.loads(evaluation.read_text())["evaluated_checkpoint"]["finished"] is True
    assert "unfinished" not in proc.stderr
    state = torch.load(ckpt, weights_only=True)
    state["metadata"]["stage"] = "train"  # as a run killed mid-training leaves it
    torch.save(state, ckpt)
    proc = run([*args, "--eval-only", "--checkpoint", str(ckpt), "--run-dir", str(tmp_path / "eval")], cache, tmp_path)
    assert "is unfinished (stage 'train')" in proc.stderr


def test_bad_options_are_one_line_errors_before_any_work(cache, tmp_path):
    for flag, value, expected in [
        ("--num-envs", "0", "--num-envs must be an integer >= 1, got 0"),
        ("--hrl-iterations", "-5", "--hrl-iterations must be an integer >= 0"),
        ("--seed", "-1", "--seed must be an integer >= 0"),
        ("--alpha", "-1", "--alpha must be a finite number >= 0"),
        ("--eval-batch", "0", "--eval-batch must be an integer >= 1"),
    ]:
        proc = run([flag, value, "--run-dir", str(tmp_path / "runs")], cache, tmp_path, check=False)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
        assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
    proc = run(["--num-envs", "0", "--debug"], cache, tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    proc = run([*TINY_BACKBONE, "--num-envs", "5000", "--no-progress"], cache, tmp_path, check=False)
    assert proc.returncode == 2 and "more than the 1258 training images" in proc.stderr


def test_compare_writes_table_csv_json_and_curves(cache, tmp_path):
    out = tmp_path / "cmp"
    run(
        [
            *("--agents", "hybrid_rnn", "random", "static", "full"),
            *("--alphas", "0.5", "4.0", "--seeds", "0", "1"),
            *("--hrl-iterations", "2", "--sp-epochs", "1", "--num-envs", "32"),
            *TINY_BACKBONE,
            *("--out-dir", str(out), "--run-dir", str(tmp_path / "r")),
        ],
        cache,
        tmp_path,
        script="experiments/compare.py",
    )
    table = (out / "compare.md").read_text()
    for agent in ("hybrid_rnn", "random", "static", "full"):
        assert agent in table
    assert "Paired differences at equal compute" in table
    result = json.loads((out / "compare.json").read_text())
    seeds = {p["agent"]: p["seeds"] for p in result["points"]}
    assert seeds == {"hybrid_rnn": 2, "random": 2, "static": 2, "full": 1}  # the static mixture is seeded, full is not
    hybrid = [p for p in result["points"] if p["agent"] == "hybrid_rnn"]
    assert len(hybrid) == 2 and all(len(p["run_dirs"]) == 2 for p in hybrid)
    assert all(len(set(p["run_dirs"])) == len(p["run_dirs"]) for p in result["points"])  # one folder per run
    for row in result["paired"]:
        assert row["vs_static"]["ci95"][0] <= row["vs_static"]["difference"] <= row["vs_static"]["ci95"][1]
    # the matched baselines' budgets are the compute the learned points spent on validation images, not test
    val_flops = [np.mean([json.loads((Path(d) / "results.json").read_text())["val_flops_fraction"] for d in
                          p["run_dirs"]]) for p in hybrid]  # fmt: skip
    static_settings = {p["setting"] for p in result["points"] if p["agent"] == "static"}
    assert static_settings == {f"budget={min(f, 1.0):.3f}" for f in val_flops}
    assert (out / "compare.csv").read_text().count("\n") == len(result["points"]) + 1
    assert (out / "compare.png").stat().st_size > 0


def test_compare_curves_area_and_paired_area_on_planted_points(tmp_path):
    import numpy as np

    from experiments.compare import Point, write_outputs

    rng = np.random.default_rng(0)

    def point(agent, flops, acc, setting):
        correct = (rng.random((1, 4000)) < acc).astype(float)
        runs = [
            {
                "flops_fraction": flops,
                "accuracy": correct.mean(),
                "policy_flops_fraction": 0.0,
                "dynamic_blocks": 0,
                "difficulty_spearman": 0.0,
                "train_seconds": 1.0,
                "run_dir": str(tmp_path / f"{agent}-{setting}"),
            }
        ]
        return Point(agent, setting, runs, correct)

    points = [point("good", f, 0.9, f"a{f}") for f in (0.3, 0.6, 0.9)]
    points += [point("static", f, 0.8, f"b{f}") for f in (0.2, 0.5, 0.8)]
    from agents.statistics import auc_difference, curve_auc

    lo, hi = 0.3, 0.8
    res = {
        name: curve_auc([p.flops for p in ps], np.stack([p.correct[0] for p in ps]), lo, hi)
        for name, ps in (("good", points[:3]), ("static", points[3:]))
    }
    auc = {"range": [lo, hi], "good": {"auc": res["good"]["auc"], "ci95": res["good"]["ci95"]}}
    auc["good"]["vs_static"] = auc_difference(res["good"], res["static"])
    assert auc["good"]["vs_static"]["difference"] == pytest.approx(0.1, abs=0.02)
    assert auc["good"]["vs_static"]["ci95"][0] > 0.05
    paths = write_outputs({"points": points, "paired": [], "auc": auc}, tmp_path / "out", "planted", 0)
    assert "Area under the accuracy-vs-FLOPs curve" in paths[0].read_text()
    assert all(p.exists() for p in paths)


def test_bench_runs_small(tmp_path):
    out = tmp_path / "bench.json"
    args = [
        *("--backbone", "cifar_resnet20", "--width", "0.25", "--in-channels", "1", "--image-size", "16"),
        *("--batch", "8", "--rounds", "1", "--parts", "forward", "throughput", "savings", "recipe", "static"),
        *("--recipe-images", "32", "--recipe-hrl", "2", "--out", str(out)),
    ]
    proc = call_entry_point("bench.py", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    figures = result["batches"]["8"]
    assert figures["forward_ms"]["eager fp32"] > 0 and figures["throughput"]["vector env, torch tensors"] > 0
    head, *rows = figures["savings"]
    assert head["best_full"] in figures["forward_ms"] and [r["execute_rate"] for r in rows] == [0.25, 0.5, 0.75, 1.0]
    assert result["recipe"]["sp_epoch_s"] > 0 and result["recipe"]["hrl_episodes_per_s"] > 0
    assert result["static"]["path_points"] >= 2


def test_a_stored_run_lacking_an_option_of_this_version_is_not_reused():
    """A run made before an option existed may have used another value of it (its default could
    have changed since): a comparison reruns it rather than taking today's default."""
    from backbones.options import flatten
    from experiments.compare import _config_key
    from experiments.config import RunConfig

    cfg = RunConfig(agent="blockdrop", device="cpu")
    stored = flatten(cfg.for_device(torch.device("cpu")))
    assert _config_key(stored) == _config_key(cfg)
    del stored["blockdrop_reward"]
    assert _config_key(stored) is None


SKIP_READY = ["--backbone-recipe", "skip_ready", "--joint-epochs", "1", "--recipe-hrl-iterations", "2"]


@pytest.fixture(scope="module")
def skip_ready_checkpoint(shared_cache, tmp_path_factory):
    """The tiny skip-ready backbone, made once by a recipe run (base -> joint SP -> hybrid_rnn)."""
    tmp = tmp_path_factory.mktemp("recipe")
    run(
        ["--agent", "hybrid_rnn", *TINY_BACKBONE, *SKIP_READY, *TINY_BUDGETS["hybrid_rnn"], "--no-progress",
         "--run-dir", str(tmp / "runs")],
        shared_cache,
        tmp,
    )  # fmt: skip
    (results,) = (tmp / "runs").glob("SkipNet-v0__*/results.json")
    return json.loads(results.read_text())


def test_the_recipe_reports_against_the_base_network(skip_ready_checkpoint):
    r = skip_ready_checkpoint
    assert Path(r["skip_ready_backbone"]).is_file() and Path(r["skip_ready_backbone"]).name.startswith("skipready-")
    assert 0 <= r["base_backbone_accuracy"] <= 1 and "ci95" in r["accuracy_vs_base"]
    with np.load(Path(r["run_dir"]) / "per_image.npz") as f:
        assert f["base_correct"].shape == f["correct"].shape
        # the validation images' outcomes too, what paired choices between runs are made on
        assert f["val_correct"].shape == (180,) and f["val_correct"].mean() == pytest.approx(r["val_accuracy"])


@pytest.mark.parametrize("agent", ["hybrid_rnn", "hybrid_ff", "ppo", "blockdrop", "static", "random", "full"])
def test_every_agent_runs_on_the_skip_ready_backbone(agent, skip_ready_checkpoint, cache, tmp_path):
    """A skip-ready backbone is an ordinary backbone checkpoint: every agent routes it, frozen, and the
    recipe's cached one is the same network (no second joint SP)."""
    path = skip_ready_checkpoint["skip_ready_backbone"]
    args = ["--agent", agent, *TINY_BACKBONE, *TINY_BUDGETS[agent], "--no-progress", "--run-dir", str(tmp_path)]
    proc = run([*args, "--backbone-checkpoint", path], cache, tmp_path)
    if agent == "hybrid_rnn":  # SkipNet's gates are the recipe's (joint SP's, then its HRL's)
        assert "starts from the gates the recipe trained" in proc.stderr
    (results,) = tmp_path.glob("*__*/results.json")  # SkipNetOneShot-v0__blockdrop__...: its env
    r = json.loads(results.read_text())
    assert r["skip_ready_backbone"] == path
    assert r["full_backbone_accuracy"] == skip_ready_checkpoint["full_backbone_accuracy"]


@pytest.mark.parametrize(
    "agent, start, said",
    [
        ("ppo", "--sb3-distill-epochs 1", "ppo starts from the recipe's gates: 1 epochs of behaviour cloning"),
        ("recurrent_ppo", "--sb3-from-gates", "recurrent_ppo holds the recipe's budget 0.5"),
    ],
)
def test_ppo_starts_from_the_recipes_gates_and_is_calibrated_to_their_budget(
    agent, start, said, skip_ready_checkpoint, cache, tmp_path
):
    path = skip_ready_checkpoint["skip_ready_backbone"]
    args = ["--agent", agent, *TINY_BACKBONE, *TINY_BUDGETS[agent], *start.split(), "--no-progress"]
    proc = run([*args, "--backbone-checkpoint", path, "--run-dir", str(tmp_path)], cache, tmp_path)
    assert said in proc.stderr
    if agent == "recurrent_ppo":  # the gates themselves, trained at the rate that keeps them
        assert "recurrent_ppo's actor is the recipe's gate" in proc.stderr and "learning rate 1e-05" in proc.stderr
    (results,) = tmp_path.glob("*__*/results.json")
    r = json.loads(results.read_text())
    assert r["calibration"]["budget"] == 0.5 and abs(r["val_flops_fraction"] - 0.5) < 0.1
    # the calibrated threshold travels with the checkpoint: evaluating it gives the same routes
    evaluation = ["--eval-only", "--checkpoint", r["checkpoint"], "--run-dir", str(tmp_path / "eval")]
    again = run([*args, "--backbone-checkpoint", path, *evaluation], cache, tmp_path)
    assert again.returncode == 0
    (evaluated,) = (tmp_path / "eval").glob("*__*/results.json")
    assert json.loads(evaluated.read_text())["flops_fraction"] == r["flops_fraction"]
    # --no-calibrate: the policy as trained (the same training: its spending is the calibration's start)
    as_trained = run([*args, "--backbone-checkpoint", path, "--no-calibrate", "--run-dir", str(tmp_path / "raw")],
                     cache, tmp_path)  # fmt: skip
    assert "calibrated" not in as_trained.stderr
    (raw,) = (tmp_path / "raw").glob("*__*/results.json")
    raw_result = json.loads(raw.read_text())
    assert "calibration" not in raw_result
    assert raw_result["val_flops_fraction"] == pytest.approx(r["calibration"]["val_flops_before"])


def test_budget_is_refused_by_agents_that_cannot_meet_it(cache, tmp_path):
    proc = run(["--agent", "ppo", "--budget", "0.5", *TINY_BACKBONE], cache, tmp_path, check=False)
    assert proc.returncode == 2 and "--budget does not apply to --agent ppo" in proc.stderr


def test_reproduce_runs_the_recipe_end_to_end_on_the_tiny_preset(cache, tmp_path):
    """With a --budget (the control, the full network, takes none: it was refused there)."""
    args = ["--preset", "tiny", "--seeds", "0", "1", "--budget", "0.7"]
    proc = run(
        [*args, "--out-dir", str(tmp_path / "out"), "--run-dir", str(tmp_path)],
        cache,
        tmp_path,
        script="experiments/reproduce.py",
    )
    assert "ResNet-20 w0.25" in proc.stdout
    (row,) = json.loads((tmp_path / "out" / "tiny" / "reproduce.json").read_text())
    assert row["seeds"] == 2 and 0 <= row["skipnet_accuracy"] <= 1 and 0 < row["flops_fraction"] <= 1.2
    # each seed its own base network, and a control trained as long as base (1 epoch) + joint SP (1 epoch) + the
    # recipe's HRL where validation kept it (2 iterations of 128 images, the backbone trained: a share of an epoch)
    assert len(set(row["control_run_dirs"])) == 2 and "vs_control" in row
    trained = {p.name for p in (cache / "backbones").glob("cifar_resnet20-digits-*.pt")}
    for seed, run_dir in enumerate(row["run_dirs"]):
        epochs = json.loads((Path(run_dir) / "results.json").read_text())["training_epochs"]
        assert {"base", "joint_sp"} <= set(epochs) <= {"base", "joint_sp", "hrl"}
        control = math.ceil(sum(epochs.values()))
        assert control == (3 if "hrl" in epochs else 2) and (seed > 0 or row["control_epochs"] == control)
        for e in (1, control):  # the seed's base network and its control
            assert any(f"-epochs{e}-" in n and f"-seed{seed}" in n for n in trained), (e, seed, trained)
    assert len({Path(d).name for d in row["run_dirs"]}) == 2


ENTRY_POINTS = (
    *("run.py", "compare.py", "sweep.py", "reproduce.py", "bench.py", "train_backbone.py", "baseline_variance.py"),
    "-m experiments.check",
)
# each entry point's --help as the command line runs it (the script's folder first on sys.path; -m from the
# project's root), one after the other in one new process (a start costs seconds of imports)
HELP_EACH = """
import contextlib, io, json, os, runpy, sys
start, answers = list(sys.path), {}
for script in sys.argv[1:]:
    out, code = io.StringIO(), 0
    module = script.removeprefix("-m ") if script.startswith("-m ") else None
    sys.path[:] = [os.getcwd() if module else os.path.join(os.getcwd(), "experiments"), *start[1:]]
    sys.argv = [module or script, "--help"]
    with contextlib.redirect_stdout(out):
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(os.path.join("experiments", script), run_name="__main__")
        except SystemExit as exit:
            code = exit.code or 0
    answers[script] = [code, out.getvalue()]
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def help_answers() -> dict[str, list]:
    """``{entry point: [exit status, stdout]}``; bench.py in a process of its own (it re-executes itself
    with its allocator's settings)."""
    alone = ["bench.py"]
    proc = subprocess.run(
        [sys.executable, "-c", HELP_EACH, *(e for e in ENTRY_POINTS if e not in alone)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = json.loads(proc.stdout.strip().splitlines()[-1])
    for script in alone:
        own = subprocess.run(
            [sys.executable, f"experiments/{script}", "--help"], capture_output=True, text=True, cwd=ROOT
        )
        answers[script] = [own.returncode, own.stdout + own.stderr]
    return answers


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_every_entry_point_answers_help(script, help_answers):
    """The README sends every new user to --help (a help string with a bare % once crashed argparse)."""
    code, text = help_answers[script]
    assert code == 0, text[-2000:]
    assert "usage:" in text and "--" in text


def test_agent_checkpoint_of_other_data_is_refused(caplog):
    from backbones.checkpoint import CheckpointMismatchError
    from experiments.run import check_agent_checkpoint

    meta = {"agent": "static", "backbone": "b", "dataset": "npz", "backbone_fingerprint": "f", "data_fingerprint": "A"}
    check_agent_checkpoint({"metadata": meta}, "agent.pt", "static", meta)
    with pytest.raises(CheckpointMismatchError, match="data_fingerprint: checkpoint has 'A', this run has 'B'"):
        check_agent_checkpoint({"metadata": meta}, "agent.pt", "static", {**meta, "data_fingerprint": "B"})
    older = {k: v for k, v in meta.items() if k != "data_fingerprint"}  # written before fingerprints: a warning
    check_agent_checkpoint({"metadata": older}, "agent.pt", "static", meta)
    assert "no data fingerprint" in caplog.text


def readme_agent() -> str:
    """The README's example agent file (``# my_agent.py``): the test runs what a reader copies."""
    text = (ROOT / "README.md").read_text()
    start = text.index("# my_agent.py")
    return text[start : text.index("```", start)]


@pytest.fixture
def registry_restored():
    """The agent registry as it was before the test (a test's toy agent does not outlive it)."""
    before = dict(AGENTS)
    yield
    AGENTS.clear()
    AGENTS.update(before)


def test_an_agent_is_one_file_outside_the_package(cache, tmp_path, registry_restored):
    """The README's toy agent, with two options, in a file of its own: --agents-from registers it, its
    flags parse, it trains, evaluates and reloads, and --help lists it with its options."""
    toy = tmp_path / "my_agent.py"
    toy.write_text(readme_agent())
    args = ["--agents-from", str(toy), "--agent", "every_kth", *TINY_BACKBONE, "--no-progress"]
    proc = run([*args, "--kth-k", "3", "--kth-first", "1", "--run-dir", str(tmp_path / "runs")], cache, tmp_path)
    (results,) = (tmp_path / "runs").glob("SkipNet-v0__every_kth__*/results.json")
    r = json.loads(results.read_text())
    assert r["execute_rate"] == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0] and "accuracy" in proc.stdout
    assert r["config"]["kth_k"] == 3 and r["config"]["kth_first"] == 1
    again = run([*args, "--kth-k", "3", "--kth-first", "1", "--eval-only", "--checkpoint", r["checkpoint"]], cache,
                tmp_path)  # fmt: skip
    assert "accuracy" in again.stdout
    bad = run([*args, "--kth-k", "0"], cache, tmp_path, check=False)
    assert bad.returncode == 2 and "--kth-k must be an integer >= 1, got 0" in bad.stderr
    shown = run(["--agents-from", str(toy), "--help"], cache, tmp_path)
    assert "every_kth" in shown.stdout and "--kth-first" in shown.stdout


def test_a_vit_from_timm_goes_through_the_whole_recipe(cache, tmp_path):
    """``--backbone timm:<vit> --backbone-args ...``: trained (AdamW), made skip-ready (joint SP, the
    recipe's HRL), routed by SkipNet's gates and reported against its base network, as a ResNet is."""
    vit = ["--backbone", "timm:vit_tiny_patch16_224", "--backbone-args", "depth=3", "embed_dim=16", "num_heads=2"]
    recipe = ["--backbone-epochs", "1", *SKIP_READY, *TINY_BUDGETS["hybrid_rnn"]]
    run([*vit, "--dataset", "digits", *recipe, "--no-progress", "--run-dir", str(tmp_path)], cache, tmp_path)
    (results,) = tmp_path.glob("SkipNet-v0__hybrid_rnn__*/results.json")
    r = json.loads(results.read_text())
    assert r["backbone"] == "timm:vit_tiny_patch16_224" and "accuracy_vs_base" in r
    assert any("recipe's HRL" in s["stage"] for s in r["stages"])
    (trained,) = (cache / "backbones").glob("timm-vit_tiny_patch16_224-digits-*depth=3,embed_dim=16,num_heads=2*.pt")
    assert "optimizeradamw" not in trained.name  # AdamW is the ViT's default: not named
    proc = run(["--backbone", "cifar_resnet20", "--backbone-args", "depth=3"], cache, tmp_path, check=False)
    assert proc.returncode == 2 and "--backbone-args applies to zoo backbones" in proc.stderr


def test_bench_measures_a_vit(tmp_path):
    out = tmp_path / "bench.json"
    args = [
        *("--backbone", "timm:vit_tiny_patch16_224", "--backbone-args", "depth=2", "embed_dim=16", "num_heads=2"),
        *("--in-channels", "1", "--image-size", "16", "--batch", "8", "--rounds", "1", "--parts", "forward", "savings"),
        *("--out", str(out)),
    ]
    proc = call_entry_point("bench.py", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, *rows = json.loads(out.read_text())["batches"]["8"]["savings"]
    assert [r["execute_rate"] for r in rows] == [0.25, 0.5, 0.75, 1.0]
    # --gate-first-block: the same draws, the first block no longer always run
    assert call_entry_point("bench.py", [*args, "--gate-first-block"]).returncode == 0
    _, *gated = json.loads(out.read_text())["batches"]["8"]["savings"]
    assert gated[0]["block_flops_fraction"] < rows[0]["block_flops_fraction"]
    assert gated[-1]["block_flops_fraction"] == pytest.approx(1.0)  # at rate 1 every block runs either way


def readme_backbone() -> str:
    """The README's example network (``# my_net.py``): the test runs what a reader copies."""
    text = (ROOT / "README.md").read_text()
    start = text.index("# my_net.py")
    return text[start : text.index("```", start)]


def test_a_network_of_ones_own_is_routed_from_its_file(cache, tmp_path):
    """``--backbone my_net.py:small_resnet --backbone-args width=8``: the README's network is trained,
    routed, and its checkpoint rebuilt from the file (``--eval-only``)."""
    (tmp_path / "my_net.py").write_text(readme_backbone())
    net = ["--backbone", f"{tmp_path / 'my_net.py'}:small_resnet", "--backbone-args", "width=8", "depth=4"]
    args = [*net, "--dataset", "digits", "--backbone-recipe", "base", "--backbone-epochs", "1", "--no-progress"]
    r = run([*args, "--agent", "static", "--budget", "0.5", "--run-dir", str(tmp_path / "runs")], cache, tmp_path)
    assert "accuracy" in r.stdout
    (results,) = (tmp_path / "runs").glob("SkipNet-v0__static__*/results.json")
    assert json.loads(results.read_text())["backbone"].endswith("my_net.py:small_resnet")
    missing = run([*args, "--backbone", "my_net.py:no_such"], cache, tmp_path, check=False)
    assert missing.returncode == 2 and "has no function 'no_such'" in missing.stderr
