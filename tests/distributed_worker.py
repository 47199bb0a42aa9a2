"""What tests/test_distributed.py runs, alone (``python tests/distributed_worker.py CASE OUT [CASE OUT
...]``) or on ranks (``torchrun --nproc-per-node 2 tests/distributed_worker.py CASE OUT ...``), on
small random data; several cases run one after the other in one job (one start of the processes):

- ``train``: the base trainer, then joint SP on its result; rank 0 writes both weights to ``OUT``.
- ``interrupt``: the base trainer with augmentation and stochastic depth, stopped on every rank
  after its first epoch (what a killed job leaves: the job goes on to its next case); ``resume``:
  the same, run to the end (resumed where ``OUT`` holds a stopped run).
- ``die``: rank 1 exits at its first training step.
- ``otherdata``: rank 1 is given other training images than rank 0.
- ``evaluate``: a routed evaluation; ``OUT/eval.pt`` holds its figures and per-image outcomes.
- ``hrl:SEED`` (``hrlft:SEED``: the backbone fine-tuned; ``blockdrop:SEED``: BlockDrop's policy):
  one REINFORCE iteration on an untrained network; ``OUT/grads.pt`` holds the gradients of its
  update (on ranks: DDP's).
  ``hrlstop``: four iterations stopped after the second's checkpoint; ``hrlrun``: resumed or whole.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from agents.blockdrop import BlockDropConfig, BlockDropNet, BlockDropTrainer
from agents.evaluate import evaluate
from agents.gates import create_gates
from agents.hybrid import HybridConfig, HybridTrainer
from agents.policies import GateRoutingPolicy
from agents.skip_ready import JointConfig, JointTrainer
from backbones import train as base_trainer
from backbones.base import FIRST_GATED
from backbones.data import ImageTensors
from backbones.device import seed_everything
from backbones.distributed import end, ranks, start, stop
from backbones.registry import create


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


class Stopped(Exception):
    """A run stopped on every rank at the same point, its checkpoint as a killed job leaves it."""


def main(jobs: list[tuple[str, Path]]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    here, _ = start("cpu")
    for case, out in jobs:
        out.mkdir(parents=True, exist_ok=True)
        try:
            if case == "evaluate":
                routed_evaluation(out)
            elif case.startswith(("hrl", "blockdrop")):
                reinforce(case, out)
            else:
                train(case, out)
        except Stopped:
            logging.info("%s: stopped", case)
    stop()
    end(here)


def train(case: str, out: Path) -> None:
    here = ranks()
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
    real_accuracy, calls = base_trainer.full_accuracy, []

    def stop_after_first_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second epoch's validation, before its checkpoint
            raise Stopped
        return real_accuracy(*args, **kwargs)

    if case == "interrupt":
        base_trainer.full_accuracy = stop_after_first_epoch
    augmented = case in ("interrupt", "resume", "die")
    try:
        backbone, _ = base_trainer.train(config(out, augmented, 3 if augmented else 2), splits)
    finally:
        base_trainer.full_accuracy = real_accuracy
    weights = {"base": {k: v.clone() for k, v in backbone.state_dict().items()}}
    if case == "train":
        seed_everything(0)
        gates = create_gates("rnn", backbone, FIRST_GATED)
        cfg = JointConfig(epochs=2, batch_size=32, shift=0, alpha_warmup=0, distill=0.0)
        trainer = JointTrainer(
            backbone, gates, splits["train"], cfg, torch.device("cpu"), out / "joint.pt", "tiny", progress=False
        )
        trainer.train()
        weights["joint"] = backbone.state_dict()
        weights["gates"] = gates.state_dict()
    if ranks().main:
        torch.save(weights, out / "weights.pt")


def routed_evaluation(out: Path) -> None:
    """The gates' routes evaluated on 101 images in batches of 32 (the last, 5 images, split 3 / 2
    on two ranks); rank 0 writes the result's figures and per-image outcomes to ``out/eval.pt``."""
    seed_everything(0)
    backbone = create("cifar_resnet20", num_classes=10, width=0.25, in_channels=1, image_size=12)
    gates = create_gates("rnn", backbone, FIRST_GATED)
    with torch.no_grad():  # routes that differ from image to image
        gates.out.bias.zero_()
        gates.out.weight.mul_(50.0)
    result = evaluate(GateRoutingPolicy(gates.eval(), "rnn"), backbone, data(101, 3), torch.device("cpu"), 32)
    if ranks().main:
        figures = {k: torch.tensor(v) for k, v in result.as_dict().items() if isinstance(v, float | int)}
        torch.save({**figures, **{k: torch.from_numpy(v) for k, v in result.per_image.items()}}, out / "eval.pt")


def reinforce(case: str, out: Path) -> None:
    """REINFORCE on an untrained network: ``hrl`` / ``hrlft`` / ``blockdrop`` one iteration of the
    hybrid trainer's HRL (gates; gates and backbone) or BlockDrop's, whose gradients go to
    ``out/grads.pt``; ``hrlrun`` four HRL iterations with the backbone fine-tuned (a checkpoint
    every two; resumed from ``out/agent.pt`` where it is there), ``hrlstop`` the same stopped after
    the second; the weights go to ``out/weights.pt``. Rank 0 writes."""
    name, _, seed = case.partition(":")
    seed_everything(0)  # the same untrained network and gates in every process
    backbone = create("cifar_resnet20", num_classes=10, width=0.25, in_channels=1, image_size=12)
    gates = create_gates("rnn", backbone, FIRST_GATED)
    run = {"num_envs": 16, "seed": int(seed or 0), "checkpoint_every": 2}
    trainer: Any
    if name == "blockdrop":
        net = BlockDropNet(1, backbone.num_blocks - FIRST_GATED, width=4)
        cfg = BlockDropConfig(iterations=1)
        trainer = BlockDropTrainer(backbone, net, data(101, 0), cfg, torch.device("cpu"), out / "agent.pt", {}, **run)
        optimizer = trainer.opt
    else:
        one = name in ("hrl", "hrlft")
        cfg = HybridConfig.flat(
            sp_epochs=0, hrl_iterations=1 if one else 4, finetune_backbone=name != "hrl", hrl_lr=1e-2
        )
        trainer = HybridTrainer(backbone, gates, data(101, 0), cfg, torch.device("cpu"), out / "agent.pt", {}, **run)
        optimizer = trainer.hrl_opt
    grads = {}

    def keep_gradients(*_):
        for n, p in trainer.trained_parameters():
            grads[n] = torch.zeros_like(p) if p.grad is None else p.grad.clone()

    optimizer.register_step_pre_hook(keep_gradients)
    if name == "hrlstop":
        save = trainer.save

        def save_then_stop():
            save()
            if trainer.stage == "hrl" and trainer.done_units == 2:
                raise Stopped

        trainer.save = save_then_stop
    if (out / "agent.pt").is_file():
        trainer.resume()
    trainer.train()
    if ranks().main:
        torch.save(grads, out / "grads.pt")
        torch.save({"gates": gates.state_dict(), "backbone": backbone.state_dict()}, out / "weights.pt")


if __name__ == "__main__":
    args = sys.argv[1:]
    main([(case, Path(out)) for case, out in zip(args[::2], args[1::2])])
