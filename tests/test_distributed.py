"""Data-parallel training (backbones.distributed): on two CPU processes with gloo, the base trainer
and joint SP end where one process ends on the whole batches; a resumed two-rank run ends where an
uninterrupted one does; a rank that dies ends the job. The jobs run tests/distributed_worker.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker
import pytest
import torch

from backbones.batching import batches, data_loader, global_batch_sizes
from backbones.data import FolderImages, ImageTensors
from backbones.distributed import Ranks, synced_batchnorm, syncs_batchnorm

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "distributed_worker.py"


def job(case: str, out: Path, ranks: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """The worker's ``case`` on ``ranks`` processes (torchrun), or alone (``ranks == 0``)."""
    return jobs([(case, out)], ranks, timeout)


def jobs(
    cases: list[tuple[str, Path]], ranks: int, timeout: float = 300, cache: Path | None = None
) -> subprocess.CompletedProcess:
    """The worker's ``cases`` (each with its output folder) one after the other in one job: the
    processes start once (a start costs seconds of imports). The backbone cache: ``cache``, else a
    folder in the first case's (a module's fixture runs before the tests' own isolated cache is set:
    never the user's)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SKIPNET_DIST_TIMEOUT": "60"}
    env["SKIPNET_CACHE"] = str(cache or cases[0][1] / "cache")
    return subprocess.run(
        [sys.executable, *launcher, str(WORKER), *[str(x) for pair in cases for x in pair]],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip


REINFORCE_CASES = ("hrl", "hrlft", "blockdrop")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Every case of the worker that ends well, in three jobs (a start costs seconds of imports). On
    two ranks: ``train``, ``evaluate``, the REINFORCE cases, and the base trainer's and HRL's runs
    whole (``ranked/CASE``) and stopped after a checkpoint (``stopped/base``, ``stopped/hrl``; the
    checkpoints copied to ``stopped/*.pt`` as the stop left them). Then, in new processes, the
    stopped runs resumed. Alone: ``train``, ``evaluate`` and the REINFORCE cases once per rank's
    seed (``alone/CASE[/rankR]``). Gives the folder and each job's log."""
    root = tmp_path_factory.mktemp("distributed")
    whole = [(c, root / "ranked" / c) for c in ("train", "evaluate", *REINFORCE_CASES, "resume", "hrlrun")]
    stopped = [("interrupt", root / "stopped" / "base"), ("hrlstop", root / "stopped" / "hrl")]
    own_seeds = [
        (f"{c}:{Ranks(r, 2).seed(0)}", root / "alone" / c / f"rank{r}") for c in REINFORCE_CASES for r in (0, 1)
    ]
    logs = {}
    for name, cases, ranks in [
        ("ranked", whole + stopped, 2),
        ("resumed", [("resume", root / "stopped" / "base"), ("hrlrun", root / "stopped" / "hrl")], 2),
        ("alone", [("train", root / "alone" / "train"), ("evaluate", root / "alone" / "evaluate"), *own_seeds], 0),
    ]:
        if name == "resumed":
            shutil.copy(root / "stopped" / "base" / "base.pt", root / "stopped" / "base.pt")
            shutil.copy(root / "stopped" / "hrl" / "agent.pt", root / "stopped" / "agent.pt")
        done = jobs(cases, ranks, cache=root / "cache")
        assert done.returncode == 0, done.stderr[-3000:]
        logs[name] = done.stderr
    return root, logs


def weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(out / "weights.pt", weights_only=True)


