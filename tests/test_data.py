import urllib.error

import numpy as np
import pytest
import torch
import torchvision

import backbones
from backbones.data import DatasetNotFoundError, random_shift


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
