"""Shared fixtures: small backbones with non-trivial random weights and the bundled digits data."""

from __future__ import annotations

import pytest
import torch

import backbones
from backbones.base import Backbone, randomize_batchnorm
from backbones.data import ImageTensors


def randomize(backbone: Backbone, seed: int = 0) -> Backbone:
    """Random BatchNorm affine parameters and running statistics (no block close to the identity)."""
    return randomize_batchnorm(backbone, seed)  # type: ignore[return-value]


def tiny_backbone(depth: int = 20, seed: int = 0, num_classes: int = 10, in_channels: int = 1, image_size: int = 16):
    torch.manual_seed(seed)
    net = backbones.create(
        f"cifar_resnet{depth}", num_classes=num_classes, in_channels=in_channels, width=0.25, image_size=image_size
    )
    return randomize(net, seed)


@pytest.fixture(scope="session")
def digits_test() -> ImageTensors:
    return backbones.load_dataset("digits", "test")


@pytest.fixture
def tiny() -> Backbone:
    return tiny_backbone()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's backbone cache or ./runs from a test."""
    monkeypatch.setenv("SKIPNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