def tiny_images(n: int = 23) -> ImageTensors:
    images = torch.arange(n * 16, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(n, 1, 4, 4)
    return ImageTensors(images, torch.arange(n) % 3, 3, (0.5,), (0.25,), "tiny")


def test_each_rank_takes_its_part_of_every_global_batch():
    data = tiny_images()
    alone = list(batches(data, 8, torch.device("cpu"), train=True, generator=torch.Generator().manual_seed(0)))
    parts = [
        list(batches(data, 8, torch.device("cpu"), train=True, generator=torch.Generator().manual_seed(0), ranks=r))
        for r in (Ranks(0, 2), Ranks(1, 2))
    ]
    assert len(parts[0]) == len(parts[1]) == len(alone) == 3
    for (x, y), (x0, y0), (x1, y1) in zip(alone, *parts):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert [len(y) for _, y in parts[0]] == [4, 4, 4] and [len(y) for _, y in parts[1]] == [4, 4, 3]
    # every rank knows each global batch's size without a collective
    assert global_batch_sizes(data, 8, Ranks(1, 2)) == global_batch_sizes(data, 8) == [len(y) for _, y in alone]


def test_image_folders_are_sharded_by_a_sampler_in_training_and_split_in_evaluation():
    data = FolderImages(
        torch.utils.data.TensorDataset(torch.zeros(10, 1, 2, 2), torch.arange(10)), 10, (1, 2, 2), "f", ""
    )
    seen = [
        [int(i) for _, y in data_loader(data, 4, torch.device("cpu"), shuffle=False, ranks=Ranks(r, 2)) for i in y]
        for r in (0, 1)
    ]
    assert sorted(seen[0] + seen[1]) == list(range(10))  # evaluation: every image once
    g = [torch.Generator().manual_seed(0) for _ in range(2)]
    train = [
        [
            int(i)
            for _, y in data_loader(data, 4, torch.device("cpu"), shuffle=True, generator=g[r], ranks=Ranks(r, 2))
            for i in y
        ]
        for r in (0, 1)
    ]
    assert len(train[0]) == len(train[1]) == 5 and set(train[0] + train[1]) == set(range(10))
    per_rank = [len(y) for _, y in data_loader(data, 4, torch.device("cpu"), shuffle=True, ranks=Ranks(0, 2))]
    assert global_batch_sizes(data, 4, Ranks(0, 2)) == [2 * n for n in per_rank] == [4, 4, 2]
    odd = FolderImages(torch.utils.data.TensorDataset(torch.zeros(7, 1, 2, 2), torch.arange(7)), 10, (1, 2, 2), "f", "")
    assert global_batch_sizes(odd, 4, Ranks(1, 2)) == [4, 4]  # the sampler pads 7 images to 8
    with pytest.raises(ValueError, match="does not split over 2 ranks"):
        data_loader(data, 5, torch.device("cpu"), shuffle=True, ranks=Ranks(0, 2))


def test_batchnorm_is_synchronised_where_each_rank_has_few_images(monkeypatch):
    two = Ranks(0, 2)
    assert syncs_batchnorm(two, 32) and not syncs_batchnorm(two, 64) and not syncs_batchnorm(Ranks(), 8)
    monkeypatch.setenv("SKIPNET_SYNC_BN", "1")
    assert syncs_batchnorm(two, 128)
    monkeypatch.setenv("SKIPNET_SYNC_BN", "0")
    assert not syncs_batchnorm(two, 8)
    monkeypatch.setenv("SKIPNET_SYNC_BN", "yes")
    with pytest.raises(ValueError, match="SKIPNET_SYNC_BN is auto, 1 or 0"):
        syncs_batchnorm(two, 8)


def test_a_single_process_is_left_as_it_is():
    here, net, loss = Ranks(), torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2)), torch.ones(())
    assert not here.distributed and here.main and here.wrap(net, torch.device("cpu")) is net
    assert here.global_mean(loss, 5, 9) is loss and here.gather(3) == [3]
    assert float(Ranks(1, 2).global_mean(torch.tensor(1.0), 4, 9)) == pytest.approx(2 * 4 / 9)
    assert here.mean(torch.tensor([1.0, 2.0, 6.0])) == 3.0
    with synced_batchnorm(net, torch.device("cpu"), here, 8) as same:
        assert same is net and type(net[1]) is torch.nn.BatchNorm2d


