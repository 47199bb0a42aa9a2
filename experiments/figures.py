"""Pictures of what a routing policy does: which test images take the shortest and the longest
paths (a gallery), and how often each class runs each block (a heatmap).

Each function returns a matplotlib ``Figure``: the runner saves it beside ``results.json`` and
hands it to TensorBoard (``SummaryWriter.add_figure``).
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
    groups = (("fewest blocks", order[:per_side]), ("most blocks", order[::-1][:per_side]))
    cols = min(per_side, 8)
    rows_per_group = -(-per_side // cols)
    fig, axes = plt.subplots(2 * rows_per_group, cols, figsize=(1.3 * cols, 1.55 * 2 * rows_per_group))
    axes = np.atleast_2d(axes)
    for g, (_, idx) in enumerate(groups):
        for j in range(rows_per_group * cols):
            ax = axes[g * rows_per_group + j // cols, j % cols]
            ax.axis("off")
            if j >= len(idx):
                continue
            i = idx[j]
            img = images[i].transpose(1, 2, 0)
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            mark = "" if correct[i] else " x"
            ax.set_title(f"{labels[i]} | {int(blocks[i])}{mark}", fontsize=7)
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
