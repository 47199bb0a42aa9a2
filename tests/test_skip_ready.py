"""Joint SP: the skip-ready backbone, its checkpoint, its cache and its exact resume."""

import dataclasses

import pytest
import torch

import backbones
from agents.gates import create_gates
from agents.hybrid import Distillation
from agents.skip_ready import JointConfig, JointTrainer, get_skip_ready, joint_identity, load_gates
from backbones.checkpoint import fingerprint, load_backbone, safe_load
from tests.conftest import tiny_backbone


@pytest.fixture(scope="module")
def digits_train():
    return backbones.load_dataset("digits", "train")


def _trainer(net, data, path, epochs=2, **kw):
    torch.manual_seed(0)
    gates = create_gates("rnn", net)
    cfg = JointConfig(epochs=epochs, batch_size=64, **{"distill": 0.0, **kw})  # no teacher here
    return JointTrainer(
        net, gates, data, cfg, torch.device("cpu"), path, "digits", {"gates": {"kind": "rnn", "first_gated": 1}}, False,
        seed=3,
    )  # fmt: skip


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_joint_sp_trains_backbone_and_gates_and_writes_a_backbone_checkpoint(digits_train, tmp_path):
    net = tiny_backbone(20)
    before_net = _params(net)
    trainer = _trainer(net, digits_train, tmp_path / "ready.pt")
    before_gates = _params(trainer.gates)
    trained, gates = trainer.train()
    changed = [
        k for k, v in trained.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before_net[k])
    ]
    assert any("blocks.3" in k for k in changed) and any("running_mean" in k for k in changed)  # BN trains by default
    assert not torch.equal(gates.out.weight, before_gates["out.weight"])
    # an ordinary backbone checkpoint, saying how it was made, its gates beside it
    loaded, meta = load_backbone(tmp_path / "ready.pt", arch=trained.arch, dataset="digits")
    assert fingerprint(loaded) == fingerprint(trained)
    assert meta["complete"] and meta["skip_ready"]["joint_config"]["epochs"] == 2
    assert len(meta["skip_ready"]["history"]) == 2
    reloaded = load_gates(tmp_path / "ready.pt", loaded)
    x = torch.randn(4, 1, 16, 16)
    h = loaded.stem(x)
    torch.testing.assert_close(reloaded(h, 0)[0], gates(trained.stem(x), 0)[0])


def test_frozen_batchnorm_keeps_the_base_statistics(digits_train, tmp_path):
    net = tiny_backbone(20)
    means = {k: v.clone() for k, v in net.state_dict().items() if "running_mean" in k}
    trained, _ = _trainer(net, digits_train, tmp_path / "ready.pt", epochs=1, bn="frozen").train()
    assert all(torch.equal(trained.state_dict()[k], v) for k, v in means.items())


def test_accumulated_joint_sp_takes_the_steps_of_whole_batches(digits_train, tmp_path):
    """--joint-accumulate K: the weights of whole batches to float rounding, where nothing sees the
    micro-batches (BatchNorm frozen, compute priced by a fixed alpha), over 3 steps (over many, a
    hard gate near its threshold may flip on float rounding); with a budget the price still moves
    once a step, from the whole step's spending."""
    few = dataclasses.replace(digits_train, images=digits_train.images[:192], labels=digits_train.labels[:192],
                              groups=None, _fingerprint=None)  # fmt: skip
    weights = {}
    for k in (1, 3):
        trained, gates = _trainer(tiny_backbone(20), few, tmp_path / f"{k}.pt", 1, bn="frozen", budget=None,
                                  accumulate=k).train()  # fmt: skip
        weights[k] = {**_params(trained), **{f"gates.{n}": v for n, v in _params(gates).items()}}
    for name, value in weights[1].items():
        # up to 1e-5 apart on one thread (float order), where the 3 steps move the weights by up to 3
        torch.testing.assert_close(weights[3][name], value, rtol=1e-4, atol=5e-5, msg=name)
    assert any(not torch.equal(weights[3][n], v) for n, v in weights[1].items())  # micro-batches did run
    trainer = _trainer(tiny_backbone(20), few, tmp_path / "budget.pt", 1, accumulate=3)
    trainer.train()
    assert len(trainer.history) == 1 and float(trainer.price.value) != 2.0  # the price moved
    with pytest.raises(ValueError, match="--joint-accumulate must be an integer >= 1"):
        JointConfig(accumulate=0)


