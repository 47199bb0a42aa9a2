"""Trained backbones on demand: train once, cache, reuse.

``get_trained("cifar_resnet38", "digits")`` returns the cached backbone trained on the embedded
data set, training it first (under a minute on a 2-core CPU) when the cache has none.
The cache folder is ``$SKIPNET_CACHE`` (default ``~/.cache/skipnet_gym``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from backbones.base import Backbone
from backbones.cache import building, cache_dir, file_name
from backbones.data import data_fingerprint, load_splits
from backbones.device import precision_name, resolve_device, training_dtype
from backbones.train import TrainConfig, train

__all__ = ["cache_dir", "get_trained"]


# the training options in a cached backbone's name, in this order (the names of existing caches)
WEIGHT_FIELDS = (
    "width", "image_size", "epochs", "batch_size", "lr", "weight_decay", "drop_rate", "drop_schedule", "shift", "flip",
    "seed",
)  # fmt: skip
# options that change the weights too but came later: named only when they differ from their default, so that
# the caches made before them keep their names
NAMED_WHEN_CHANGED = ("momentum", "optimizer", "model_args", "accumulate")


def _named(value: Any) -> str:
    """An option's value in a file name: a tuple joined by commas, a hash of it where that is long."""
    if not isinstance(value, tuple):
        return str(value)
    joined = ",".join(map(str, value))
    return joined if len(joined) <= 48 else hashlib.sha256(joined.encode()).hexdigest()[:12]


def weights_key(cfg: TrainConfig) -> str:
    """The part of a cached backbone's name that says how it was trained: every option that changes
    its weights (the data's fingerprint is added beside it). The precision as it resolves on this
    device, named where it is not fp32 (bf16 training makes other weights)."""
    key = "-".join(f"{f}{getattr(cfg, f)}" for f in WEIGHT_FIELDS)
    defaults = TrainConfig(arch=cfg.arch, dataset=cfg.dataset)
    key += "".join(
        f"-{f}{_named(getattr(cfg, f))}" for f in NAMED_WHEN_CHANGED if getattr(cfg, f) != getattr(defaults, f)
    )
    autocast = training_dtype(cfg.precision, resolve_device(cfg.device))
    return key + (f"-{precision_name(autocast)}" if autocast is not None else "")


def get_trained(arch: str, dataset: str, **train_overrides: Any) -> tuple[Backbone, dict[str, Any]]:
    """The backbone ``arch`` trained on ``dataset`` with :class:`TrainConfig` defaults and
    ``train_overrides``; cached under :func:`cache_dir` by everything that changes the weights, the
    data's contents (:func:`backbones.data.data_fingerprint`) included.

    Returns:
        the backbone (eval mode, on ``device``) and its checkpoint metadata.
    """
    cfg = TrainConfig(arch=arch, dataset=dataset, **train_overrides)
    splits = load_splits(dataset, cfg.data_root, cfg.download, cfg.image_size)
    if cfg.image_size is None:  # the data set's own size, named in the key as the envs name it
        cfg = dataclasses.replace(cfg, image_size=splits["train"].input_size[1])
    # the data's contents too: another --data-root (or a changed file) trains its own backbone
    key = weights_key(cfg) + f"-data{data_fingerprint(splits.values())}"
    if cfg.out is None:
        cfg = dataclasses.replace(
            cfg,
            out=str(cache_dir() / "backbones" / f"{file_name(arch)}-{file_name(dataset)}-{key}.pt"),
            log_dir=str(cache_dir() / "runs"),
        )
    with building(cfg.checkpoint_path):  # a second process wanting this backbone waits, then reuses it
        return train(cfg, splits)
