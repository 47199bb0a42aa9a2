import numpy as np
import pytest

from agents.statistics import (
    area_under_curve,
    bootstrap_ci,
    common_range,
    dynamic_blocks,
    paired_difference,
    resampled_means,
    spearman,
)


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_images():
    rng = np.random.default_rng(0)
    small = (rng.random(400) < 0.9).astype(float)
    large = (rng.random(10_000) < 0.9).astype(float)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3  # width ~ 1/sqrt(n): 5x more images -> ~5x narrower
    # the binomial standard error at p = 0.9, n = 10,000 is 0.003: a 95% interval is about +-0.0059
    assert (hi_l - lo_l) == pytest.approx(2 * 1.96 * np.sqrt(0.9 * 0.1 / 10_000), rel=0.15)
    assert bootstrap_ci(np.ones(50)) == (1.0, 1.0)


def test_paired_difference_sees_what_unpaired_accuracies_cannot():
    rng = np.random.default_rng(1)
    hard = rng.random(5000) < 0.3  # images both policies find hard
    a = (~hard | (rng.random(5000) < 0.5)).astype(float)
    b = a.copy()
    flip = np.flatnonzero(a == 1)[:60]  # b loses 60 images that a gets right: 1.2 points
    b[flip] = 0.0
    d = paired_difference(a, b)
    assert d["difference"] == pytest.approx(0.012)
    assert 0 < d["ci95"][0] < 0.012 < d["ci95"][1]  # the paired interval excludes 0
    with pytest.raises(ValueError, match="same images"):
        paired_difference(a, b[:10])


def test_spearman_on_planted_rankings():
    x = np.arange(100, dtype=float)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    blocks = np.repeat([5, 10, 15], 10)  # ties: three groups of block counts
    difficulty = np.concatenate([np.full(10, 0.1), np.full(10, 0.5), np.full(10, 2.0)])
    assert spearman(blocks, difficulty) == pytest.approx(1.0)
    assert spearman(np.full(30, 7), difficulty) == 0.0  # a static policy has no ordering
    noise = np.random.default_rng(0).random(2000)
    assert abs(spearman(noise, np.random.default_rng(1).random(2000))) < 0.06


def test_dynamic_blocks_counts_rates_strictly_inside():
    assert dynamic_blocks([0.0, 1.0, 0.1, 0.9, 0.5, 0.11, 0.89]) == 3


def test_area_under_curve_over_a_common_range():
    assert area_under_curve([0.2, 0.6], [0.8, 0.8], 0.3, 0.5) == pytest.approx(0.8)
    assert area_under_curve([0.6, 0.2], [1.0, 0.6], 0.2, 0.6) == pytest.approx(0.8)  # linear: the midpoint
    assert common_range([[0.2, 0.5, 0.9], [0.3, 0.7]]) == (0.3, 0.7)
    assert common_range([[0.1, 0.2], [0.5, 0.7]]) is None
    with pytest.raises(ValueError, match="not inside"):
        area_under_curve([0.2, 0.6], [0.5, 0.6], 0.1, 0.5)


def test_a_cluster_bootstrap_resamples_the_independent_units():
    """5,000 renderings of 100 source digits, each digit right or wrong in all its renderings: the
    sample holds 100 independent outcomes, not 5,000. Resampling images gives an interval about
    sqrt(50) times too narrow; resampling digits gives the interval of 100 outcomes."""
    rng = np.random.default_rng(0)
    digit_right = rng.random(100) < 0.8
    groups = rng.integers(0, 100, 5000)
    correct = digit_right[groups].astype(float)
    lo_i, hi_i = bootstrap_ci(correct)
    lo_g, hi_g = bootstrap_ci(correct, groups=groups)
    assert lo_g < correct.mean() < hi_g
    assert (hi_g - lo_g) > 4 * (hi_i - lo_i)
    # about the binomial interval of 100 outcomes at p = 0.8: +-1.96 * 0.04
    assert (hi_g - lo_g) == pytest.approx(2 * 1.96 * np.sqrt(0.8 * 0.2 / 100), rel=0.25)
    # one group per image is the ordinary bootstrap over images, draw for draw
    np.testing.assert_array_equal(resampled_means(correct, np.arange(5000), 3), resampled_means(correct, None, 3))
    # paired: the difference's interval resamples digits too
    d_i = paired_difference(correct, np.roll(correct, 1))
    d_g = paired_difference(correct, np.roll(correct, 1), groups=groups)
    assert d_i["difference"] == d_g["difference"]
    assert d_g["ci95"][1] - d_g["ci95"][0] > d_i["ci95"][1] - d_i["ci95"][0]
    with pytest.raises(ValueError, match="one group per value"):
        bootstrap_ci(correct, groups=groups[:10])
