"""The data sets' loaders, by name (:data:`LOADERS`; :func:`backbones.data.load_dataset` is the way in):
the embedded digits and cluttered digits, torchvision's, a user's image folder and ``.npz``; and
the normalisation statistics of a user's images."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from backbones.cluttered import RENDERINGS, cluttered_sources, cluttered_split
from backbones.data import Dataset, DatasetNotFoundError, FolderImages, ImageTensors
from backbones.splits import VAL_FRACTION, fixed_split

log = logging.getLogger(__name__)

IN_MEMORY_SIDE = 64
"""Image folders whose images are at most this many pixels on a side are loaded into memory."""


@functools.lru_cache(maxsize=4)
def _digits_upscaled(size: int) -> tuple[Tensor, Tensor, tuple, tuple]:
    """scikit-learn's 1,797 digits at ``size`` x ``size``, their labels and statistics, read once per
    process (a read parses a text file: 0.03 s, and a run reads its splits several times)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0))[:, None]  # (1797, 1, 8, 8)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = x.round().clamp(0, 255).to(torch.uint8)
    return images, torch.from_numpy(bunch.target.astype(np.int64)), *_channel_stats(images)


def _digits(split: str, root: Path, download: bool, image_size: int | None) -> ImageTensors:
    images, labels, mean, std = _digits_upscaled(image_size or 16)
    idx = torch.from_numpy(fixed_split(len(labels), (0.1, 0.2), split))
    return ImageTensors(images[idx], labels[idx], 10, mean, std, "digits")  # indexed: copies


def _cluttered(name: str) -> Callable[[str, Path, bool, int | None], ImageTensors]:
    """The loader of the embedded rendering ``name`` (:data:`backbones.cluttered.RENDERINGS`)."""

    def load(split: str, root: Path, download: bool, image_size: int | None) -> ImageTensors:
        cfg = RENDERINGS[name]
        cfg = dataclasses.replace(cfg, canvas=image_size) if image_size else cfg
        images, labels = cluttered_split(split, cfg, name=name)
        # normalisation statistics of the training split, whichever split is asked for
        mean, std = _channel_stats(cluttered_split("train", cfg, name=name)[0] if split != "train" else images)
        return ImageTensors(images, labels, 10, mean, std, name, groups=cluttered_sources(split))

    return load


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
        data = _resize(data, image_size, antialias=False)
        if split != "test":  # carve a fixed 10% validation set out of the official training set
            idx = torch.from_numpy(fixed_split(len(labels), (0.1, 0.0), split))
            data, labels = data[idx], labels[idx]
        num_classes = 100 if cls_name == "CIFAR100" else 10
        return ImageTensors(data.contiguous(), labels, num_classes, mean, std, name, flip)

    return load


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``(N, C, H, W)`` images in [0, 1] units.

    From exact integer sums (in chunks: a float copy of a large training set would not fit): a float
    sum's rounding depends on how many threads share the reduction, and these statistics are part of
    the data's fingerprint, so a float mean made one thread's cached backbones miss under two."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.int64)
    squares = torch.zeros(c, dtype=torch.int64)
    for chunk in images.split(4096):
        x = chunk.transpose(0, 1).reshape(c, -1).to(torch.int64)  # (C, pixels)
        total += x.sum(1)
        squares += (x * x).sum(1)
    count = images.numel() // c
    mean = [int(t) / count for t in total]  # in [0, 255]: Python floats from exact integers
    std = [max(int(q) / count - m * m, 1e-12) ** 0.5 for q, m in zip(squares, mean)]
    return tuple(m / 255.0 for m in mean), tuple(v / 255.0 for v in std)


Arrays = tuple[Tensor, Tensor]  # uint8 images (N, C, H, W), int64 labels (N,)


def _user_split(
    name: str, split: str, train: Arrays, test: Arrays, val: Arrays | None, num_classes: int
) -> ImageTensors:
    """``split`` of a user's own in-memory data: the validation split is ``val``, or a fixed
    :data:`VAL_FRACTION` of the training images (never test images); normalisation from the training
    split; CIFAR-style augmentation (pad-and-crop, horizontal flips)."""
    if val is None:
        keep, held = (torch.from_numpy(fixed_split(len(train[1]), (VAL_FRACTION, 0.0), s)) for s in ("train", "val"))
        train, val = (train[0][keep], train[1][keep]), (train[0][held], train[1][held])
    mean, std = _channel_stats(train[0])
    images, labels = {"train": train, "val": val, "test": test}[split]
    return ImageTensors(images.contiguous(), labels, num_classes, mean, std, name, flip=True)


