"""Train a backbone: ``python -m experiments.train_backbone --arch cifar_resnet38 --dataset digits``
(or ``python experiments/train_backbone.py``); ``--help`` lists every option of
:class:`backbones.train.TrainConfig`. Rerun the same command after an interruption to resume."""

from __future__ import annotations

import logging
import sys

from backbones.train import TrainConfig, train
from experiments.cli import one_line_errors, parse


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    with one_line_errors(argv):
        cfg = parse(TrainConfig, argv)
        _, meta = train(cfg)
    print(
        f"{meta['arch']} on {meta['dataset']}: val accuracy {meta['val_accuracy']:.4f}, "
        f"test accuracy {meta['test_accuracy']:.4f} -> {cfg.checkpoint_path}"
    )


if __name__ == "__main__":
    main()
