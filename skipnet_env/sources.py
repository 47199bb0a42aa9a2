"""What an environment is built from: a backbone and a data set, given by name, path or object,
checked against each other, and a sampler of image batches that lives on the device."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from typing_extensions import TypedDict, Unpack

from backbones.base import Backbone
from backbones.batching import data_loader
from backbones.checkpoint import load_backbone
from backbones.data import Dataset, FolderImages, ImageTensors, load_dataset
from backbones.device import resolve_device
from backbones.exits import ExitHeads
from backbones.registry import list_backbones
from skipnet_env.core import DEFAULT_ALPHA, AccuracyReward, BatchedRouting, CostTiming, RewardConfig

BackboneSpec = str | Path | Backbone
DatasetSpec = str | Dataset
DEFAULT_BACKBONE = "cifar_resnet38"
DEFAULT_DATASET = "cluttered_digits"


class EnvOptions(TypedDict, total=False):
    """The keyword options every routing env takes (see :func:`build_sources`)."""

    split: str
    alpha: float
    accuracy_reward: AccuracyReward
    cost_timing: CostTiming
    gate_first_block: bool
    device: str | torch.device
    data_root: str | None
    download: bool
    image_size: int | None
    backbone_train: dict[str, Any] | None
    precision: str
    early_exit: bool
    exit_heads: ExitHeads | None


@dataclass
class EnvSources:
    """What an env runs on: its device, data set, backbone and the batched state machine."""

    device: torch.device
    data: Dataset
    backbone: Backbone
    core: BatchedRouting


def build_sources(
    backbone: BackboneSpec = DEFAULT_BACKBONE,
    dataset: DatasetSpec = DEFAULT_DATASET,
    differentiable: bool = False,
    **options: Unpack[EnvOptions],
) -> EnvSources:
    """Build an env's sources in one place.

    Args:
        backbone: a :class:`backbones.Backbone`, a checkpoint path, or a registry name (then the
            backbone trained on ``dataset`` is taken from the cache, trained first if missing).
        dataset: a data set name (see ``backbones.list_datasets()``) or an ``ImageTensors``.
        differentiable: keep the autograd graph through the backbone (see :class:`BatchedRouting`).
        **options: ``split`` (``train``, ``val``, ``test``; default train); ``alpha`` (weight of
            compute in the reward, >= 0); ``accuracy_reward`` (``"correct"``: 1/0, or ``"neg_ce"``:
            SkipNet's negative cross-entropy); ``cost_timing`` (``"terminal"``: all cost at the
            end, or ``"per_step"``: each block's FLOPs when spent); ``gate_first_block`` (let the
            agent skip the first block, which SkipNet always runs); ``device`` (``"auto"``,
            ``"cpu"``, ``"cuda"``, ...); ``data_root``, ``download``, ``image_size`` (passed to
            ``backbones.load_dataset``); ``backbone_train`` (overrides of
            ``backbones.train.TrainConfig`` when a named backbone is trained); ``precision`` of the
            frozen backbone (``"auto"``: bf16 on CUDA, fp32 elsewhere; ``"fp32"``; ``"bf16"``);
            ``early_exit`` (a third action, 2: stop the episode at this block, every later block
            skipped and the head classifying from there; the observation gains an "exited" flag);
            ``exit_heads`` (with ``early_exit`` on a CNN, whose head reads only the last block's
            activation: the classifiers where an episode exits, :func:`backbones.exits.fit_exit_heads`).
    """
    unknown = set(options) - set(EnvOptions.__annotations__)
    if unknown:
        known = sorted(EnvOptions.__annotations__)
        raise TypeError(f"unknown env option(s) {sorted(unknown)}; the options are {known}")
    alpha = options.get("alpha", DEFAULT_ALPHA)
    if not (isinstance(alpha, int | float) and alpha >= 0):  # below 0 only as a budget's price: env.alpha = ...
        raise ValueError(f"alpha must be a finite number >= 0 (the weight of compute), got {alpha!r}")
    reward = RewardConfig(  # validated before any heavy work
        alpha,
        options.get("accuracy_reward", "correct"),
        options.get("cost_timing", "terminal"),
    )
    device = resolve_device(options.get("device", "auto"))
    data = resolve_dataset(
        dataset,
        options.get("split", "train"),
        options.get("data_root"),
        options.get("download", True),
        options.get("image_size"),
    )
    net = resolve_backbone(backbone, data, device, options.get("backbone_train"))
    core = BatchedRouting(
        net, reward, options.get("gate_first_block", False), differentiable, options.get("precision", "auto"),
        early_exit=options.get("early_exit", False), exit_heads=options.get("exit_heads"),
    )  # fmt: skip
    return EnvSources(device, data, net, core)


def resolve_dataset(
    dataset: DatasetSpec, split: str, data_root: str | None, download: bool, image_size: int | None
) -> Dataset:
    if isinstance(dataset, ImageTensors | FolderImages):
        return dataset
    if not isinstance(dataset, str):
        raise TypeError(f"dataset must be a name, ImageTensors or FolderImages, got {type(dataset).__name__}")
    return load_dataset(dataset, split, data_root, download, image_size)


def resolve_backbone(
    backbone: BackboneSpec, data: Dataset, device: torch.device, train_overrides: dict[str, Any] | None = None
) -> Backbone:
    """A backbone object as given; a checkpoint path loaded (checked against ``data``); or a
    registry name, trained on ``data``'s data set and cached on first use."""
    if isinstance(backbone, Backbone):
        net = backbone
    elif isinstance(backbone, str | Path) and (Path(backbone).suffix in (".pt", ".pth") or Path(backbone).is_file()):
        net, _ = load_backbone(backbone, dataset=data.name, map_location=device)
    elif isinstance(backbone, str) and backbone in list_backbones():
        from backbones.pretrained import get_trained

        overrides = {
            "device": str(device),
            "progress": False,
            "image_size": data.input_size[1],
            **(train_overrides or {}),
        }
        net, _ = get_trained(backbone, data.name, **overrides)
    else:
        raise ValueError(
            f"backbone must be a Backbone, a checkpoint path, or one of {', '.join(list_backbones())}; got {backbone!r}"
        )
    check_compatible(net, data)
    return net.to(device).eval()


