import dataclasses
from pathlib import Path

import pytest
import torch

import backbones
import backbones.train as train_mod
from backbones.checkpoint import safe_load
from backbones.train import TrainConfig, train
from tests.conftest import call_entry_point
from tests.test_data import write_npz

TINY = {"arch": "cifar_resnet20", "dataset": "digits", "width": 0.25, "batch_size": 256, "progress": False}


def test_trains_writes_metadata_and_reuses_a_finished_run(tmp_path):
    cfg = TrainConfig(**TINY, epochs=2, out=str(tmp_path / "b.pt"), log_dir=str(tmp_path / "runs"))
    net, meta = train(cfg)
    assert meta["complete"] and meta["arch"] == "cifar_resnet20" and meta["dataset"] == "digits"
    assert meta["num_classes"] == 10 and meta["input_size"] == [1, 16, 16]
    assert 0.0 <= meta["test_accuracy"] <= 1.0 and "torch" in meta["versions"]
    assert any((tmp_path / "runs").rglob("events.out.tfevents.*"))
    stamp = Path(cfg.out).stat().st_mtime_ns
    again, _ = train(cfg)
    assert Path(cfg.out).stat().st_mtime_ns == stamp
    assert torch.equal(again.head[2].weight, net.head[2].weight)


def test_resumes_after_an_interruption(tmp_path, monkeypatch):
    cfg = TrainConfig(**TINY, epochs=3, out=str(tmp_path / "b.pt"), log_dir=str(tmp_path / "runs"))
    real_evaluate = train_mod.full_accuracy
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second epoch's validation: the process "dies"
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_mod, "full_accuracy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    state = safe_load(cfg.out)
    assert state["epoch"] == 1 and not state["metadata"]["complete"]
    monkeypatch.setattr(train_mod, "full_accuracy", real_evaluate)
    _, meta = train(cfg)
    assert meta["complete"] and safe_load(cfg.out)["epoch"] == 3


def test_checkpoint_of_another_setup_is_refused(tmp_path):
    train(TrainConfig(**TINY, epochs=1, out=str(tmp_path / "b.pt"), log_dir=str(tmp_path / "runs")))
    other = {**TINY, "width": 0.5}
    with pytest.raises(ValueError, match="arch_kwargs"):
        train(TrainConfig(**other, epochs=1, out=str(tmp_path / "b.pt"), log_dir=str(tmp_path / "runs")))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "b.pt"
    train(TrainConfig(**TINY, epochs=1, out=str(out), log_dir=str(tmp_path / "runs")))
    good = out.read_bytes()
    bad = TrainConfig(**TINY, epochs=2, lr=1e30, out=str(tmp_path / "nan.pt"), log_dir=str(tmp_path / "runs"))
    with pytest.raises(FloatingPointError, match="lower --lr"):
        train(bad)
    assert out.read_bytes() == good


def test_command_line_entry_point(tmp_path):
    out = tmp_path / "cli.pt"
    args = ["--arch", "cifar_resnet20", "--dataset", "digits", "--width", "0.25", "--epochs", "1", "--out", str(out)]
    result = call_entry_point("train_backbone.py", [*args, "--log-dir", str(tmp_path / "runs"), "--no-progress"])
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout and out.is_file()
    help_text = call_entry_point("train_backbone.py", ["--help"]).stdout
    assert "stochastic depth" in help_text  # field docstrings become the help


def test_a_backbone_asked_for_without_an_image_size_is_the_one_the_envs_use(monkeypatch):
    """get_trained(arch, dataset) and the envs (which pass the data set's size) share one cache entry."""
    import backbones.pretrained as pretrained

    paths = []
    monkeypatch.setattr(pretrained, "train", lambda cfg, splits: paths.append(cfg.out) or (None, {}))
    pretrained.get_trained("cifar_resnet20", "digits")
    size = backbones.load_dataset("digits", "train").input_size[1]
    pretrained.get_trained("cifar_resnet20", "digits", image_size=size)
    assert paths[0] == paths[1]


