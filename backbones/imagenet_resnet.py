"""torchvision's ImageNet ResNets exposed as ``stem / blocks / head``.

``weights=`` passes through to torchvision (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ...), so a user
with internet gets the pretrained ImageNet weights; offline, a clear error says where torchvision
keeps its weight files.
"""

from __future__ import annotations

from torch import Tensor, nn

from backbones.base import Backbone
from backbones.registry import register_depths

IMAGENET_DEPTHS = (18, 34, 50, 101, 152)


class TorchvisionBlock(nn.Module):
    """A torchvision ``BasicBlock``/``Bottleneck`` with its ``downsample`` exposed as ``shortcut``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    @property
    def shortcut(self) -> nn.Module:
        downsample = self.block.downsample
        return downsample if isinstance(downsample, nn.Module) else _IDENTITY

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


_IDENTITY = nn.Identity()


def imagenet_resnet(depth: int, num_classes: int = 1000, weights: str | None = None, image_size: int = 224) -> Backbone:
    """torchvision ``resnet{depth}`` split into stem / blocks / head.

    Args:
        depth: 18, 34, 50, 101 or 152.
        num_classes: classifier width (pretrained weights need 1000).
        weights: torchvision weights name, e.g. ``"DEFAULT"``; ``None`` for random init.
        image_size: square input side the network is profiled for.
    """
    if depth not in IMAGENET_DEPTHS:
        raise ValueError(f"ImageNet ResNet depth must be one of {IMAGENET_DEPTHS}, got {depth}")
    import torchvision  # here, not at import: it costs a second every command line would pay

    builder = getattr(torchvision.models, f"resnet{depth}")
    try:
        net = builder(weights=weights, num_classes=num_classes)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        if weights is None:
            raise
        raise RuntimeError(
            f"could not load torchvision weights {weights!r} for resnet{depth}: {err}. Offline, put the "
            f"weight file in torchvision's cache ($TORCH_HOME/hub/checkpoints, default "
            f"~/.cache/torch/hub/checkpoints) or pass weights=None for a random initialisation."
        ) from err
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    blocks = [TorchvisionBlock(b) for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    head = nn.Sequential(net.avgpool, nn.Flatten(), net.fc)
    return Backbone(
        stem,
        blocks,
        head,
        num_classes=num_classes,
        input_size=(3, image_size, image_size),
        arch=f"imagenet_resnet{depth}",
        arch_kwargs={"image_size": image_size},
    )


register_depths(
    "imagenet_resnet", imagenet_resnet, IMAGENET_DEPTHS, "torchvision ResNet-{depth} as stem / blocks / head."
)
