"""Data sets behind one function, :func:`load_dataset`.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits, upscaled; fixed train/val/test split.
  Embedded: it needs no download.
* ``cluttered_digits``: those digits drawn at random scale, position and contrast among clutter
  and noise on a 24x24 canvas (12,000 / 2,000 / 5,000 images), generated offline and cached
  (:mod:`backbones.cluttered`); difficulty varies from image to image. The embedded default.
* ``mnist``, ``cifar10``, ``cifar100``, ``svhn``: torchvision, downloaded when online, read from
  ``root`` when the files are already there.
* ``imagefolder``: ImageNet or a user's own ``root/{train,val}/<class>/<image>`` folder.

Small data sets are held in memory as ``uint8`` tensors (:class:`ImageTensors`) so the
environment can keep them on the device and pick batches without a host-device copy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
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
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    flip: bool = False

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

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> ImageTensors:
        return ImageTensors(
            self.images.to(device), self.labels.to(device), self.num_classes, self.mean, self.std, self.name, self.flip
        )

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

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


Dataset = ImageTensors | FolderImages


def fixed_split(n: int, fractions: tuple[float, float], split: str, seed: int = 0) -> np.ndarray:
    """Indices of ``split`` in a fixed permutation: ``val`` and ``test`` take ``fractions`` of ``n``."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(n * fractions[0]), round(n * fractions[1])
    parts = {"val": perm[:n_val], "test": perm[n_val : n_val + n_test], "train": perm[n_val + n_test :]}
    return np.sort(parts[split])


def _digits(split: str, root: Path, download: bool, image_size: int | None) -> ImageTensors:
    from sklearn.datasets import load_digits

    size = image_size or 16
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0))[:, None]  # (1797, 1, 8, 8)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = x.round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    mean = float(images.float().mean() / 255.0)
    std = float(images.float().std() / 255.0)
    idx = torch.from_numpy(fixed_split(len(labels), (0.1, 0.2), split))
    return ImageTensors(images[idx], labels[idx], 10, (mean,), (std,), "digits")


def _cluttered_digits(split: str, root: Path, download: bool, image_size: int | None) -> ImageTensors:
    from backbones.cluttered import ClutterConfig, cluttered_split

    cfg = ClutterConfig(canvas=image_size) if image_size else ClutterConfig()
    images, labels = cluttered_split(split, cfg)
    # normalisation statistics of the training split, whichever split is asked for
    stats = cluttered_split("train", cfg)[0].float() / 255.0 if split != "train" else images.float() / 255.0
    return ImageTensors(images, labels, 10, (float(stats.mean()),), (float(stats.std()),), "cluttered_digits")


# name -> (torchvision class, files expected under root, mean, std, flip)
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte", (0.1307,), (0.3081,), False),
    "cifar10": (
        "CIFAR10",
        "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        True,
    ),
    "cifar100": (
        "CIFAR100",
        "cifar-100-python/{train,test,meta}",
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        True,
    ),
    "svhn": ("SVHN", "train_32x32.mat, test_32x32.mat", (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False),
}


def _open_torchvision(cls_name: str, root: Path, train: bool, download: bool, expected: str):
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    kwargs = {"split": "train" if train else "test"} if cls_name == "SVHN" else {"train": train}
    try:
        return cls(str(root), download=False, **kwargs)
    except RuntimeError:
        if not download:
            raise DatasetNotFoundError(
                f"{cls_name} not found in {root.resolve()}: expected {expected} there. "
                f"Pass download=True (--download) when online, or --data-root pointing at the files."
            ) from None
    try:
        return cls(str(root), download=True, **kwargs)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise DatasetNotFoundError(
            f"{cls_name} is not in {root.resolve()} and could not be downloaded ({err}). Offline, put the files "
            f"there by hand: expected {expected}; or pass --data-root pointing at a folder that has them."
        ) from err


def _torchvision(name: str) -> Callable[[str, Path, bool, int | None], ImageTensors]:
    cls_name, expected, mean, std, flip = _TORCHVISION[name]

    def load(split: str, root: Path, download: bool, image_size: int | None) -> ImageTensors:
        ds = _open_torchvision(cls_name, root, split != "test", download, expected)
        data = torch.as_tensor(np.asarray(ds.data))
        if data.ndim == 3:  # MNIST (N, H, W)
            data = data[:, None]
        elif data.shape[-1] == 3:  # CIFAR (N, H, W, C)
            data = data.permute(0, 3, 1, 2)
        labels = torch.as_tensor(np.asarray(ds.labels if cls_name == "SVHN" else ds.targets), dtype=torch.int64)
        if image_size is not None and image_size != data.shape[-1]:
            data = F.interpolate(data.float(), size=(image_size, image_size), mode="bilinear", align_corners=False)
            data = data.round().clamp(0, 255).to(torch.uint8)
        if split != "test":  # carve a fixed 10% validation set out of the official training set
            idx = torch.from_numpy(fixed_split(len(labels), (0.1, 0.0), split))
            data, labels = data[idx], labels[idx]
        num_classes = 100 if cls_name == "CIFAR100" else 10
        return ImageTensors(data.contiguous(), labels, num_classes, mean, std, name, flip)

    return load


def _imagefolder(split: str, root: Path, download: bool, image_size: int | None) -> FolderImages:
    import torchvision
    from torchvision.transforms import v2

    folder = root / {"train": "train", "val": "val", "test": "val"}[split]
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"image folder {folder.resolve()} not found: expected {root}/train/<class>/<image> and "
            f"{root}/val/<class>/<image> (the ImageNet layout). Pass --data-root pointing at it."
        )
    size = image_size or 224
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if split == "train":
        aug = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        aug = [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    transform = v2.Compose([v2.PILToTensor(), *aug, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    ds = torchvision.datasets.ImageFolder(str(folder), transform=transform)
    return FolderImages(ds, len(ds.classes), (3, size, size), "imagefolder")


_LOADERS: dict[str, Callable[[str, Path, bool, int | None], Dataset]] = {
    "digits": _digits,
    "cluttered_digits": _cluttered_digits,
    **{name: _torchvision(name) for name in _TORCHVISION},
    "imagefolder": _imagefolder,
}


def list_datasets() -> list[str]:
    return sorted(_LOADERS)


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
            fixed 10% of their training set; ``imagefolder`` serves ``val`` for ``test``.
        root: folder holding (or receiving) the files; default ``$SKIPNET_DATA`` or ``./data``.
        download: fetch missing files (torchvision data sets only).
        image_size: resize square images to this side (default: the data set's own; 16 for digits).
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return _LOADERS[name](split, Path(root) if root is not None else DEFAULT_ROOT, download, image_size)


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image ``(B, C, H, W)`` by its own random offset in ``[-max_shift, max_shift]``,
    zero-filled: the pad-and-crop augmentation, batched, with no loop over images."""
    if max_shift <= 0:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)  # (B, C, H + 2s, W + 2s)
    off = torch.randint(0, 2 * max_shift + 1, (2, b), device=images.device, generator=generator)
    rows = off[0, :, None] + torch.arange(h, device=images.device)  # (B, H)
    cols = off[1, :, None] + torch.arange(w, device=images.device)  # (B, W)
    bi = torch.arange(b, device=images.device)[:, None, None, None]
    ci = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
