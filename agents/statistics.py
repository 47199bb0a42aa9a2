"""Statistics for claims about routing policies: intervals, paired differences, rank correlation,
how dynamic a policy is, and the area under an accuracy-vs-FLOPs curve.

Everything takes per-image numpy arrays (one entry per test image), so two agents evaluated on the
same test images can be compared image by image (paired), which is far tighter than comparing two
independent accuracies. Where images are not independent (renderings of one source digit), the
intervals resample the independent units instead (``groups``: a cluster bootstrap).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


def resampled_means(
    values: np.ndarray, groups: np.ndarray | None = None, seed: int = 0, resamples: int = RESAMPLES
) -> np.ndarray:
    """Bootstrap replicates of the mean of ``values`` ``(n,)`` or of each row of ``(P, n)``:
    ``(resamples,)`` or ``(resamples, P)``, every row resampled with the same draws (so rows stay paired).

    ``groups`` ``(n,)``: the independent unit each value belongs to (the source digit a rendered
    image was drawn from). The draws then resample groups with replacement, each taking all its
    values (a cluster bootstrap); the mean is over the values drawn. Without groups every value is
    its own group: the ordinary bootstrap over images. Values of one group are not independent
    samples (two renderings of one digit are right or wrong together more often than two digits),
    so resampling them one by one makes the interval too narrow.
    """
    values = np.asarray(values, dtype=np.float64)
    rows = values.reshape(-1, values.shape[-1])  # (P, n)
    n = rows.shape[1]
    if groups is None:
        codes, count = np.arange(n), n
    else:
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(f"groups must name one group per value: shape ({n},), got {groups.shape}")
        _, codes = np.unique(groups, return_inverse=True)
        count = int(codes.max()) + 1
    sums = np.stack([np.bincount(codes, weights=r, minlength=count) for r in rows], axis=1)  # (G, P)
    sizes = np.bincount(codes, minlength=count).astype(np.float64)  # (G,)
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, rows.shape[0]))
    for start in range(0, resamples, 250):  # in chunks: (250, G) draws at a time
        draw = rng.integers(0, count, size=(min(250, resamples - start), count))
        out[start : start + len(draw)] = sums[draw].sum(axis=1) / sizes[draw].sum(axis=1)[:, None]
    return out if values.ndim > 1 else out[:, 0]


def _interval(samples: np.ndarray) -> tuple[float, float]:
    low, high = np.quantile(samples, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return float(low), float(high)


def bootstrap_ci(
    values: np.ndarray, seed: int = 0, resamples: int = RESAMPLES, groups: np.ndarray | None = None
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values`` ``(n,)`` (e.g. per-image
    correctness: the interval of the accuracy); with ``groups``, a cluster bootstrap that resamples
    the groups (:func:`resampled_means`)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"need a 1-D array of at least 2 values, got shape {values.shape}")
    if np.all(values == values[0]):  # a constant sample: the bootstrap has no spread to show
        return float(values[0]), float(values[0])
    return _interval(resampled_means(values, groups, seed, resamples))


def paired_difference(
    a: np.ndarray, b: np.ndarray, seed: int = 0, groups: np.ndarray | None = None
) -> dict[str, float | list[float]]:
    """Mean of ``a - b`` over the same images, with its 95% bootstrap interval (over ``groups``
    where given: :func:`resampled_means`).

    Args:
        a, b: ``(n,)`` per-image values of two policies on the same test images, in the same order
            (e.g. 1.0 where the image was classified right).

    Returns:
        ``{"difference": mean(a - b), "ci95": [low, high]}``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values must be on the same images: shapes {a.shape} and {b.shape}")
    diff = a - b
    return {"difference": float(diff.mean()), "ci95": list(bootstrap_ci(diff, seed, groups=groups))}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of ``x`` and ``y`` ``(n,)`` (ties take average ranks); 0 when
    either is constant (no ordering to correlate)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    from scipy import stats  # here: importing it costs every command line most of a second

    return float(stats.spearmanr(x, y).statistic)


def dynamic_blocks(execute_rate: Sequence[float], low: float = 0.1, high: float = 0.9) -> int:
    """Number of gated blocks whose execute rate is strictly between ``low`` and ``high``: the
    blocks where the policy decides per image rather than always or never."""
    return int(sum(low < r < high for r in execute_rate))


def area_under_curve(flops: Sequence[float], accuracy: Sequence[float], lo: float, hi: float) -> float:
    """Mean accuracy over the FLOPs range ``[lo, hi]`` of the piecewise-linear curve through the
    points (sorted by FLOPs): the area under the curve divided by the range's width."""
    order = np.argsort(flops)
    x, y = np.asarray(flops, dtype=np.float64)[order], np.asarray(accuracy, dtype=np.float64)[order]
    if not (x[0] <= lo < hi <= x[-1]):
        raise ValueError(f"range [{lo}, {hi}] is not inside the curve's FLOPs range [{x[0]}, {x[-1]}]")
    grid = np.linspace(lo, hi, 201)
    return float(np.trapezoid(np.interp(grid, x, y), grid) / (hi - lo))


def common_range(curves: Sequence[Sequence[float]]) -> tuple[float, float] | None:
    """The FLOPs range every curve covers (largest minimum, smallest maximum), or ``None``."""
    lo = max(min(c) for c in curves)
    hi = min(max(c) for c in curves)
    return (lo, hi) if lo < hi else None


def curve_auc(
    flops: Sequence[float],
    correct: np.ndarray,
    lo: float,
    hi: float,
    seed: int = 0,
    resamples: int = 1000,
    groups: np.ndarray | None = None,
) -> dict[str, float | list[float] | np.ndarray]:
    """:func:`area_under_curve` of one agent's points, with a 95% bootstrap interval over test
    images (or over ``groups``: :func:`resampled_means`; every point resampled with the same draws,
    so the points stay paired).

    Args:
        flops: ``(P,)`` FLOPs fraction of each point.
        correct: ``(P, n)`` per-image correctness of each point (a mean over seeds is fine).

    Returns:
        ``{"auc": ..., "ci95": [low, high], "samples": (resamples,)}``; the samples, drawn with
        ``seed``, pair with another curve's drawn with the same seed and images (see
        :func:`auc_difference`).
    """
    correct = np.asarray(correct, dtype=np.float64)
    acc = resampled_means(correct, groups, seed, resamples)  # (resamples, P)
    samples = np.array([area_under_curve(flops, a, lo, hi) for a in acc])
    return {
        "auc": area_under_curve(flops, correct.mean(axis=1), lo, hi),
        "ci95": list(_interval(samples)),
        "samples": samples,
    }


def auc_difference(a: dict, b: dict) -> dict[str, float | list[float]]:
    """Difference of two :func:`curve_auc` results on the same test images and seed, with its
    paired 95% interval."""
    return {"difference": float(a["auc"] - b["auc"]), "ci95": list(_interval(a["samples"] - b["samples"]))}
