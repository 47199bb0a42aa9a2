"""The recipe's protocol: per-seed base networks, the same-epochs control, intervals over source digits,
verdicts read off intervals (on planted per-image outcomes, in-process)."""

import numpy as np
import pytest
import torch

from backbones.options import replace
from experiments.config import RunConfig
from experiments.recipe import training_epochs
from experiments.report import _max_drop_line
from experiments.reproduce import PaperRow, format_markdown, summarize


def _planted_run(tmp_path, name, correct, base_correct, groups, **results):
    run_dir = tmp_path / name
    run_dir.mkdir()
    np.savez_compressed(run_dir / "per_image.npz", correct=correct, base_correct=base_correct, group=groups)
    return {
        "run_dir": str(run_dir),
        "accuracy": float(correct.mean()),
        "flops_fraction": 0.5,
        "computation_percent": 50.0,
        "val_accuracy": 0.9,
        "val_flops_fraction": 0.5,
        "full_backbone_accuracy": 0.9,
        "training_epochs": {"base": 10.0, "joint_sp": 6.0},
        "config": {"backbone_epochs": 16},
        **results,
    }


def test_the_recipe_is_judged_against_base_and_control_by_intervals_over_source_digits(tmp_path):
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 200, 4000)  # 4,000 renderings of 200 digits
    hard = rng.random(200) < 0.1
    base = (~hard[groups]).astype(float)  # the base network: 90%, right or wrong per digit
    ours = base.copy()
    ours[np.flatnonzero(groups == np.flatnonzero(~hard)[0])] = 0.0  # ours loses one easy digit: about -0.5 points
    control = np.ones_like(base)  # the control, trained as long: every image right
    runs = [_planted_run(tmp_path, f"s{s}", ours, base, groups) for s in range(2)]
    controls = [_planted_run(tmp_path, f"c{s}", control, control, groups) for s in range(2)]
    row = summarize("cifar_resnet38", PaperRow("ResNet-38", None, None, None), runs, 0, controls)
    assert row["interval_unit"].startswith("source digit")
    assert row["vs_base"]["difference"] == pytest.approx(ours.mean() - base.mean())
    # about 20 renderings of one digit lost: inside half a point, but the interval over 200 digits cannot say so
    assert row["within_half_a_point_of_base"] == "undecided"
    assert row["control_accuracy"] == 1.0 and row["vs_control"]["difference"] < -0.1
    assert row["within_half_a_point_of_control"] == "no"
    table = format_markdown("embedded", [row])
    assert "control" in table and "undecided" in table and "source digits" in table


def test_training_epochs_count_every_stage_that_trains_the_network():
    skip_ready = {"skip_ready": {"base_train_config": {"epochs": 10}, "joint_config": {"epochs": 6}}}
    cfg = RunConfig(num_envs=100, eval_batch=100)
    assert training_epochs(cfg, skip_ready, 12_000) == {"base": 10.0, "joint_sp": 6.0}
    with_hrl = {"skip_ready": {**skip_ready["skip_ready"], "hrl": {"iterations": 500, "batch": 120}}}
    assert training_epochs(cfg, with_hrl, 12_000) == {"base": 10.0, "joint_sp": 6.0, "hrl": 5.0}  # the recipe's
    agent_hrl = replace(cfg, hrl_iterations=1200, finetune_backbone=True)  # the agent's own, training the network
    both = {"base": 10.0, "joint_sp": 6.0, "hrl": 5.0, "agent_hrl": 10.0}
    assert training_epochs(agent_hrl, with_hrl, 12_000) == both
    assert training_epochs(cfg, {"train_config": {"epochs": 10}}, 12_000) == {"base": 10.0}
    assert training_epochs(cfg, {}, 12_000) == {}  # a checkpoint of unknown origin: no control