def check_compatible(backbone: Backbone, data: Dataset) -> None:
    """Raise ``ValueError`` if ``backbone`` was not built for ``data``'s classes and input size."""
    problems = []
    if backbone.num_classes != data.num_classes:
        problems.append(f"the backbone has {backbone.num_classes} classes, the data set {data.num_classes}")
    if tuple(backbone.input_size) != tuple(data.input_size):
        problems.append(
            f"the backbone expects inputs of (C, H, W) = {tuple(backbone.input_size)}, the data set has "
            f"{tuple(data.input_size)}"
        )
    if problems:
        raise ValueError(
            f"backbone {backbone.arch} does not fit data set {data.name!r}: {'; '.join(problems)}. "
            "Use a backbone trained on this data set (python -m experiments.train_backbone --dataset ...)."
        )


def one_image(
    data: Dataset, device: torch.device, rng: np.random.Generator, options: dict[str, Any] | None
) -> tuple[int, Tensor, Tensor]:
    """The image a single-image env's ``reset`` starts on: ``options["index"]``, or a random one
    drawn from ``rng``; returns its index, the normalised image ``(1, C, H, W)`` and label ``(1,)``."""
    index = (options or {}).get("index")
    if index is None:
        index = int(rng.integers(len(data)))
    elif not isinstance(index, int | np.integer) or isinstance(index, bool) or not 0 <= index < len(data):
        raise IndexError(f"options['index'] must be an integer in [0, {len(data)}), got {index!r}")
    index = int(index)
    if isinstance(data, ImageTensors):
        return index, data.normalize(data.images[index : index + 1]), data.labels[index : index + 1]
    x, y = data.dataset[index]
    return index, x[None].to(device), torch.tensor([y], device=device)


class BatchSampler:
    """Draws batches of ``batch_size`` images without replacement, epoch after epoch.

    In-memory data sets live on ``device`` and are indexed there: no host-device copy. Image
    folders go through a ``DataLoader`` (one copy per batch, at episode start).
    """

    def __init__(self, data: Dataset, batch_size: int, device: torch.device, num_workers: int = 0) -> None:
        if len(data) < batch_size:
            raise ValueError(f"batch of {batch_size} images asked from a data set of {len(data)}")
        self.data = data.to(device) if isinstance(data, ImageTensors) else data
        self.batch_size = batch_size
        self.device = device
        self.num_workers = num_workers
        self.generator = torch.Generator(device=device if isinstance(data, ImageTensors) else "cpu")
        self.seed()

    def seed(self, seed: int | None = None) -> None:
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self._order: Tensor | None = None
        self._pos = 0
        self._loader_iter: Iterator[Any] | None = None
        self._last_state: dict[str, Any] | None = None

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"generator": self.generator.get_state(), "pos": self._pos}
        if self._order is not None:
            state["order"] = self._order
        return state

    def state_before_last_draw(self) -> dict[str, Any]:
        """Where the sampler stood before it drew the current batch (tensors and ints: a checkpoint
        can hold it); :meth:`restore` then :meth:`next` draws that batch again. In-memory data only."""
        return self._last_state if self._last_state is not None else self._state()

    def restore(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].cpu())
        self._pos = int(state["pos"])
        self._order = state["order"].to(self.device) if "order" in state else None
        self._loader_iter = None

    def next(self) -> tuple[Tensor, Tensor]:
        """Normalised images ``(B, C, H, W)`` and labels ``(B,)`` on the device."""
        self._last_state = self._state() if isinstance(self.data, ImageTensors) else None
        if isinstance(self.data, ImageTensors):
            n = len(self.data)
            if self._order is None or self._pos + self.batch_size > n:
                self._order = torch.randperm(n, device=self.device, generator=self.generator)
                self._pos = 0
            idx = self._order[self._pos : self._pos + self.batch_size]
            self._pos += self.batch_size
            return self.data.batch(idx)
        if self._loader_iter is None:
            self._loader_iter = iter(self._loader(self.data))
        try:
            x, y = next(self._loader_iter)
        except StopIteration:
            self._loader_iter = iter(self._loader(self.data))
            x, y = next(self._loader_iter)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _loader(self, data: FolderImages) -> torch.utils.data.DataLoader:
        return data_loader(
            data,
            self.batch_size,
            self.device,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            generator=self.generator,
        )
