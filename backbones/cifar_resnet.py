"""CIFAR-style ResNet-(6n+2) with BasicBlocks (He et al. 2016), as SkipNet uses them.

Three stages of ``16w / 32w / 64w`` channels at full, half and quarter resolution, ``n`` blocks
each. Downsampling blocks use a 1x1 projection shortcut with BatchNorm (SkipNet's recipe), so a
skipped downsampling block still applies its projection.
"""

from __future__ import annotations

from torch import Tensor, nn

from backbones.base import Backbone
from backbones.registry import register_depths

CIFAR_DEPTHS = (20, 38, 56, 74, 110, 152)


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``; skipped, the block is ``shortcut(x)``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def cifar_resnet(
    depth: int,
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    image_size: int = 32,
) -> Backbone:
    """ResNet-``depth`` for small images; ``depth = 6n + 2``.

    Args:
        depth: 20, 38, 56, 74, 110, 152, or any other ``6n + 2``.
        num_classes: classifier width.
        in_channels: image channels (3 for CIFAR/SVHN, 1 for MNIST/digits).
        width: channel multiplier on 16/32/64.
        image_size: square input side the network is profiled for.
    """
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (e.g. {CIFAR_DEPTHS}), got {depth}")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    n = (depth - 2) // 6
    channels = [max(1, round(c * width)) for c in (16, 32, 64)]
    stem = nn.Sequential(
        nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True)
    )
    blocks: list[nn.Module] = []
    c_in = channels[0]
    for stage, c_out in enumerate(channels):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(BasicBlock(c_in, c_out, stride))
            c_in = c_out
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))
    backbone = Backbone(
        stem,
        blocks,
        head,
        num_classes=num_classes,
        input_size=(in_channels, image_size, image_size),
        arch=f"cifar_resnet{depth}",
        arch_kwargs={"in_channels": in_channels, "width": width, "image_size": image_size},
    )
    _init_weights(backbone)
    return backbone


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    # Zero-init the last BN of each residual branch: every block starts as its shortcut.
    for m in model.modules():
        if isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)


register_depths("cifar_resnet", cifar_resnet, CIFAR_DEPTHS, "CIFAR ResNet-{depth} with BasicBlocks.")
