"""The Ray Tune sweep: its search space, the Pareto front, and a 2-trial local sweep end to end."""

import csv
from pathlib import Path

import pytest
from conftest import call_entry_point

from experiments.sweep import SweepConfig, option_value, pareto_front

pytestmark = pytest.mark.slow  # entry points end to end

# the tiny recipe every trial runs: the backbone is trained once (by the first sweep) in the shared cache
TINY_RUN = [
    "--dataset", "digits", "--backbone", "cifar_resnet20", "--width", "0.25", "--backbone-epochs", "1",
    "--joint-epochs", "1", "--recipe-hrl-iterations", "2", "--sp-epochs", "1", "--hrl-iterations", "4",
    "--num-envs", "32",
]  # fmt: skip


@pytest.fixture(scope="module")
def ray_once():
    """One Ray instance for the module's sweeps (started by the first, in this process), shut down after."""
    ray = pytest.importorskip("ray")
    yield
    ray.shutdown()


def test_pareto_front_keeps_exactly_the_undominated_points():
    points = [(0.90, 0.5), (0.92, 0.7), (0.89, 0.6), (0.92, 0.8), (0.80, 0.3), (0.90, 0.5)]
    # (0.89, 0.6) is dominated by (0.90, 0.5); (0.92, 0.8) by (0.92, 0.7); equal points do not dominate each other
    assert pareto_front(points) == [True, True, False, False, True, True]


def test_values_take_the_run_options_types_and_unknown_options_are_named():
    assert option_value("alpha", "2") == 2.0 and isinstance(option_value("alpha", "2"), float)
    assert option_value("hrl_iterations", "30") == 30 and option_value("agent", "blockdrop") == "blockdrop"
    assert option_value("sp_alpha", "None") is None and option_value("sp_sample", "false") is False
    with pytest.raises(ValueError, match="unknown run option 'alpah'"):
        option_value("alpah", "1")
    # the command line's own parsing: choices and types are checked as the flags check them
    assert option_value("backbone_recipe", "base") == "base"
    with pytest.raises(ValueError, match="backbone_recipe is one of base, skip_ready"):
        option_value("backbone_recipe", "fancy")
    with pytest.raises(ValueError, match="hrl_iterations takes int values"):
        option_value("hrl_iterations", "many")
    with pytest.raises(ValueError, match="--search must be one of grid, optuna"):
        SweepConfig(search="random")


def test_a_renamed_option_is_swept_by_its_former_name_too():
    """``--grid gamma=...`` sweeps ``hrl_gamma`` (renamed by the one prefix rule), as ``--gamma`` sets it."""
    pytest.importorskip("ray")
    from experiments.sweep import param_space

    space = param_space(SweepConfig(grid=("gamma=0.9,1.0", "sb3_timesteps=64")))
    assert set(space) == {"hrl_gamma", "sb3_timesteps"}
    assert space["hrl_gamma"] == {"grid_search": [0.9, 1.0]}


def test_a_two_trial_sweep_writes_every_run_and_the_front(tmp_path, shared_cache, ray_once):
    pytest.importorskip("ray.tune")
    args = ["--grid", "alpha=0.5,4", "--out", str(tmp_path / "sweeps"), "--name", "t", "--max-concurrent", "2"]
    args += [*TINY_RUN, "--hrl-log-every", "2"]
    proc = call_entry_point("sweep.py", args, shared_cache)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 trials; Pareto front" in proc.stdout
    rows = list(csv.DictReader(open(tmp_path / "sweeps" / "t" / "pareto.csv")))
    assert sorted(float(r["alpha"]) for r in rows) == [0.5, 4.0]
    assert any(r["pareto"] == "True" for r in rows)
    chosen = pareto_front([(float(r["val_accuracy"]), float(r["val_flops_fraction"])) for r in rows])
    assert [r["pareto"] == "True" for r in rows] == chosen  # the front is chosen on validation, test reported
    for r in rows:  # every trial keeps its run: results, per-image outcomes, TensorBoard
        run_dir = Path(r["run_dir"])
        assert (run_dir / "results.json").is_file() and (run_dir / "per_image.npz").is_file()
        assert any(run_dir.glob("events.out.tfevents.*"))
    assert (tmp_path / "sweeps" / "t" / "pareto.png").stat().st_size > 0
    again = call_entry_point("sweep.py", args, shared_cache)
    assert again.returncode == 2 and "--restore" in again.stderr  # a finished sweep is never overwritten


def test_list_flags_may_repeat_and_the_default_applies_only_when_absent():
    from experiments.cli import parse

    cfg = parse(SweepConfig, ["--grid", "alpha=1,2", "--grid", "seed=0,1", "agent=blockdrop"])
    assert cfg.grid == ("alpha=1,2", "seed=0,1", "agent=blockdrop")
    assert parse(SweepConfig, []).grid == SweepConfig().grid


def test_optuna_search_reads_the_objectives_reported_at_the_end(tmp_path, shared_cache, ray_once):
    """Trials report training scalars first and the objectives last: the multi-objective search
    must take them (it refused the first report before). ``--agents-from``: the trials import the
    user's agents too (their options are in the run's configuration the trials build)."""
    pytest.importorskip("optuna")
    from test_experiments import readme_agent

    from agents.registry import AGENTS

    toy = tmp_path / "my_agent.py"
    toy.write_text(readme_agent())
    args = ["--search", "optuna", "--samples", "2", "--space", "alpha=loguniform:0.2:4", "--out", str(tmp_path / "s")]
    before = dict(AGENTS)
    try:
        proc = call_entry_point("sweep.py", [*args, "--name", "o", "--agents-from", str(toy), *TINY_RUN], shared_cache)
    finally:
        AGENTS.clear()
        AGENTS.update(before)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = list(csv.DictReader(open(tmp_path / "s" / "o" / "pareto.csv")))
    assert len(rows) == 2 and all(0.2 <= float(r["alpha"]) <= 4 for r in rows)
