"""Frozen residual backbones as ``stem / blocks / head``, their FLOPs, data sets and training.

``base`` (the contract, ``Backbone.enter``: stem and always-run blocks), ``registry`` and the
architectures, ``flops``; ``data`` (every data set as ``ImageTensors`` in memory or a streamed
``FolderImages``, their ``batches`` and fingerprints; ``splits``, ``cluttered``); ``train`` and
``pretrained`` (trained on first use, cached by everything that changes the weights, the data
included); ``checkpoint`` (atomic, ``weights_only``); ``device`` (device and seeding);
``options`` (a configuration option's rule and resumability declared on its field, and a tree of
configurations seen as one flat set of flags: every layer's configurations use it).
"""

from backbones import cifar_resnet as _cifar_resnet  # noqa: F401  (fills the registry)
from backbones import imagenet_resnet as _imagenet_resnet  # noqa: F401
from backbones.base import Backbone
from backbones.checkpoint import CheckpointMismatchError, load_backbone, save_backbone
from backbones.data import DatasetNotFoundError, FolderImages, ImageTensors, list_datasets, load_dataset
from backbones.flops import FlopsProfile
from backbones.registry import create, list_backbones, register

list = list_backbones  # noqa: A001  (``backbones.list()``, as timm's ``list_models``)

__all__ = [
    "Backbone",
    "CheckpointMismatchError",
    "DatasetNotFoundError",
    "FlopsProfile",
    "FolderImages",
    "ImageTensors",
    "create",
    "list",
    "list_backbones",
    "list_datasets",
    "load_backbone",
    "load_dataset",
    "register",
    "save_backbone",
]
