"""Data sets behind one function, :func:`load_dataset`.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits, upscaled; fixed train/val/test split.
  Embedded: it needs no download.
* ``cluttered_digits``: those digits drawn at random scale, position and contrast among clutter
  and noise on a 24x24 canvas (12,000 / 5,000 / 5,000 images), generated offline and cached
  (:mod:`backbones.cluttered`); difficulty varies from image to image. The embedded default.
  ``cluttered_digits_hard``: the same digits smaller and fainter among more clutter and noise,
  where the default network scores about 75% (94% on the default).
* ``mnist``, ``cifar10``, ``cifar100``, ``svhn``: torchvision, downloaded when online, read from
  ``root`` when the files are already there.
* ``imagefolder``: a user's own ``root/{train,test}/<class>/<image>`` folder, or ImageNet's
  ``root/{train,val}/...`` (``val`` is then the test split). Small images (side at most
  :data:`backbones.loaders.IN_MEMORY_SIDE`) are decoded once into memory; large ones stream
  through a ``DataLoader``.
* ``npz``: a user's own ``.npz`` of uint8 images and labels (``x_train``, ``y_train``, ``x_test``,
  ``y_test``, optionally ``x_val``, ``y_val``), the format researchers pass around.

Small data sets are held in memory as ``uint8`` tensors (:class:`ImageTensors`) so the
environment can keep them on the device and pick batches without a host-device copy. Where a data
set has no validation split of its own, a fixed 10% of its training images is carved out: the
validation split never holds a test image. Every split has a :attr:`~ImageTensors.fingerprint` of
its contents, which backbones and agents are keyed and checked by.

This module holds the types and the public functions; the loaders are :mod:`backbones.loaders`, the
batches (shuffling, augmentation, streaming) :mod:`backbones.batching`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from backbones.splits import SPLITS

DEFAULT_ROOT = Path(os.environ.get("SKIPNET_DATA", "data"))


class DatasetNotFoundError(FileNotFoundError):
    """The data set's files are not on disk and could not be downloaded."""


@dataclass
class ImageTensors:
    """A labelled image set in memory.

    Attributes:
        images: ``(N, C, H, W)`` uint8.
        labels: ``(N,)`` int64.
        num_classes: number of classes.
        mean, std: per-channel normalisation, in [0, 1] units.
        name: data set name.
        flip: horizontal flips are a valid augmentation (not for digits).
        groups: ``(N,)`` int64 or ``None``: the independent unit each image was made from (the source
            digit of a ``cluttered_digits`` rendering); intervals resample groups, not images.
            ``None``: every image is its own.
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    flip: bool = False
    groups: Tensor | None = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W) uint8, got {tuple(self.images.shape)} {self.images.dtype}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be ({self.images.shape[0]},), got {tuple(self.labels.shape)}")
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < self.num_classes:
            raise ValueError(
                f"labels of {self.name!r} must be class indices in [0, {self.num_classes}), got "
                f"[{int(self.labels.min())}, {int(self.labels.max())}]: set num_classes to the number of classes"
            )
        if self.groups is not None and self.groups.shape != self.labels.shape:
            raise ValueError(f"groups must name one group per image: ({len(self)},), got {tuple(self.groups.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def fingerprint(self) -> str:
        """A hash of the images, labels and normalisation (computed once): what tells two data sets
        of the same name and shape apart."""
        if self._fingerprint is None:
            digest = hashlib.sha256(repr((self.num_classes, self.mean, self.std, self.input_size)).encode())
            digest.update(self.images.detach().cpu().contiguous().numpy().tobytes())
            digest.update(self.labels.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def to(self, device: torch.device | str) -> ImageTensors:
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 ``(B, C, H, W)`` -> normalised float32, on the images' device."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised images ``(B, C, H, W)`` and labels ``(B,)`` at ``index`` (on the data's device)."""
        return self.normalize(self.images[index]), self.labels[index]


@dataclass
class FolderImages:
    """An image folder too large for memory, read through a torch ``Dataset``.

    Attributes:
        dataset: yields ``(normalised float (C, H, W), label)``.
    """

    dataset: torch.utils.data.Dataset
    num_classes: int
    input_size: tuple[int, int, int]
    name: str
    fingerprint: str
    """a hash of the files' names, sizes and modification times (reading every image would take
    as long as an epoch)"""

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


Dataset = ImageTensors | FolderImages


def groups_of(data: Dataset) -> np.ndarray | None:
    """The independent unit of each image of ``data`` ``(N,)`` (:attr:`ImageTensors.groups`), or
    ``None`` where every image is its own: what intervals over ``data`` resample."""
    groups = getattr(data, "groups", None)
    return None if groups is None else groups.cpu().numpy()


def data_fingerprint(splits: Iterable[Dataset]) -> str:
    """One fingerprint of several splits (train, val, test): a backbone's or an agent's data."""
    return hashlib.sha256(":".join(d.fingerprint for d in splits).encode()).hexdigest()[:16]


def list_datasets() -> list[str]:
    from backbones.loaders import LOADERS  # the loaders import this module's types

    return sorted(LOADERS)


def load_dataset(
    name: str,
    split: str = "train",
    root: str | Path | None = None,
    download: bool = True,
    image_size: int | None = None,
) -> Dataset:
    """Load ``split`` of data set ``name``.

    Args:
        name: one of :func:`list_datasets`.
        split: ``train``, ``val`` or ``test``. Data sets without an official validation set get a
            fixed 10% of their training set (never test images).
        root: folder holding (or receiving) the files, or the ``.npz`` file; default
            ``$SKIPNET_DATA`` or ``./data``.
        download: fetch missing files (torchvision data sets only).
        image_size: resize square images to this side (default: the data set's own; 16 for digits).
    """
    from backbones.loaders import LOADERS

    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return LOADERS[name](split, Path(root) if root is not None else DEFAULT_ROOT, download, image_size)


def load_splits(
    name: str, root: str | Path | None = None, download: bool = True, image_size: int | None = None
) -> dict[str, Dataset]:
    """The train, val and test splits of data set ``name`` (arguments as :func:`load_dataset`)."""
    return {s: load_dataset(name, s, root, download, image_size) for s in SPLITS}


def with_flip(data: Dataset, flip: bool | None) -> Dataset:
    """``data`` with horizontal-flip augmentation set to ``flip`` (``None``: the data set's own; a
    streamed folder keeps its own transforms)."""
    if flip is None or not isinstance(data, ImageTensors):
        return data
    return dataclasses.replace(data, flip=flip)
