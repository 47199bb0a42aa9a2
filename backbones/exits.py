"""Where an image that exits early is classified: at every gated block, a classifier of the activation
entering it.

A network whose head reads any depth (every gated block's input has the head's input shape: a vision
transformer, an isotropic network) classifies there with its own head (:class:`SharedHead`). A CNN's
activations change shape from stage to stage, so it gets one small head per gated block
(:class:`ExitHeads`: the activation averaged over space, then a linear classifier, as the network's
own head is), fitted beside the trained backbone (:func:`fit_exit_heads`), which stays as it is.
:func:`exit_classifier` picks the right one for a backbone.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.base import FIRST_GATED, Backbone
from backbones.batching import batches
from backbones.data import Dataset
from backbones.flops import count_flops

# fitting the exit heads: passes over the training images' pooled activations, Adam's rate, mini-batch
EXIT_HEAD_EPOCHS = 30
EXIT_HEAD_LR = 1e-2
EXIT_HEAD_BATCH = 256


class SharedHead(nn.Module):
    """The network's own head at every gated block (for a network whose head reads any depth)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, h: Tensor, k: int) -> Tensor:
        """Logits ``(B, classes)`` of the activation ``h`` entering gated block ``k``."""
        return self.head(h)


class ExitHeads(nn.Module):
    """One classifier per gated block of a CNN: the activation entering block ``first_gated + k``,
    averaged over space, through a linear layer. ``shapes``: those activations' ``(C, H, W)``."""

    def __init__(self, shapes: list[tuple[int, int, int]], num_classes: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(c, num_classes) for c, _, _ in shapes)

    def pooled(self, h: Tensor) -> Tensor:
        return h.mean(dim=(2, 3), dtype=torch.float32)

    def forward(self, h: Tensor, k: int) -> Tensor:
        """Logits ``(B, classes)`` float32 of the activation ``h`` entering gated block ``k``."""
        return self.heads[k](self.pooled(h))

    def flops(self, shapes: list[tuple[int, int, int]]) -> list[int]:
        """FLOPs per image of each head (the framework's count, as every other part's)."""
        return [count_flops(partial(self.forward, k=k), torch.zeros(1, *shape))[0] for k, shape in enumerate(shapes)]


def reads_any_depth(backbone: Backbone, first_gated: int = FIRST_GATED) -> bool:
    """Whether ``backbone``'s head can classify the activation entering every gated block."""
    shapes = backbone.activation_shapes[first_gated:]
    return all(shape == shapes[-1] for shape in shapes)


def exit_shapes(backbone: Backbone, first_gated: int = FIRST_GATED) -> list[tuple[int, int, int]]:
    """The activations entering the gated blocks, ``(C, H, W)`` each."""
    return backbone.activation_shapes[first_gated:-1]


@torch.no_grad()
def pooled_activations(
    backbone: Backbone, data: Dataset, device: torch.device, batch: int
) -> tuple[list[Tensor], Tensor]:
    """For every gated block, the activation entering it averaged over space, ``(n, C)`` per block,
    every block run (the backbone in eval mode); and the labels ``(n,)``."""
    backbone = backbone.eval()
    per_block: list[list[Tensor]] = [[] for _ in exit_shapes(backbone)]
    labels = []
    for x, y in batches(data, batch, device, train=False):
        h = backbone.enter(x, FIRST_GATED)
        for k, block in enumerate(backbone.blocks[FIRST_GATED:]):
            per_block[k].append(h.mean(dim=(2, 3), dtype=torch.float32))
            h = block(h)
        labels.append(y)
    return [torch.cat(parts) for parts in per_block], torch.cat(labels)


def fit_exit_heads(
    backbone: Backbone,
    data: Dataset,
    device: torch.device,
    batch: int = 512,
    seed: int = 0,
    epochs: int = EXIT_HEAD_EPOCHS,
    lr: float = EXIT_HEAD_LR,
) -> ExitHeads:
    """:class:`ExitHeads` for ``backbone`` trained by cross-entropy on ``data`` (its training images)
    with every block run; the backbone itself is not changed. Deterministic given ``seed``."""
    features, labels = pooled_activations(backbone, data, device, batch)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = ExitHeads(exit_shapes(backbone), backbone.num_classes).to(device)
    optimizer = torch.optim.Adam(heads.parameters(), lr=lr)
    for _ in range(epochs):
        for index in torch.randperm(len(labels), generator=generator).split(EXIT_HEAD_BATCH):
            index = index.to(device)
            loss = sum(F.cross_entropy(head(f[index]), labels[index]) for head, f in zip(heads.heads, features))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]  # a sum of tensors
            optimizer.step()
    return heads.eval().requires_grad_(False)


def exit_classifier(backbone: Backbone, data: Dataset | None = None, device: torch.device | None = None,
                    batch: int = 512, seed: int = 0) -> nn.Module:  # fmt: skip
    """What classifies an exited image of ``backbone`` at gated block ``k`` (called ``(h, k)``): its
    own head where it reads any depth, else exit heads fitted on ``data`` (its training images)."""
    if reads_any_depth(backbone):
        return SharedHead(backbone.head)
    if data is None or device is None:
        raise ValueError(f"{backbone.arch}'s head cannot read every depth: its exit heads need training images")
    return fit_exit_heads(backbone, data, device, batch, seed)