@pytest.mark.slow
def test_two_ranks_train_the_base_network_and_joint_sp_as_one_process_does(runs):
    root, logs = runs
    assert "data-parallel job: 2 ranks (gloo)" in logs["ranked"]
    one, two = weights(root / "alone" / "train"), weights(root / "ranked" / "train")
    for part in ("base", "joint", "gates"):
        for name, value in one[part].items():
            torch.testing.assert_close(two[part][name], value, rtol=1e-4, atol=1e-5, msg=f"{part} {name}")
    # the stages trained: joint SP moved the base network's weights
    assert not torch.allclose(one["base"]["blocks.3.conv1.weight"], one["joint"]["blocks.3.conv1.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("case", REINFORCE_CASES)
def test_reinforce_on_two_ranks_steps_with_the_mean_of_the_ranks_own_gradients(runs, case):
    """HRL (gates; gates and backbone) and BlockDrop's policy: each rank samples its own episodes
    (its images and routes from its own streams, those of one process seeded ``Ranks(r, 2).seed(0)``);
    DDP's update is the mean of their gradients. With the backbone fine-tuned, blocks no route ran
    on a rank count as a zero gradient there."""
    root, logs = runs
    assert "HRL on 2 ranks: 32 episodes per iteration" in logs["ranked"]
    both = torch.load(root / "ranked" / case / "grads.pt", weights_only=True)
    own = [torch.load(root / "alone" / case / f"rank{r}" / "grads.pt", weights_only=True) for r in (0, 1)]
    assert set(both) == set(own[0]) and any(n.startswith("backbone.") for n in both) == (case == "hrlft")
    assert any(not torch.allclose(own[0][n], own[1][n]) for n in both)  # the ranks' episodes differ
    for name, grad in both.items():
        torch.testing.assert_close(grad, (own[0][name] + own[1][name]) / 2, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.slow
def test_a_resumed_two_rank_hrl_run_ends_where_an_uninterrupted_one_does(runs, tmp_path):
    """Each rank's environment position and sampled routes' stream are in rank 0's checkpoint."""
    root, logs = runs
    assert "hrlstop: stopped" in logs["ranked"]
    assert torch.load(root / "stopped" / "agent.pt", weights_only=True)["world"] == 2
    one, two = weights(root / "ranked" / "hrlrun"), weights(root / "stopped" / "hrl")
    for part in ("gates", "backbone"):
        for name, value in one[part].items():
            assert torch.equal(value, two[part][name]), f"{part}.{name}"
    shutil.copy(root / "stopped" / "agent.pt", tmp_path / "agent.pt")  # the stopped run's checkpoint, one process
    with pytest.raises(ValueError, match=r"written by a run on 2 rank\(s\), resumed on 1"):
        distributed_worker.reinforce("hrlrun", tmp_path)


@pytest.mark.slow
def test_a_routed_evaluation_on_two_ranks_gives_one_processs_figures_and_per_image_outcomes(runs):
    """Each rank routes its part of every batch; the outcomes are gathered back in data-set order."""
    root, _ = runs
    one = torch.load(root / "alone" / "evaluate" / "eval.pt", weights_only=True)
    two = torch.load(root / "ranked" / "evaluate" / "eval.pt", weights_only=True)
    assert set(one) == set(two) and len(one["label"]) == 101 and 0.1 < one["executed"].float().mean() < 0.9
    for name, value in one.items():
        if name != "seconds":
            torch.testing.assert_close(two[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_a_resumed_two_rank_run_ends_where_an_uninterrupted_one_does(runs, tmp_path):
    root, logs = runs
    state = torch.load(root / "stopped" / "base.pt", weights_only=True)
    assert state["epoch"] == 1 and state["world"] == 2 and len(state["rank_rngs"]) == 2
    assert "resuming" in logs["resumed"] and "from epoch 1" in logs["resumed"]
    one, two = weights(root / "ranked" / "resume")["base"], weights(root / "stopped" / "base")["base"]
    assert all(torch.equal(one[k], two[k]) for k in one)  # bit for bit: every rank's random streams resumed
    shutil.copy(root / "stopped" / "base.pt", tmp_path / "base.pt")
    with pytest.raises(ValueError, match=r"resume it on 2 rank\(s\)"):  # on another number of ranks: refused
        distributed_worker.train("resume", tmp_path)


@pytest.mark.slow
def test_ranks_given_different_data_are_refused(tmp_path):
    done = job("otherdata", tmp_path / "other", 2)
    assert done.returncode != 0 and "the ranks disagree on the data's fingerprint: rank(s) 1 have" in done.stderr


def test_more_ranks_than_gpus_are_refused_before_any_work(monkeypatch):
    from backbones import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for k, v in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="started 2 ranks on this node but it has 1 GPU"):
        distributed.start("cuda")
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_job_naming_it(tmp_path):
    t0 = time.monotonic()
    dead = job("die", tmp_path / "die", 2, timeout=120)
    assert dead.returncode != 0
    assert time.monotonic() - t0 < 100
    root_cause = dead.stderr.split("Root Cause")[-1]
    assert "rank      : 1" in root_cause and "exitcode  : 1" in root_cause


@pytest.mark.parametrize("script", ["compare.py", "sweep.py"])
def test_entry_points_that_do_not_train_on_ranks_refuse_torchrun(script, monkeypatch):
    from conftest import call_entry_point

    monkeypatch.setenv("WORLD_SIZE", "2")
    proc = call_entry_point(script, [])
    assert proc.returncode == 2 and "does not run on several ranks" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_run_trains_the_recipe_on_two_ranks_and_reports_once(tmp_path):
    """``torchrun ... experiments/run.py``: the base network, joint SP, the recipe's HRL and the hybrid
    agent's HRL on both ranks, the evaluation on rank 0; one results folder, one report."""
    args = ["--agent", "hybrid_rnn", "--dataset", "digits", "--backbone", "cifar_resnet20", "--width", "0.25"]
    args += ["--backbone-epochs", "1", "--joint-epochs", "1", "--recipe-hrl-iterations", "2", "--no-progress"]
    args += ["--hrl-iterations", "2", "--num-envs", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SKIPNET_CACHE": str(tmp_path / "cache")}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    done = subprocess.run(
        [*launcher, str(ROOT / "experiments" / "run.py"), *args, "--run-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data-parallel job: 2 ranks (gloo)" in done.stderr and "joint SP epoch 1/1" in done.stderr
    assert done.stderr.count("HRL on 2 ranks") == 2 and "HRL on 2 ranks: 64 episodes" in done.stderr  # recipe, agent
    assert done.stdout.count("test accuracy") == 1 and len(list((tmp_path / "runs").iterdir())) == 1


@pytest.mark.slow
def test_reproduce_runs_every_seed_on_two_ranks_and_writes_once(tmp_path):
    """``torchrun ... reproduce.py``: the seed's and its control's training stages on both ranks, the
    rest on rank 0 while rank 1 waits for the next run; one table."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SKIPNET_CACHE": str(tmp_path / "cache")}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    args = ["--preset", "tiny", "--seeds", "0", "--out-dir", str(tmp_path / "out"), "--run-dir", str(tmp_path)]
    done = subprocess.run(
        [*launcher, str(ROOT / "experiments" / "reproduce.py"), *args],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("data-parallel job: 2 ranks (gloo)") == 1
    assert done.stderr.count("HRL on 2 ranks") == 1  # the recipe's HRL
    assert done.stderr.count("control (") == 1  # the same-epochs control, trained on both ranks too
    rows = json.loads((tmp_path / "out" / "tiny" / "reproduce.json").read_text())
    assert len(rows) == 1 and rows[0]["seeds"] == 1 and done.stdout.count("| ResNet-20") == 1


@pytest.mark.slow
def test_bench_measures_data_parallel_training(tmp_path):
    from conftest import call_entry_point

    args = ["--backbone", "cifar_resnet20", "--width", "0.25", "--in-channels", "1", "--image-size", "16"]
    proc = call_entry_point(
        "bench.py", [*args, "--parts", "ddp", "--rounds", "1", "--ddp-steps", "2", "--out", str(tmp_path / "b.json")]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "b.json").read_text())["ddp"]
    assert set(r["images_per_s"]) == {"1 rank", "2 ranks", "2 ranks, BatchNorm synced"}
    assert all(v > 0 for v in r["images_per_s"].values()) and "speed-up" in proc.stdout