@pytest.mark.slow
@pytest.mark.parametrize("written", ["skeleton", "before_skeleton"])
def test_joint_sp_resumes_bit_for_bit(written, digits_train, tmp_path):
    """From its own checkpoint, and from one written before joint SP was on the trainers' skeleton
    (no ``stage`` and ``done_units`` in its metadata: the epoch is read from the state)."""
    whole, _ = _trainer(tiny_backbone(20), digits_train, tmp_path / "whole.pt", epochs=2).train()

    state_after_one = _one_epoch(_trainer(tiny_backbone(20), digits_train, tmp_path / "split.pt", epochs=2))
    assert state_after_one["epoch"] == 1 and not state_after_one["metadata"]["complete"]
    assert (state_after_one["metadata"]["stage"], state_after_one["metadata"]["done_units"]) == ("train", 1)
    if written == "before_skeleton":
        meta = {k: v for k, v in state_after_one["metadata"].items() if k not in ("stage", "done_units")}
        state_after_one = {**state_after_one, "metadata": meta}
    torch.manual_seed(1234)  # the process's RNG moved on: resume must restore it
    resumed = _trainer(tiny_backbone(20), digits_train, tmp_path / "split.pt", epochs=2)
    resumed.resume(state_after_one)
    net, gates = resumed.train()
    for k, v in whole.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k
    assert safe_load(tmp_path / "split.pt")["metadata"]["complete"]


def _one_epoch(trainer):
    """Run ``trainer`` until its first checkpoint is written, then stop as a killed run would."""

    class Stop(Exception):
        pass

    save = trainer.save

    def save_then_stop(**kwargs):
        save(**kwargs)
        raise Stop

    trainer.save = save_then_stop
    with pytest.raises(Stop):
        trainer.train()
    return safe_load(trainer.checkpoint)


def test_get_skip_ready_caches_by_base_and_settings(digits_train, tmp_path):
    base = tiny_backbone(20)
    meta = {"arch": base.arch, "dataset": "digits", "test_accuracy": 0.5}
    cfg = JointConfig(epochs=1, batch_size=64)
    options = {"hidden_size": 4, "embed_dim": 4}
    before = fingerprint(base)
    ready, ready_meta = get_skip_ready(
        base, meta, digits_train, cfg, "rnn", options, torch.device("cpu"), progress=False
    )
    assert fingerprint(base) == before  # the base network is not modified
    assert ready_meta["skip_ready"]["base_fingerprint"] == before
    again, again_meta = get_skip_ready(base, meta, digits_train, cfg, "rnn", options, torch.device("cpu"))
    assert again_meta["checkpoint"] == ready_meta["checkpoint"] and fingerprint(again) == fingerprint(ready)
    other, other_meta = get_skip_ready(
        base, meta, digits_train, JointConfig(epochs=1, batch_size=64, alpha=0.5), "rnn", options, torch.device("cpu")
    )
    assert other_meta["checkpoint"] != ready_meta["checkpoint"]
    # trained under bf16 autocast: another network, another entry, and its metadata says so
    mixed, mixed_meta = get_skip_ready(
        base, meta, digits_train, cfg, "rnn", options, torch.device("cpu"), progress=False, precision="bf16"
    )
    assert mixed_meta["checkpoint"] != ready_meta["checkpoint"] and fingerprint(mixed) != fingerprint(ready)
    assert mixed_meta["skip_ready"]["precision"] == "bf16" and ready_meta["skip_ready"]["precision"] == "fp32"


def test_joint_config_refuses_bad_values():
    with pytest.raises(ValueError, match="--joint-bn must be"):
        JointConfig(bn="running")
    with pytest.raises(ValueError, match="--joint-epochs must be an integer >= 1"):
        JointConfig(epochs=0)


def test_a_cache_entry_is_built_by_one_process_at_a_time(tmp_path):
    """Two runs that want the same backbone: the second waits for the first, then reuses its file
    (two trainings into one file once mixed their epochs)."""
    import threading
    import time

    from backbones.cache import building

    events = []

    def build(name):
        with building(tmp_path / "entry.pt"):
            events.append(f"{name} in")
            time.sleep(0.2)
            events.append(f"{name} out")

    first = threading.Thread(target=build, args=("a",))
    first.start()
    time.sleep(0.05)
    build("b")
    first.join()
    assert events == ["a in", "a out", "b in", "b out"]


def test_a_skip_ready_backbone_carries_its_data_fingerprint_where_load_backbone_checks_it(digits_train):
    """Made from a base network of known data, the skip-ready checkpoint records that data's
    fingerprint at the top of its metadata: loaded for other data it is refused."""
    from backbones.checkpoint import CheckpointMismatchError, load_backbone

    base = tiny_backbone(20)
    meta = {"arch": base.arch, "dataset": "digits", "data_fingerprint": "abc"}
    _, ready_meta = get_skip_ready(
        base, meta, digits_train, JointConfig(epochs=1, batch_size=64), "rnn", {"hidden_size": 4, "embed_dim": 4},
        torch.device("cpu"), progress=False,
    )  # fmt: skip
    assert ready_meta["data_fingerprint"] == "abc"
    load_backbone(ready_meta["checkpoint"], data_fingerprint="abc")
    with pytest.raises(CheckpointMismatchError, match="data_fingerprint"):
        load_backbone(ready_meta["checkpoint"], data_fingerprint="other")


