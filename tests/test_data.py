import os
import urllib.error

import numpy as np
import pytest
import torch
import torchvision

import backbones
from backbones.batching import random_shift
from backbones.data import DatasetNotFoundError


def test_digits_splits_are_fixed_disjoint_and_upscaled():
    splits = {s: backbones.load_dataset("digits", s) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [1258, 180, 359]
    assert splits["train"].input_size == (1, 16, 16)
    assert splits["train"].images.dtype == torch.uint8 and splits["train"].num_classes == 10
    flat = {s: {tuple(x.flatten().tolist()) for x in d.images} for s, d in splits.items()}
    assert len(flat["test"] & flat["train"]) < 5  # a few duplicate digits exist in the source data
    again = backbones.load_dataset("digits", "test")
    assert torch.equal(again.images, splits["test"].images)
    assert backbones.load_dataset("digits", "test", image_size=32).input_size == (1, 32, 32)


def test_normalized_batch():
    data = backbones.load_dataset("digits", "train")
    x, y = data.batch(torch.arange(len(data)))
    assert x.dtype == torch.float32 and abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-2
    assert torch.equal(y, data.labels)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="cifar10.*digits"):
        backbones.load_dataset("imagenet22k")
    with pytest.raises(ValueError, match="train, val, test"):
        backbones.load_dataset("digits", "holdout")


def test_missing_torchvision_data_without_download_names_folder_and_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        backbones.load_dataset("cifar10", root=tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path) in message and "cifar-10-batches-py" in message and "--data-root" in message


def test_offline_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.SVHN, "download", offline)
    with pytest.raises(DatasetNotFoundError, match="could not be downloaded.*train_32x32.mat"):
        backbones.load_dataset("svhn", root=tmp_path, download=True)


def test_cifar_files_on_disk_are_read(tmp_path, monkeypatch):
    """Write a miniature CIFAR-10 in the official pickle layout and read it back."""
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (20, 3072), dtype=np.uint8), "labels": list(range(10)) * 2}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a: True)  # our files, not the md5s
    train = backbones.load_dataset("cifar10", "train", root=tmp_path, download=False)
    test = backbones.load_dataset("cifar10", "test", root=tmp_path, download=False)
    assert train.input_size == (3, 32, 32) and len(train) == 90 and len(test) == 20
    assert train.flip and train.num_classes == 10


def test_missing_image_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train/<class>/<image>"):
        backbones.load_dataset("imagefolder", root=tmp_path)


def test_random_shift_moves_content_without_a_loop():
    x = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    x[:, :, 4, 4] = 255
    shifted = random_shift(x, 2)
    assert shifted.shape == x.shape and shifted.dtype == x.dtype
    assert (shifted.flatten(1).sum(1) == 255).all()  # the dot moved by at most 2, never off the image
    positions = {tuple(torch.nonzero(s[0]).flatten().tolist()) for s in shifted}
    assert len(positions) > 5
    assert torch.equal(random_shift(x, 0), x)


def test_labels_beyond_the_classes_are_refused_with_the_fix():
    from backbones.data import ImageTensors

    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\), got \[0, 10\].*num_classes"):
        ImageTensors(images, torch.tensor([0, 3, 10, 2]), 10, (0.5,), (0.2,), "mine")


