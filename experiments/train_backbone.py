"""Train a backbone: ``python -m experiments.train_backbone --arch cifar_resnet38 --dataset digits``
(or ``python experiments/train_backbone.py``); ``--help`` lists every option of
:class:`backbones.train.TrainConfig`. Rerun the same command after an interruption to resume.

On several devices: ``torchrun --nproc-per-node N -m experiments.train_backbone ...`` (the batch
is split over the ranks, rank 0 writes: :mod:`backbones.distributed`)."""

from __future__ import annotations

import dataclasses
import logging
import sys

from backbones.distributed import end, start, stop
from backbones.train import TrainConfig, train
from experiments.cli import one_line_errors, parse


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    with one_line_errors(argv):
        cfg = parse(TrainConfig, argv, data_parallel=True)
        here, device = start(cfg.device)
        try:
            _, meta = train(dataclasses.replace(cfg, device=str(device)) if here.distributed else cfg)
        finally:
            stop()
    if here.main:
        print(
            f"{meta['arch']} on {meta['dataset']}: val accuracy {meta['val_accuracy']:.4f}, "
            f"test accuracy {meta['test_accuracy']:.4f} -> {cfg.checkpoint_path}"
        )
    end(here)


if __name__ == "__main__":
    main()
