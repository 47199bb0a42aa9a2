"""Train a backbone: ``python -m experiments.train_backbone --arch cifar_resnet38 --dataset digits``
(or ``python experiments/train_backbone.py``); ``--help`` lists every option of
:class:`backbones.train.TrainConfig`. Rerun the same command after an interruption to resume."""

from __future__ import annotations

import logging

from backbones.train import TrainConfig, train
from experiments.cli import parse


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = parse(TrainConfig, argv)
    _, meta = train(cfg)
    print(
        f"{meta['arch']} on {meta['dataset']}: val accuracy {meta['val_accuracy']:.4f}, "
        f"test accuracy {meta['test_accuracy']:.4f} -> {cfg.checkpoint_path}"
    )


if __name__ == "__main__":
    main()
