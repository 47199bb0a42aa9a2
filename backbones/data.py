"""Data sets behind one function, :func:`load_dataset`.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits, upscaled; fixed train/val/test split.
  Embedded: it needs no download.
* ``cluttered_digits``: those digits drawn at random scale, position and contrast among clutter
  and noise on a 24x24 canvas (12,000 / 2,000 / 5,000 images), generated offline and cached
  (:mod:`backbones.cluttered`); difficulty varies from image to image. The embedded default.
* ``mnist``, ``cifar10``, ``cifar100``, ``svhn``: torchvision, downloaded when online, read from
  ``root`` when the files are already there.
* ``imagefolder``: a user's own ``root/{train,test}/<class>/<image>`` folder, or ImageNet's
  ``root/{train,val}/...`` (``val`` is then the test split). Small images (side at most
  :data:`IN_MEMORY_SIDE`) are decoded once into memory; large ones stream through a ``DataLoader``.
* ``npz``: a user's own ``.npz`` of uint8 images and labels (``x_train``, ``y_train``, ``x_test``,
  ``y_test``, optionally ``x_val``, ``y_val``), the format researchers pass around.

Small data sets are held in memory as ``uint8`` tensors (:class:`ImageTensors`) so the
environment can keep them on the device and pick batches without a host-device copy. Where a data
set has no validation split of its own, a fixed 10% of its training images is carved out: the
validation split never holds a test image. Every split has a :attr:`~ImageTensors.fingerprint` of
its contents, which backbones and agents are keyed and checked by.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from backbones.cluttered import ClutterConfig, cluttered_sources, cluttered_split
from backbones.splits import SPLITS, VAL_FRACTION, fixed_split

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path(os.environ.get("SKIPNET_DATA", "data"))
IN_MEMORY_SIDE = 64
"""Image folders whose images are at most this many pixels on a side are loaded into memory."""


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


def loader_workers(requested: int) -> int:
    """``requested`` data-loader workers, at most the cores this process may use (more only
    contend, and torch warns)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(requested, cores))


def data_loader(
    data: FolderImages,
    batch_size: int,
    device: torch.device,
    *,
    shuffle: bool,
    drop_last: bool = False,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
) -> torch.utils.data.DataLoader:
    """The ``DataLoader`` an image folder streams through (workers capped at the cores)."""
    return torch.utils.data.DataLoader(
        data.dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=loader_workers(num_workers),
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        generator=generator,
    )


def _digits(split: str, root: Path, download: bool, image_size: int | None) -> ImageTensors:
    from sklearn.datasets import load_digits

    size = image_size or 16
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0))[:, None]  # (1797, 1, 8, 8)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = x.round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    mean, std = _channel_stats(images)
    idx = torch.from_numpy(fixed_split(len(labels), (0.1, 0.2), split))
    return ImageTensors(images[idx], labels[idx], 10, mean, std, "digits")


def _cluttered_digits(split: str, root: Path, download: bool, image_size: int | None) -> ImageTensors:
    cfg = ClutterConfig(canvas=image_size) if image_size else ClutterConfig()
    images, labels = cluttered_split(split, cfg)
    # normalisation statistics of the training split, whichever split is asked for
    mean, std = _channel_stats(cluttered_split("train", cfg)[0] if split != "train" else images)
    return ImageTensors(images, labels, 10, mean, std, "cluttered_digits", groups=cluttered_sources(split))


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


_LOADERS: dict[str, Callable[[str, Path, bool, int | None], Dataset]] = {
    "digits": _digits,
    "cluttered_digits": _cluttered_digits,
    **{name: _torchvision(name) for name in _TORCHVISION},
    "imagefolder": _imagefolder,
    "npz": _npz,
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
            fixed 10% of their training set (never test images).
        root: folder holding (or receiving) the files, or the ``.npz`` file; default
            ``$SKIPNET_DATA`` or ``./data``.
        download: fetch missing files (torchvision data sets only).
        image_size: resize square images to this side (default: the data set's own; 16 for digits).
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return _LOADERS[name](split, Path(root) if root is not None else DEFAULT_ROOT, download, image_size)


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


def batches(
    data: Dataset,
    batch_size: int,
    device: torch.device,
    *,
    train: bool,
    shift: int = 0,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Normalised image batches ``(B, C, H, W)`` and labels ``(B,)`` on ``device``; shuffled and
    augmented when ``train``."""
    if isinstance(data, ImageTensors):
        data = data.to(device)
        n = len(data)
        order = (
            torch.randperm(n, device="cpu", generator=generator).to(device) if train else torch.arange(n, device=device)
        )
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x = data.images[idx]
            if train:
                x = random_shift(x, shift)
                if data.flip:
                    flip = torch.rand(x.shape[0], device=device) < 0.5
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            yield data.normalize(x), data.labels[idx]
    else:
        loader = data_loader(data, batch_size, device, shuffle=train, num_workers=num_workers, generator=generator)
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
