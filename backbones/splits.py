"""Fixed train / validation / test splits, shared by every data set."""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "val", "test")
VAL_FRACTION = 0.1
"""The share of the training images carved out as the validation split, where a data set has none."""


def fixed_split(n: int, fractions: tuple[float, float], split: str, seed: int = 0) -> np.ndarray:
    """Indices of ``split`` in a fixed permutation: ``val`` and ``test`` take ``fractions`` of ``n``."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(n * fractions[0]), round(n * fractions[1])
    parts = {"val": perm[:n_val], "test": perm[n_val : n_val + n_test], "train": perm[n_val + n_test :]}
    return np.sort(parts[split])
