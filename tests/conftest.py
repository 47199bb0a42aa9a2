"""Shared fixtures: small backbones with non-trivial random weights and the bundled digits data."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import backbones
from backbones.base import Backbone, randomize_batchnorm
from backbones.data import ImageTensors


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs one worker per core): each worker's share of the cores,
    for its torch and for the processes it starts (entry points, torchrun jobs, Ray's trials), or
    their threads fight over the cores (2 workers on 2 cores: 265 s with the threads free, 209 s)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        share = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(share)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(name, str(share))


def randomize(backbone: Backbone, seed: int = 0) -> Backbone:
    """Random BatchNorm affine parameters and running statistics (no block close to the identity)."""
    return randomize_batchnorm(backbone, seed)  # type: ignore[return-value]


def tiny_backbone(depth: int = 20, seed: int = 0, num_classes: int = 10, in_channels: int = 1, image_size: int = 16):
    torch.manual_seed(seed)
    net = backbones.create(
        f"cifar_resnet{depth}", num_classes=num_classes, in_channels=in_channels, width=0.25, image_size=image_size
    )
    return randomize(net, seed)


@pytest.fixture(scope="session")
def digits_test() -> ImageTensors:
    return backbones.load_dataset("digits", "test")


@pytest.fixture
def tiny() -> Backbone:
    return tiny_backbone()


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def _user_cache_untouched():
    """The guard of :func:`_isolated_cache`: the suite ends with an error naming what it wrote into the
    user's cache (a test that undid its own isolation, a fixture that ran before it, a subprocess
    that lost it: each happened)."""
    user = Path(os.environ.get("SKIPNET_CACHE", Path.home() / ".cache" / "skipnet_gym"))
    before = _files(user)
    yield
    added = sorted(_files(user) - before)
    assert not added, f"the tests wrote into the user's cache {user}: {added[:5]}"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's backbone cache or ./runs from a test (nor leave SB3's empty log folders
    in the system's temporary one: a model the tests build with SB3's own logger makes one per learn)."""
    monkeypatch.setenv("SKIPNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SB3_LOGDIR", str(tmp_path / "sb3"))
    monkeypatch.chdir(tmp_path)


@dataclass
class Completed:
    """What an entry point did, as :class:`subprocess.CompletedProcess` says it."""

    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _environ(**values: str):
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def call_entry_point(script: str, args: list[str], cache: Path | None = None) -> Completed:
    """Run ``experiments/<script>``'s ``main(args)`` in this process, as its command line would
    (exit status, stdout, stderr with the log's INFO lines): a new Python process proves nothing
    more and costs seconds of imports (the ``--help`` tests start one per entry point)."""
    module = importlib.import_module("experiments." + script.removeprefix("experiments/").removesuffix(".py"))
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    code = 0
    env = {} if cache is None else {"SKIPNET_CACHE": str(cache)}
    try:
        with _environ(**env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.main(list(args))
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 1
            except Exception:  # what the interpreter prints for an uncaught exception
                err.write(traceback.format_exc())
                code = 1
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return Completed(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One backbone cache for the session's entry-point tests: a tiny backbone is trained once and
    read by every test that asks for it (the cache is keyed by everything that changes a result)."""
    return tmp_path_factory.mktemp("shared-cache")