def test_two_data_roots_of_one_format_never_share_a_backbone(tmp_path, caplog):
    """The cache trains anew for other data; a checkpoint made on other data is refused, naming why."""
    from backbones.checkpoint import CheckpointMismatchError, load_backbone
    from backbones.data import data_fingerprint
    from backbones.pretrained import get_trained

    write_npz(tmp_path / "A" / "data.npz", seed=0)
    write_npz(tmp_path / "B" / "data.npz", seed=1)
    tiny = {"width": 0.25, "epochs": 1, "progress": False, "device": "cpu"}
    _, meta_a = get_trained("cifar_resnet20", "npz", data_root=str(tmp_path / "A"), **tiny)
    _, meta_b = get_trained("cifar_resnet20", "npz", data_root=str(tmp_path / "B"), **tiny)
    assert meta_a["data_fingerprint"] != meta_b["data_fingerprint"]
    cached = sorted((tmp_path / "cache" / "backbones").glob("*.pt"))
    assert len(cached) == 2  # B was trained, not A's backbone reused
    cfg_b = TrainConfig(arch="cifar_resnet20", dataset="npz", data_root=str(tmp_path / "B"), **tiny)
    splits_b = backbones.data.load_splits("npz", cfg_b.data_root)
    with pytest.raises(CheckpointMismatchError, match="data_fingerprint.*other data"):
        load_backbone(cached[0] if safe_load(cached[0])["metadata"] == meta_a else cached[1],
                      data_fingerprint=data_fingerprint(splits_b.values()))  # fmt: skip
    out_a = tmp_path / "a.pt"
    train(TrainConfig(arch="cifar_resnet20", dataset="npz", data_root=str(tmp_path / "A"), out=str(out_a), **tiny))
    with pytest.raises(CheckpointMismatchError, match="data_fingerprint"):  # resuming or reusing A's run on B
        train(dataclasses.replace(cfg_b, out=str(out_a)))


def test_accumulated_micro_batches_take_the_steps_of_whole_batches(tmp_path):
    """--accumulate K: K micro-batches whose gradients add up to the batch's (a ViT: LayerNorm, no
    BatchNorm statistics to differ), so the weights are the whole batches' to float rounding."""
    from backbones.data import ImageTensors

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (70, 1, 12, 12), dtype=torch.uint8, generator=g)
    data = ImageTensors(images, torch.randint(0, 10, (70,), generator=g), 10, (0.5,), (0.25,), "tiny")
    splits = {"train": data, "val": data, "test": data}
    weights = {}
    for k in (1, 3):
        cfg = TrainConfig(
            arch="timm:vit_tiny_patch16_224", dataset="tiny", epochs=2, batch_size=32, shift=0, flip=False,
            drop_rate=0.0, accumulate=k, model_args=("depth=2", "embed_dim=16", "num_heads=2"),
            out=str(tmp_path / f"{k}.pt"), log_dir=str(tmp_path / "tb"), progress=False, device="cpu", precision="fp32",
        )  # fmt: skip
        net, _ = train(cfg, splits)
        weights[k] = net.state_dict()
    for name, value in weights[1].items():
        torch.testing.assert_close(weights[3][name], value, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="--accumulate must be an integer >= 1"):
        TrainConfig(accumulate=0)


def test_bf16_training_autocasts_the_forward_and_keeps_fp32_weights(tmp_path):
    """--precision bf16: the forward under bf16 autocast (other weights than fp32's), the weights,
    checkpoint and network handed on in fp32; the checkpoint says what it trained in; an unknown
    precision is refused by name."""
    nets = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(
            **TINY, epochs=1, precision=precision, out=str(tmp_path / f"{precision}.pt"), log_dir=str(tmp_path / "tb")
        )
        nets[precision], meta = train(cfg)
        assert meta["train_config"]["precision"] == precision
    assert all(p.dtype == torch.float32 for p in nets["bf16"].parameters())
    assert not torch.equal(nets["bf16"].head[2].weight, nets["fp32"].head[2].weight)
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16, got 'fp16'"):
        TrainConfig(precision="fp16")  # type: ignore[arg-type]