def write_npz(path, seed=0, n_train=200, n_test=60, size=8, channels_last=True, val=False):
    """A small .npz data set in the layout researchers pass around (x_train, y_train, x_test, y_test)."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if channels_last else (3, size, size)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "y_train": np.arange(n_train) % 4,
        "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "y_test": np.arange(n_test) % 4,
    }
    if val:
        arrays |= {"x_val": rng.integers(0, 256, (30, *shape), dtype=np.uint8), "y_val": np.arange(30) % 4}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def test_npz_loads_in_memory_with_validation_carved_from_train_and_train_statistics(tmp_path):
    arrays = write_npz(tmp_path / "a" / "data.npz")
    splits = {s: backbones.load_dataset("npz", s, root=tmp_path / "a") for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [180, 20, 60]
    assert splits["train"].input_size == (3, 8, 8) and splits["train"].num_classes == 4 and splits["train"].flip
    x_train = torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2)
    rows = {tuple(x.flatten().tolist()) for x in x_train}
    assert all(tuple(x.flatten().tolist()) in rows for x in splits["val"].images)  # validation: training images
    assert torch.equal(splits["test"].images, torch.from_numpy(arrays["x_test"]).permute(0, 3, 1, 2))
    mean = splits["train"].images.float().mean((0, 2, 3)) / 255  # statistics of the training split only
    assert splits["test"].mean == pytest.approx(tuple(mean.tolist()), abs=1e-5)
    # channels-first images and a validation split of its own are taken as they are
    write_npz(tmp_path / "b.npz", channels_last=False, val=True)
    assert len(backbones.load_dataset("npz", "val", root=tmp_path / "b.npz")) == 30
    assert len(backbones.load_dataset("npz", "train", root=tmp_path / "b.npz")) == 200


def test_npz_bad_input_is_named(tmp_path):
    np.savez(tmp_path / "f.npz", x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.zeros(4, int))
    with pytest.raises(ValueError, match="x_test"):
        backbones.load_dataset("npz", root=tmp_path / "f.npz")
    np.savez(tmp_path / "g.npz", x_train=np.zeros((4, 8, 8), np.float32), y_train=np.zeros(4, int), x_test=np.zeros(
        (2, 8, 8), np.uint8), y_test=np.zeros(2, int))  # fmt: skip
    with pytest.raises(ValueError, match="uint8"):
        backbones.load_dataset("npz", root=tmp_path / "g.npz")
    with pytest.raises(DatasetNotFoundError, match="--data-root"):
        backbones.load_dataset("npz", root=tmp_path / "missing")


def test_fingerprint_tells_data_of_the_same_shape_apart(tmp_path):
    write_npz(tmp_path / "a.npz", seed=0)
    write_npz(tmp_path / "a_copy.npz", seed=0)
    write_npz(tmp_path / "b.npz", seed=1)
    a, copy, b = (backbones.load_dataset("npz", "test", root=tmp_path / f) for f in ("a.npz", "a_copy.npz", "b.npz"))
    assert a.fingerprint == copy.fingerprint != b.fingerprint
    assert a.to("cpu").fingerprint == a.fingerprint
    digits = backbones.load_dataset("digits", "test")
    assert digits.fingerprint == backbones.load_dataset("digits", "test").fingerprint


def write_image_folder(root, splits=("train", "test"), n=12, size=10, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_small_image_folder_loads_into_memory_with_its_own_validation_split(tmp_path):
    write_image_folder(tmp_path / "own")
    train, val, test = (
        backbones.load_dataset("imagefolder", s, root=tmp_path / "own") for s in ("train", "val", "test")
    )
    assert isinstance(train, backbones.ImageTensors) and train.input_size == (3, 10, 10) and train.num_classes == 2
    assert (len(train), len(val), len(test)) == (22, 2, 24)  # val: 10% of train/, never test/
    from PIL import Image

    first = np.array(Image.open(tmp_path / "own" / "test" / "cat" / "0.png"))
    assert torch.equal(test.images[0], torch.from_numpy(first).permute(2, 0, 1))
    assert backbones.load_dataset("imagefolder", "test", root=tmp_path / "own", image_size=6).input_size == (3, 6, 6)
    # a val/ beside test/ is the validation split; ImageNet's train/ + val/ serve val/ as the test split
    write_image_folder(tmp_path / "three", splits=("train", "val", "test"), n=5)
    assert len(backbones.load_dataset("imagefolder", "val", root=tmp_path / "three")) == 10
    write_image_folder(tmp_path / "imagenet", splits=("train", "val"), n=10)
    assert len(backbones.load_dataset("imagefolder", "test", root=tmp_path / "imagenet")) == 20
    assert len(backbones.load_dataset("imagefolder", "val", root=tmp_path / "imagenet")) == 2


def test_image_folder_of_mixed_sizes_asks_for_image_size(tmp_path):
    from PIL import Image

    write_image_folder(tmp_path / "mixed", n=3)
    Image.fromarray(np.zeros((12, 9, 3), np.uint8)).save(tmp_path / "mixed" / "train" / "dog" / "odd.png")
    with pytest.raises(ValueError, match="--image-size"):
        backbones.load_dataset("imagefolder", root=tmp_path / "mixed")
    assert backbones.load_dataset("imagefolder", root=tmp_path / "mixed", image_size=8).input_size == (3, 8, 8)


def test_large_image_folder_streams_with_validation_from_train(tmp_path, monkeypatch):
    import backbones.batching
    import backbones.loaders as data_mod

    write_image_folder(tmp_path / "big", n=10)
    monkeypatch.setattr(data_mod, "IN_MEMORY_SIDE", 4)  # these 10-pixel images count as large
    train, val, test = (backbones.load_dataset("imagefolder", s, root=tmp_path / "big", image_size=8) for s in
                        ("train", "val", "test"))  # fmt: skip
    assert isinstance(train, backbones.FolderImages) and (len(train), len(val), len(test)) == (18, 2, 20)
    assert len({train.fingerprint, val.fingerprint, test.fingerprint}) == 3
    assert backbones.batching.loader_workers(10_000) <= (os.cpu_count() or 1)


def test_normalisation_and_fingerprint_do_not_depend_on_the_thread_count():
    """The bug: cluttered_digits' mean was a float32 sum whose rounding depends on how many threads
    share it (0.13163937 at 1 thread, 0.13163939 at 2); the fingerprint holds it, so a backbone cached
    by a 2-thread run was retrained under OMP_NUM_THREADS=1. Statistics come from exact integer sums."""
    from backbones.loaders import _channel_stats, _digits_upscaled

    images = torch.randint(0, 256, (12_000, 1, 24, 24), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    threads = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2):
            torch.set_num_threads(n)
            _digits_upscaled.cache_clear()  # read again, under n threads
            got.append((_channel_stats(images), backbones.load_dataset("digits", "train").fingerprint))
    finally:
        torch.set_num_threads(threads)
    assert got[0] == got[1]
    x = images.numpy().astype(np.float64) / 255.0
    (mean,), (std,) = got[0][0]
    assert mean == pytest.approx(x.mean(), rel=1e-12) and std == pytest.approx(x.std(), rel=1e-9)
