"""``cluttered_digits``: an embedded data set whose difficulty varies from image to image.

Built offline from scikit-learn's 8x8 handwritten digits, after the Cluttered MNIST design of the
spatial-transformer paper (Jaderberg et al. 2015): each image is one digit drawn at a random
scale, position and contrast on a larger canvas, among a random number of clutter fragments cut
from other digits, with random pixel noise. A large, high-contrast digit on a clean canvas is easy;
a small, faint digit among many fragments is hard, so a routing policy has something to adapt to.

Every image is rendered in one batched ``grid_sample`` call per layer (no loop over images) from a
seeded ``torch.Generator``: the same seed gives the same bytes. Each split draws its digits from
its own part of the source digits (the fixed split of ``digits``), so no test digit is seen in
training. The generated splits are cached under ``$SKIPNET_CACHE/datasets``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from backbones.cache import building, cache_dir
from backbones.checkpoint import atomic_save, safe_load
from backbones.splits import fixed_split

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the rendering changes: cached files of another version are not reused


@dataclass(frozen=True)
class ClutterConfig:
    """How a cluttered image is drawn (sizes in canvas pixels)."""

    canvas: int = 24
    """side of the square canvas"""
    digit_size: tuple[float, float] = (10.0, 22.0)
    """range of the digit's side"""
    contrast: tuple[float, float] = (0.4, 1.0)
    """range of the digit's peak brightness (1 = white)"""
    max_fragments: int = 6
    """clutter fragments per image are drawn uniformly from 0..max_fragments"""
    fragment_size: tuple[float, float] = (3.0, 6.0)
    """range of a fragment's side"""
    fragment_brightness: tuple[float, float] = (0.2, 0.8)
    """range of a fragment's peak brightness"""
    noise: tuple[float, float] = (0.0, 0.15)
    """range of the standard deviation of the Gaussian pixel noise"""


# ``cluttered_digits_hard``: smaller, fainter digits among more clutter and noise, where the default network
# scores about 75% against 94% (the harder second data set of issue 20: what the recipe does on harder data)
HARD = ClutterConfig(
    digit_size=(8.0, 18.0), contrast=(0.3, 0.95), max_fragments=8, fragment_brightness=(0.3, 0.9), noise=(0.03, 0.22)
)
RENDERINGS = {"cluttered_digits": ClutterConfig(), "cluttered_digits_hard": HARD}
"""the embedded renderings by data set name"""