def test_max_drop_takes_the_cheapest_budget_whose_interval_stays_within_the_drop(monkeypatch):
    """--max-drop tries the joint budgets from the cheapest up and stops at the first whose joint gates,
    calibrated to the budget, keep the whole 95% interval of their paired validation difference against
    the base network within the drop (over source digits where the data has them): a budget whose point
    passes but whose interval does not is not taken; where none passes, the one whose interval reaches
    highest."""
    from types import SimpleNamespace

    import numpy as np

    import experiments.recipe as run_module

    n = 2000
    groups = np.arange(n) // 10  # 200 source digits of 10 renderings each
    base = np.ones(n, bool)
    base[:160] = False  # the base network: 92.00% on validation

    def routed(wrong: np.ndarray) -> np.ndarray:
        """The base's answers with the images ``wrong`` (all right for the base) wrong too."""
        out = base.copy()
        out[wrong] = False
        return out

    correct = {
        None: base,
        0.35: routed(np.arange(200, 2000, 45)),  # -2.00 points: out
        0.5: routed(np.arange(1000, 1009)),  # -0.45 points, all renderings of one digit: the point in, not the interval
        0.7: routed(np.arange(1000, 1040, 10)),  # -0.20 points on 4 digits: within
        0.85: base,
    }
    built = []

    def skip_ready(cfg, device, splits, base, meta):
        built.append(cfg.joint.budget)
        return SimpleNamespace(budget=cfg.joint.budget), {"checkpoint": f"b{cfg.joint.budget}.pt"}

    def evaluate(policy, net, data, device, batch, precision):
        assert data is splits["val"]  # only validation images are seen
        c = correct[getattr(net, "budget", None)]
        return SimpleNamespace(accuracy=c.mean(), flops_fraction=0.5, per_image={"correct": c})

    def calibrate_threshold(policy, net, data, budget, device, batch, precision, **_):
        assert budget == net.budget  # the gates judged as the run will use them: spending the budget
        return 0.0, evaluate(policy, net, data, device, batch, precision)

    monkeypatch.setattr(run_module, "skip_ready", skip_ready)
    monkeypatch.setattr(run_module, "evaluate", evaluate)
    monkeypatch.setattr(run_module, "calibrate_threshold", calibrate_threshold)
    monkeypatch.setattr(run_module, "load_gates", lambda *a: None)
    splits = {"train": "train data", "val": SimpleNamespace(groups=torch.from_numpy(groups)), "test": "test data"}
    cfg = replace(RunConfig(), max_drop=0.5, max_drop_budgets=(0.85, 0.35, 0.5, 0.7))
    net, meta = run_module.search_budget(cfg, torch.device("cpu"), splits, SimpleNamespace(), {})
    search = meta["max_drop"]
    assert built == [0.35, 0.5, 0.7] and net.budget == 0.7
    half = search["tried"][1]["val_vs_base"]
    assert half["difference"] == pytest.approx(-0.0045) and half["ci95"][0] < -0.005  # the point in, the interval out
    assert search["chosen_budget"] == 0.7 and search["met"]
    line = _max_drop_line(search)  # what run.py prints
    assert "0.35 -> 90.00% at 50.0% (-2.00 [" in line and "0.5 -> 91.55% at 50.0% (-0.45 [" in line
    built.clear()
    net, meta = run_module.search_budget(
        replace(cfg, max_drop=0.0, max_drop_budgets=(0.35, 0.5)), torch.device("cpu"), splits, SimpleNamespace(), {}
    )
    assert built == [0.35, 0.5] and net.budget == 0.5 and not meta["max_drop"]["met"]  # 0.5's interval reaches higher
    assert "none within --max-drop" in _max_drop_line(meta["max_drop"])


def test_max_drop_is_refused_where_it_cannot_choose_the_compute():
    from experiments.run import checked

    for bad in ({"budget": 0.5}, {"agent": "ppo"}, {"backbone_recipe": "base"}):
        with pytest.raises(ValueError, match="--max-drop searches"):
            checked(replace(RunConfig(), max_drop=0.5, **bad), None)


@pytest.mark.slow
def test_a_budget_is_met_on_validation_and_the_checkpoint_keeps_the_threshold(tmp_path):
    """--budget: the hybrid gates' threshold is calibrated on validation images and stored in the agent
    checkpoint, so --eval-only evaluates what the run reported."""
    from experiments.run import run

    tiny = RunConfig(
        agent="hybrid_rnn", backbone="cifar_resnet20", dataset="digits", width=0.25,
        backbone_recipe="base", budget=0.8, num_envs=32, progress=False, run_dir=str(tmp_path),
    )  # fmt: skip
    tiny = replace(tiny, backbone_epochs=1, sp_epochs=1, hrl_iterations=0)
    r = run(tiny)
    assert (
        abs(r["calibration"]["val_flops"] - 0.8) <= 0.005 and r["val_flops_fraction"] == r["calibration"]["val_flops"]
    )
    # what each stage did, on validation: the network with every block, the gates as trained, calibrated
    assert [st["stage"] for st in r["stages"]] == [
        "routed network, every block", "hybrid_rnn as trained", "hybrid_rnn, calibrated to 0.8"
    ]  # fmt: skip
    assert r["stages"][-1]["val_flops_fraction"] == r["val_flops_fraction"]
    again = run(replace(tiny, eval_only=True, checkpoint=r["checkpoint"]))
    assert again["val_flops_fraction"] == r["val_flops_fraction"] and "calibration" not in again
    assert (
        run(replace(tiny, calibrate=False, run_dir=str(tmp_path / "off")))["val_flops_fraction"]
        != r["val_flops_fraction"]
    )
