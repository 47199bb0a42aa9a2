"""What tests/test_distributed.py runs, alone (``python tests/distributed_worker.py CASE OUT``) or on
ranks (``torchrun --nproc-per-node 2 tests/distributed_worker.py CASE OUT``), on small random data:

- ``train``: the base trainer, then joint SP on its result; rank 0 writes both weights to ``OUT``.
- ``interrupt``: the base trainer with augmentation and stochastic depth, stopped on every rank
  after its first epoch (what a killed job leaves); ``resume``: the same, run to the end.
- ``die``: rank 1 exits at its first training step.
- ``otherdata``: rank 1 is given other training images than rank 0.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

from agents.gates import create_gates
from agents.skip_ready import JointConfig, JointTrainer
from backbones import train as base_trainer
from backbones.base import FIRST_GATED
from backbones.data import ImageTensors
from backbones.device import seed_everything
from backbones.distributed import end, ranks, start, stop


def data(n: int, seed: int) -> ImageTensors:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ImageTensors(images, labels, 10, (0.5,), (0.25,), "tiny")


def config(out: Path, augment: bool, epochs: int) -> base_trainer.TrainConfig:
    return base_trainer.TrainConfig(
        arch="cifar_resnet20", dataset="tiny", width=0.25, epochs=epochs, batch_size=32,
        shift=2 if augment else 0, flip=False, drop_rate=0.5 if augment else 0.0,
        out=str(out / "base.pt"), log_dir=str(out / "tb"), progress=False, device="cpu",
    )  # fmt: skip


def main(case: str, out: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    here, _ = start("cpu")
    # 101 training images: the last batch of 5 splits 3 / 2, unevenly; "otherdata": rank 1 reads other images
    other = case == "otherdata" and here.rank == 1
    splits = {"train": data(101, 5 if other else 0), "val": data(40, 1), "test": data(40, 2)}
    if case == "die":
        real = base_trainer.batches

        def dying(*args, **kwargs):
            if here.rank == 1:
                os._exit(1)
            return real(*args, **kwargs)

        base_trainer.batches = dying
    if case == "interrupt":
        real_accuracy, calls = base_trainer.full_accuracy, []

        def stop_after_first_epoch(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # the second epoch's validation, before its checkpoint
                raise SystemExit(3)
            return real_accuracy(*args, **kwargs)

        base_trainer.full_accuracy = stop_after_first_epoch
    augmented = case in ("interrupt", "resume", "die")
    backbone, _ = base_trainer.train(config(out, augmented, 3 if augmented else 2), splits)
    weights = {"base": {k: v.clone() for k, v in backbone.state_dict().items()}}
    if case == "train":
        seed_everything(0)
        gates = create_gates("rnn", backbone, FIRST_GATED)
        cfg = JointConfig(epochs=2, batch_size=32, shift=0, alpha_warmup=0)
        trainer = JointTrainer(
            backbone, gates, splits["train"], cfg, torch.device("cpu"), out / "joint.pt", "tiny", progress=False
        )
        trainer.train(splits["val"])
        weights["joint"] = backbone.state_dict()
        weights["gates"] = gates.state_dict()
    if ranks().main:
        torch.save(weights, out / "weights.pt")
    stop()
    end(here)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