# validation as large as test: paired differences between two runs are noise of renderings more than of source
# digits, so their intervals narrow with the number of images (2,000 gave +-0.27 points, 5,000 +-0.18; the
# validation split's 180 source digits are all the embedded set has)
SPLIT_SIZES = {"train": 12_000, "val": 5_000, "test": 5_000}
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def _place(sources: Tensor, index: Tensor, size: Tensor, x0: Tensor, y0: Tensor, canvas: int) -> Tensor:
    """Draw ``sources[index]`` ``(n, 1, h, w)`` in [0, 1] as squares of side ``size`` with top-left
    corner ``(x0, y0)`` on ``canvas``-pixel canvases: ``(n, 1, canvas, canvas)``, zero outside."""
    n = index.shape[0]
    scale = canvas / size  # canvas units per source unit
    cx = (x0 + size / 2) / canvas * 2 - 1  # the square's centre in normalised canvas coordinates
    cy = (y0 + size / 2) / canvas * 2 - 1
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 0, 2] = -cx * scale
    theta[:, 1, 1] = scale
    theta[:, 1, 2] = -cy * scale
    grid = F.affine_grid(theta, [n, 1, canvas, canvas], align_corners=False)  # (n, canvas, canvas, 2)
    return F.grid_sample(sources[index], grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def render(
    sources: Tensor, labels: Tensor, n: int, seed: int, cfg: ClutterConfig = ClutterConfig()
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``n`` cluttered images from source digits ``sources`` ``(M, 1, h, w)`` in [0, 1].

    Returns:
        images ``(n, 1, canvas, canvas)`` uint8, labels ``(n,)`` int64, and the drawn factors of
        each image (``source``: the index of its source digit; ``digit_size``, ``contrast``,
        ``fragments``, ``noise``), ``(n,)`` each.
    """
    g = torch.Generator().manual_seed(seed)
    s = cfg.canvas

    def uniform(lo_hi: tuple[float, float], size: int = n) -> Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(size, generator=g)

    m = sources.shape[0]
    index = _draw_sources(g, m, n)
    size = uniform(cfg.digit_size)
    x0 = torch.rand(n, generator=g) * (s - size)
    y0 = torch.rand(n, generator=g) * (s - size)
    contrast = uniform(cfg.contrast)
    image = _place(sources, index, size, x0, y0, s) * contrast[:, None, None, None]  # (n, 1, s, s)

    # clutter: fragments of other digits, each a random window of a randomly drawn digit
    fragments = torch.randint(0, cfg.max_fragments + 1, (n,), generator=g)
    coords = torch.arange(s, dtype=torch.float32) + 0.5  # pixel centres
    clutter = torch.zeros_like(image)
    for k in range(cfg.max_fragments):  # a loop over fragment layers, each batched over all images
        other = torch.randint(0, m, (n,), generator=g)
        other_size = uniform(cfg.digit_size)
        ox = torch.rand(n, generator=g) * (s - other_size)
        oy = torch.rand(n, generator=g) * (s - other_size)
        layer = _place(sources, other, other_size, ox, oy, s)  # (n, 1, s, s)
        side = uniform(cfg.fragment_size)
        wx = ox + torch.rand(n, generator=g) * (other_size - side).clamp(min=0)  # window inside the drawn digit
        wy = oy + torch.rand(n, generator=g) * (other_size - side).clamp(min=0)
        inside_x = (coords[None] >= wx[:, None]) & (coords[None] < (wx + side)[:, None])  # (n, s)
        inside_y = (coords[None] >= wy[:, None]) & (coords[None] < (wy + side)[:, None])  # (n, s)
        window = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]  # (n, 1, s, s)
        brightness = uniform(cfg.fragment_brightness)[:, None, None, None]
        active = (k < fragments)[:, None, None, None]
        clutter = torch.maximum(clutter, layer * window * brightness * active)

    noise = uniform(cfg.noise)
    canvas = torch.maximum(image, clutter) + noise[:, None, None, None] * torch.randn(n, 1, s, s, generator=g)
    images = (canvas.clamp(0, 1) * 255).round().to(torch.uint8)
    factors = {"source": index, "digit_size": size, "contrast": contrast, "fragments": fragments, "noise": noise}
    return images, labels[index].clone(), factors


def _draw_sources(g: torch.Generator, num_sources: int, n: int) -> Tensor:
    """The source digit of each of ``n`` images ``(n,)``: the first draw of a split's generator."""
    return torch.randint(0, num_sources, (n,), generator=g)


def cluttered_sources(split: str) -> Tensor:
    """``(N,)`` int64: the index of the source digit each image of ``split`` is a rendering of (the
    independent unit of the split: its 5,000 test images are renderings of a few hundred digits, so
    intervals resample digits, not images). Replays the split's first draw; no rendering."""
    num_sources = len(_source_digits(split)[1])
    return _draw_sources(torch.Generator().manual_seed(SPLIT_SEEDS[split]), num_sources, SPLIT_SIZES[split])


def _source_digits(split: str) -> tuple[Tensor, Tensor]:
    """The 8x8 digits of ``split`` (the same fixed split as the ``digits`` data set), in [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    idx = fixed_split(len(bunch.target), (0.1, 0.2), split)
    images = torch.from_numpy(bunch.images[idx].astype(np.float32) / 16.0)[:, None]  # (M, 1, 8, 8)
    return images, torch.from_numpy(bunch.target[idx].astype(np.int64))


def cluttered_split(
    split: str, cfg: ClutterConfig = ClutterConfig(), use_cache: bool = True, name: str = "cluttered_digits"
) -> tuple[Tensor, Tensor]:
    """Images ``(N, 1, canvas, canvas)`` uint8 and labels ``(N,)`` of ``split``, generated on first
    use and cached (the file name carries the rendering's name, the generator version, canvas, split
    and number of images; the file holds the whole configuration, and another one is generated anew)."""
    size = SPLIT_SIZES[split]
    path = cache_dir() / "datasets" / f"{name}-v{GENERATOR_VERSION}-{cfg.canvas}px-{split}{size}.pt"
    if not use_cache:
        return _generate(split, cfg, name)
    with building(path):  # a second process asking for the split waits for the first one's, then reads it
        if path.is_file():
            state = safe_load(path)
            if state.get("config") == _config_dict(cfg) and len(state["labels"]) == size:
                return state["images"], state["labels"]
        images, labels = _generate(split, cfg, name)
        atomic_save({"images": images, "labels": labels, "config": _config_dict(cfg)}, path)
    return images, labels


def _generate(split: str, cfg: ClutterConfig, name: str) -> tuple[Tensor, Tensor]:
    log.info("generating %s %s (%d images at %dpx)", name, split, SPLIT_SIZES[split], cfg.canvas)
    sources, labels = _source_digits(split)
    images, labels, _ = render(sources, labels, SPLIT_SIZES[split], SPLIT_SEEDS[split], cfg)
    return images, labels


def _config_dict(cfg: ClutterConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
