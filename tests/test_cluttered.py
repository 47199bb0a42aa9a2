import hashlib

import numpy as np
import pytest
import torch

import backbones
from backbones.cache import cache_dir
from backbones.cluttered import SPLIT_SEEDS, SPLIT_SIZES, ClutterConfig, _source_digits, cluttered_sources, render


@pytest.fixture(scope="module")
def rendered_once(tmp_path_factory):
    return tmp_path_factory.mktemp("cluttered-cache")


@pytest.fixture(autouse=True)
def _one_cache_for_the_module(rendered_once, monkeypatch):
    """The registered splits rendered once for the module (each test's own cache would render them again)."""
    monkeypatch.setenv("SKIPNET_CACHE", str(rendered_once))


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_other_images():
    sources, labels = _source_digits("train")
    a, la, _ = render(sources, labels, 200, seed=7)
    b, lb, _ = render(sources, labels, 200, seed=7)
    c, _, _ = render(sources, labels, 200, seed=8)
    assert _digest(a) == _digest(b) and torch.equal(la, lb)
    assert _digest(a) != _digest(c)
    assert a.dtype == torch.uint8 and a.shape == (200, 1, 24, 24)


def test_difficulty_factors_vary_from_image_to_image():
    sources, labels = _source_digits("val")
    cfg = ClutterConfig()
    images, _, factors = render(sources, labels, 500, seed=0, cfg=cfg)
    lo, hi = cfg.digit_size
    assert lo <= factors["digit_size"].min() and factors["digit_size"].max() <= hi
    assert factors["digit_size"].std() > 2.0 and factors["contrast"].std() > 0.1
    assert set(factors["fragments"].tolist()) == set(range(cfg.max_fragments + 1))
    # clutter adds lit pixels: images with many fragments are brighter on average than clean ones
    lit = (images.float() > 60).flatten(1).float().mean(1)
    many, none = factors["fragments"] >= 5, factors["fragments"] == 0
    assert lit[many].mean() > lit[none].mean()


def test_registered_splits_are_large_cached_and_disjoint_in_source_digits():
    test = backbones.load_dataset("cluttered_digits", "test")
    assert len(test) == SPLIT_SIZES["test"] >= 5000 and SPLIT_SIZES["train"] >= 10_000
    assert test.input_size == (1, 24, 24) and test.num_classes == 10
    assert np.bincount(test.labels.numpy(), minlength=10).min() > 300  # every class well represented
    cached = list((cache_dir() / "datasets").glob("cluttered_digits-*-test5000.pt"))
    assert len(cached) == 1
    again = backbones.load_dataset("cluttered_digits", "test")
    assert torch.equal(again.images, test.images)
    assert test.mean == backbones.load_dataset("cluttered_digits", "val").mean  # the training split's statistics
    train_sources = {tuple(x.flatten().tolist()) for x in _source_digits("train")[0]}
    test_sources = [tuple(x.flatten().tolist()) for x in _source_digits("test")[0]]
    assert sum(s in train_sources for s in test_sources) < 5  # a few duplicate digits exist in the source data


def test_every_image_names_the_source_digit_it_renders():
    """The embedded test split is renderings of a few hundred source digits: the data says which, so
    intervals can resample digits (the independent unit), not images."""
    sources, labels = _source_digits("val")
    _, _, factors = render(sources, labels, SPLIT_SIZES["val"], SPLIT_SEEDS["val"])
    assert torch.equal(cluttered_sources("val"), factors["source"])  # replayed without rendering
    test = backbones.load_dataset("cluttered_digits", "test")
    assert test.groups is not None and torch.equal(test.labels, _source_digits("test")[1][test.groups])
    assert len(torch.unique(test.groups)) < len(test) / 10  # 5,000 renderings of a few hundred digits
    assert torch.equal(backbones.load_dataset("cluttered_digits", "val").groups, factors["source"])


def test_the_hard_rendering_is_its_own_data_set_beside_the_default():
    """``cluttered_digits_hard``: the same source digits, smaller and fainter among more clutter, cached
    under its own name (the default's files are not replaced)."""
    from backbones.cache import cache_dir

    easy, hard = (backbones.load_dataset(name, "val") for name in ("cluttered_digits", "cluttered_digits_hard"))
    assert hard.name == "cluttered_digits_hard" and len(hard) == len(easy) and hard.input_size == easy.input_size
    assert torch.equal(hard.groups, easy.groups) and torch.equal(hard.labels, easy.labels)  # the same draw of digits
    assert hard.images.float().mean() < easy.images.float().mean()  # fainter digits, smaller: less ink
    names = {p.name for p in (cache_dir() / "datasets").glob("*-val*.pt")}
    assert {"cluttered_digits-v1-24px-val5000.pt", "cluttered_digits_hard-v1-24px-val5000.pt"} <= names


def test_generating_a_rendering_logs_its_own_name(caplog):
    """The hard rendering's generation says ``cluttered_digits_hard``, not the default's name."""
    import logging

    from backbones.cluttered import RENDERINGS, cluttered_split

    with caplog.at_level(logging.INFO, logger="backbones.cluttered"):
        cluttered_split("val", RENDERINGS["cluttered_digits_hard"], use_cache=False, name="cluttered_digits_hard")
    assert "generating cluttered_digits_hard val (5000 images at 24px)" in caplog.text


def test_a_split_cached_at_another_size_is_not_reused(monkeypatch):
    """The cached file is keyed by the split's number of images: a validation split enlarged (2,000 to
    5,000) is generated anew, never read back from the smaller file (whose configuration is the same)."""
    import backbones.cluttered as cluttered

    monkeypatch.setitem(cluttered.SPLIT_SIZES, "val", 300)
    small, _ = cluttered.cluttered_split("val")
    monkeypatch.setitem(cluttered.SPLIT_SIZES, "val", 400)
    large, _ = cluttered.cluttered_split("val")
    assert len(small) == 300 and len(large) == 400
    sources, labels = cluttered._source_digits("val")
    assert torch.equal(cluttered.cluttered_sources("val"), cluttered.render(sources, labels, 400, 1)[2]["source"])
