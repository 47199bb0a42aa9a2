"""Pictures of what a routing policy does: which test images take the shortest and the longest
paths (a gallery), and how often each class runs each block (a heatmap).

Each function returns a matplotlib ``Figure``: the runner saves it beside ``results.json`` and
hands the saved picture to TensorBoard (``SummaryWriter.add_image``).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def path_gallery(
    images: np.ndarray, blocks: np.ndarray, labels: np.ndarray, correct: np.ndarray, per_side: int = 16
) -> Figure:
    """The ``per_side`` test images that run the fewest gated blocks (top rows) and the most
    (bottom rows), each titled with its label, its block count, and an x where it was misclassified.

    Args:
        images: ``(n, C, H, W)`` uint8, in the evaluation's order.
        blocks: ``(n,)`` gated blocks run per image.
        labels: ``(n,)``.
        correct: ``(n,)`` bool.
    """
    order = np.argsort(blocks, kind="stable")
    groups = (order[:per_side], order[::-1][:per_side])
    cols = min(per_side, 8)
    rows_per_group = -(-per_side // cols)
    # one image of tiles, each with a white band above it for its caption: one axes to draw, not 2 x per_side
    _, channels, h, w = images.shape
    band, gap = max(h // 2, 4), max(w // 8, 1)
    tile_h, tile_w = band + h, w + gap
    canvas = np.full((2 * rows_per_group * tile_h, cols * tile_w, channels), 255, dtype=np.uint8)
    fig, ax = plt.subplots(figsize=(1.3 * cols, 1.55 * 2 * rows_per_group))
    for g, idx in enumerate(groups):
        for j, i in enumerate(idx):
            top, left = (g * rows_per_group + j // cols) * tile_h + band, (j % cols) * tile_w
            canvas[top : top + h, left : left + w] = images[i].transpose(1, 2, 0)
            caption = f"{labels[i]} | {int(blocks[i])}" + ("" if correct[i] else " x")
            ax.text(left + w / 2, top - 1, caption, fontsize=7, ha="center", va="bottom")
    ax.imshow(canvas[..., 0] if channels == 1 else canvas, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    fig.suptitle(
        f"top {rows_per_group} row(s): fewest blocks; bottom {rows_per_group}: most blocks\n"
        "label | gated blocks run (x: misclassified)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def class_block_heatmap(executed: np.ndarray, labels: np.ndarray, num_classes: int) -> Figure:
    """Execute rate of each gated block (columns) for the test images of each class (rows).

    Args:
        executed: ``(n, N)`` bool, gated blocks run per image.
        labels: ``(n,)``.
    """
    n_gates = executed.shape[1]
    rates = np.full((num_classes, n_gates), np.nan)
    for c in range(num_classes):  # a loop over classes, each a vectorised mean over its images
        mask = labels == c
        if mask.any():
            rates[c] = executed[mask].mean(axis=0)
    fig, ax = plt.subplots(figsize=(0.35 * n_gates + 2, 0.3 * num_classes + 1.5))
    im = ax.imshow(rates, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xlabel("gated block")
    ax.set_ylabel("class")
    ax.set_xticks(range(n_gates))
    ax.set_yticks(range(num_classes))
    ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=ax, label="execute rate")
    fig.tight_layout()
    return fig