def test_joint_sp_stops_on_divergence_with_the_trainers_guard(digits_train, tmp_path):
    """Joint SP uses the trainers' one divergence guard (it had its own, for NaN losses only): a
    runaway stops the stage before any checkpoint holds it, the message naming the flag to lower."""
    trainer = _trainer(tiny_backbone(20), digits_train, tmp_path / "ready.pt", epochs=1, lr=1e6)
    with pytest.raises(FloatingPointError, match=r"joint SP \(epoch 1; lower --joint-lr\).*No checkpoint was written"):
        trainer.train()
    assert not (tmp_path / "ready.pt").exists()


def test_distillation_mixes_cross_entropy_with_the_teachers_softened_labels():
    torch.manual_seed(0)
    teacher = tiny_backbone(20).eval()
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    logits = torch.randn(8, 10, requires_grad=True)
    t = 3.0
    loss = Distillation(teacher, 0.25, t).loss(x, logits, y)
    with torch.no_grad():
        p_teacher = torch.softmax(teacher(x) / t, dim=1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(logits / t, dim=1))).sum(1).mean()
    want = 0.75 * torch.nn.functional.cross_entropy(logits, y) + 0.25 * t**2 * kl
    torch.testing.assert_close(loss, want)
    loss.backward()  # the routed network's logits get the gradient, the teacher none
    assert logits.grad is not None and all(p.grad is None for p in teacher.parameters())


def test_joint_sp_distils_the_base_network_and_names_it_in_the_cache_key(digits_train, tmp_path):
    base = tiny_backbone(20)
    plain, taught = JointConfig(epochs=1, batch_size=64, distill=0.0), JointConfig(epochs=1, batch_size=64)
    # off, the cache names of the stages made before the option existed stay; on (the default), it names them
    assert "distill" not in joint_identity(plain, 0) and "distill_temperature" not in joint_identity(plain, 0)
    assert joint_identity(taught, 0)["distill"] == 0.5 and joint_identity(taught, 0)["distill_temperature"] == 4.0
    meta = {"arch": base.arch, "dataset": "digits"}
    options = {"hidden_size": 4, "embed_dim": 4}
    ready, ready_meta = get_skip_ready(base, meta, digits_train, plain, "rnn", options, torch.device("cpu"))
    other, other_meta = get_skip_ready(base, meta, digits_train, taught, "rnn", options, torch.device("cpu"))
    assert other_meta["checkpoint"] != ready_meta["checkpoint"] and fingerprint(other) != fingerprint(ready)
    assert other_meta["skip_ready"]["joint_config"]["distill"] == 0.5
    with pytest.raises(ValueError, match="teacher"):
        _trainer(tiny_backbone(20), digits_train, tmp_path / "x.pt", distill=0.5)


def test_joint_sp_rate_defaults_by_data_set():
    """--joint-lr left out: 0.06 on the embedded sets (validation chose it over 0.02 where the base network
    trains at SGD 0.6), 0.02 elsewhere; given, it is kept; either way the key names the rate it trains at."""
    assert JointConfig().resolved(12_000, "cluttered_digits").lr == 0.06
    assert JointConfig().resolved(12_000, "cluttered_digits_hard").lr == 0.06
    assert JointConfig().resolved(12_000, "cifar10").lr == 0.02
    assert JointConfig(lr=0.03).resolved(12_000, "cluttered_digits").lr == 0.03


def test_joint_sp_trains_a_vision_transformer_as_its_base_trainer_does(digits_train, tmp_path):
    """--joint-optimizer auto: AdamW (3e-3, decoupled decay 0.05) for a ViT, whose base trains with AdamW; SGD
    for a CNN. The key names the optimizer only where it is not SGD, so that SGD stages keep the names they had."""
    from agents.skip_ready import ADAMW_LR, ADAMW_WEIGHT_DECAY

    vit_name = "timm:vit_tiny_patch16_224"
    vit = JointConfig().resolved(12_000, "cluttered_digits", vit_name)
    assert (vit.optimizer, vit.lr, vit.weight_decay) == ("adamw", ADAMW_LR, ADAMW_WEIGHT_DECAY)
    cnn = JointConfig().resolved(12_000, "cluttered_digits", "cifar_resnet38")
    assert (cnn.optimizer, cnn.lr, cnn.weight_decay) == ("sgd", 0.06, 5e-4)
    told = JointConfig(optimizer="sgd", weight_decay=1e-3).resolved(12_000, "cluttered_digits", vit_name)
    assert (told.optimizer, told.lr, told.weight_decay) == ("sgd", 0.02, 1e-3)  # 0.06 is a CNN's (a ViT lost it all)
    assert "optimizer" not in joint_identity(cnn, 0) and joint_identity(vit, 0)["optimizer"] == "adamw"
    net = backbones.zoo.zoo_backbone(
        vit_name, num_classes=10, in_channels=1, image_size=16,
        model_args={"depth": 3, "embed_dim": 16, "num_heads": 2},
    )  # fmt: skip
    trainer = _trainer(net, digits_train, tmp_path / "vit.pt", epochs=1)
    assert isinstance(trainer.backbone_opt, torch.optim.AdamW)
    assert isinstance(_trainer(tiny_backbone(20), digits_train, tmp_path / "cnn.pt").backbone_opt, torch.optim.SGD)