def _resize(images: Tensor, image_size: int | None, antialias: bool = True) -> Tensor:
    """uint8 ``(N, C, H, W)`` resized to ``image_size`` square (bilinear; as is when ``None`` or
    already that size)."""
    if image_size is None or images.shape[-2:] == (image_size, image_size):
        return images
    x = F.interpolate(
        images.float(), size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=antialias
    )
    return x.round().clamp(0, 255).to(torch.uint8)


def _image_folder_splits(root: Path) -> dict[str, Path | None]:
    """The folder of each split: ``test/``, or ImageNet's ``val/`` where there is no ``test/``;
    ``val/`` is the validation split only beside a ``test/`` (else it is carved from ``train/``)."""
    has_test = (root / "test").is_dir()
    return {
        "train": root / "train",
        "val": root / "val" if has_test and (root / "val").is_dir() else None,
        "test": root / "test" if has_test else root / "val",
    }


def _files_fingerprint(folder: Path, samples: list[tuple[str, int]]) -> str:
    digest = hashlib.sha256()
    for path, label in samples:
        st = os.stat(path)
        digest.update(f"{os.path.relpath(path, folder)}:{label}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


_decoded: dict[tuple[str, str, int | None], tuple[Arrays, list[str]]] = {}


def _decode_folder(folder: Path, image_size: int | None) -> tuple[Arrays, list[str]]:
    """Every image of ``folder/<class>/`` decoded into one uint8 tensor (once per process and
    contents: the key holds the files' fingerprint), and the class names."""
    import torchvision
    from PIL import Image

    found = torchvision.datasets.ImageFolder(str(folder), loader=lambda p: p)
    key = (str(folder.resolve()), _files_fingerprint(folder, found.samples), image_size)
    if key not in _decoded:
        with Image.open(found.samples[0][0]) as first:
            mode = "L" if first.mode in ("1", "L", "I;16", "I", "F") else "RGB"
        arrays: list[np.ndarray] = []
        for path, _ in found.samples:
            with Image.open(path) as im:
                im = im.convert(mode)
                if image_size is not None and im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
                arr = np.asarray(im)
            if arrays and arr.shape != arrays[0].shape:
                raise ValueError(
                    f"images in {folder} differ in size ({found.samples[0][0]}: {arrays[0].shape[1::-1]}, {path}: "
                    f"{arr.shape[1::-1]}): pass --image-size N to resize them all to N x N"
                )
            arrays.append(arr)
        images = torch.from_numpy(np.stack(arrays))
        images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)
        labels = torch.tensor([label for _, label in found.samples], dtype=torch.int64)
        _decoded[key] = ((images.contiguous(), labels), found.classes)
    return _decoded[key]


def _first_image_side(folder: Path) -> int:
    from PIL import Image

    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(class_dir.iterdir()):
            try:
                with Image.open(path) as im:
                    return max(im.size)
            except OSError:  # not an image
                continue
    raise DatasetNotFoundError(f"no image found in {folder}/<class>/: expected {folder}/<class>/<image>")


def _imagefolder(split: str, root: Path, download: bool, image_size: int | None) -> Dataset:
    folders = _image_folder_splits(root)
    train_dir, test_dir = folders["train"], folders["test"]
    assert train_dir is not None and test_dir is not None  # always named; only val/ is optional
    for folder in (train_dir, test_dir):
        if not folder.is_dir():
            raise DatasetNotFoundError(
                f"image folder {folder.resolve()} not found: expected {root}/train/<class>/<image> and "
                f"{root}/test/<class>/<image> (or ImageNet's {root}/val/... as the test split; a {root}/val/ beside "
                f"test/ is the validation split, else 10% of train/ is). Pass --data-root pointing at it."
            )
    if (image_size or _first_image_side(train_dir)) <= IN_MEMORY_SIDE:
        decoded = {s: _decode_folder(f, image_size) for s, f in folders.items() if f is not None}
        classes = decoded["train"][1]
        for s, (_, other) in decoded.items():
            if other != classes:
                raise ValueError(
                    f"the class folders of {root} differ between splits: train/ has {classes}, the {s} split has "
                    f"{other}; every split needs the same <class> folders"
                )
        train, test = decoded["train"][0], decoded["test"][0]
        val = decoded["val"][0] if "val" in decoded else None
        return _user_split("imagefolder", split, train, test, val, len(classes))
    return _streamed_folder(split, folders, image_size)


def _streamed_folder(split: str, folders: dict[str, Path | None], image_size: int | None) -> FolderImages:
    """A large image folder (ImageNet), read and augmented image by image through a ``DataLoader``."""
    import torchvision
    from torchvision.transforms import v2

    size = image_size or 224
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if split == "train":
        aug = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        aug = [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    transform = v2.Compose([v2.PILToTensor(), *aug, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    folder = folders[split] or folders["train"]
    assert folder is not None
    ds = torchvision.datasets.ImageFolder(str(folder), transform=transform)
    samples = ds.samples
    dataset: torch.utils.data.Dataset = ds
    if split != "test" and folders["val"] is None:  # the validation split is carved from train/
        idx = fixed_split(len(ds), (VAL_FRACTION, 0.0), split)
        dataset = torch.utils.data.Subset(ds, idx.tolist())
        samples = [ds.samples[i] for i in idx]
    return FolderImages(dataset, len(ds.classes), (3, size, size), "imagefolder", _files_fingerprint(folder, samples))


def _npz_file(root: Path) -> Path:
    if root.suffix == ".npz":
        if not root.is_file():
            raise DatasetNotFoundError(f"{root.resolve()} not found: pass --data-root pointing at your .npz file")
        return root
    found = sorted(root.glob("*.npz")) if root.is_dir() else []
    if len(found) != 1:
        raise DatasetNotFoundError(
            f"--dataset npz reads one .npz file: pass --data-root pointing at it (found {len(found)} in "
            f"{root.resolve()})"
        )
    return found[0]


def _npz_arrays(file: Path, x_key: str, y_key: str) -> Arrays:
    with np.load(file, allow_pickle=False) as npz:
        if x_key not in npz or y_key not in npz:
            raise ValueError(
                f"{file} has no {x_key!r} / {y_key!r}: a .npz data set holds x_train, y_train, x_test, y_test "
                f"(uint8 images, integer labels) and optionally x_val, y_val; it has {sorted(npz.files)}"
            )
        x, y = npz[x_key], npz[y_key]
    if x.dtype != np.uint8:
        raise ValueError(f"{file}:{x_key} is {x.dtype}: images must be uint8 in 0..255 (scale and cast them)")
    if x.ndim == 3:  # (N, H, W)
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # (N, H, W, C)
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"{file}:{x_key} has shape {x.shape}: expected (N, H, W), (N, H, W, C) or (N, C, H, W), C 1 or 3"
        )
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{file}:{y_key} must be {len(x)} integer labels, got {y.dtype} {y.shape}")
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))


def _npz(split: str, root: Path, download: bool, image_size: int | None) -> ImageTensors:
    file = _npz_file(root)
    with np.load(file, allow_pickle=False) as npz:
        has_val = "x_val" in npz.files
    train, test = _npz_arrays(file, "x_train", "y_train"), _npz_arrays(file, "x_test", "y_test")
    val = _npz_arrays(file, "x_val", "y_val") if has_val else None
    parts = [p for p in (train, test, val) if p is not None]
    num_classes = max(int(y.max()) for _, y in parts if len(y)) + 1
    train, test = (_resize(train[0], image_size), train[1]), (_resize(test[0], image_size), test[1])
    val = (_resize(val[0], image_size), val[1]) if val is not None else None
    return _user_split("npz", split, train, test, val, num_classes)


LOADERS: dict[str, Callable[[str, Path, bool, int | None], Dataset]] = {
    "digits": _digits,
    **{name: _cluttered(name) for name in RENDERINGS},
    **{name: _torchvision(name) for name in _TORCHVISION},
    "imagefolder": _imagefolder,
    "npz": _npz,
}
