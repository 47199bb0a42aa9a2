"""The recipe's HRL: a cached backbone stage after joint SP, resumed exactly, that every agent routes."""

import pytest
import torch

import backbones
from agents.hybrid import HybridTrainer
from agents.recipe_hrl import RecipeHRLConfig, get_recipe_hrl
from agents.skip_ready import JointConfig, get_skip_ready, load_gates
from backbones.checkpoint import fingerprint, load_backbone
from tests.conftest import tiny_backbone

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return backbones.load_dataset("digits", "train"), backbones.load_dataset("digits", "val")


@pytest.fixture
def joint(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPNET_CACHE", str(tmp_path / "cache"))
    base = tiny_backbone(20)
    meta = {"arch": base.arch, "dataset": "digits", "data_fingerprint": "d"}
    return get_skip_ready(
        base, meta, digits[0], JointConfig(epochs=1, batch_size=64), "rnn", {"hidden_size": 4, "embed_dim": 4}, CPU,
        progress=False,
    )  # fmt: skip


def _hrl(joint, digits, iterations=4, keep="always", **kw):
    net, meta = joint
    cfg = RecipeHRLConfig(iterations=iterations, batch=32, lr=1e-3, finetune_lr=1e-3, keep=keep)
    return get_recipe_hrl(
        net, meta, digits[0], cfg, CPU, budget=0.5, seed=1, val_data=digits[1], progress=False, **kw
    )  # fmt: skip


def test_hrl_trains_backbone_and_gates_into_a_cached_skip_ready_backbone(joint, digits, monkeypatch):
    joint_net, joint_meta = joint
    before = fingerprint(joint_net)
    net, meta = _hrl(joint, digits)
    assert fingerprint(joint_net) == before  # the joint backbone is not modified
    assert fingerprint(net) != before  # HRL trained the backbone through the executed blocks
    loaded, saved = load_backbone(meta["checkpoint"], dataset="digits", data_fingerprint="d")
    assert fingerprint(loaded) == fingerprint(net) and saved["complete"]
    hrl = saved["skip_ready"]["hrl"]
    assert hrl["iterations"] == 4 and hrl["budget"] == 0.5 and hrl["seed"] == 1
    assert {"val_accuracy_before", "val_flops_before", "val_accuracy_after", "val_flops_after"} <= set(hrl)
    assert saved["skip_ready"]["gates"] == joint_meta["skip_ready"]["gates"]  # agents start from them as before
    new_gates, joint_gates = load_gates(meta["checkpoint"], net), load_gates(joint_meta["checkpoint"], joint_net)
    assert not torch.equal(new_gates.out.weight, joint_gates.out.weight)
    # cached: the second call trains nothing; another setting is another backbone; 0 iterations: no stage
    with monkeypatch.context() as patch:  # undo() would undo the test's own cache too: the user's would fill
        patch.setattr(HybridTrainer, "train", lambda self: pytest.fail("retrained a cached stage"))
        again, again_meta = _hrl(joint, digits)
    assert again_meta["checkpoint"] == meta["checkpoint"] and fingerprint(again) == fingerprint(net)
    other = _hrl(joint, digits, iterations=3)[1]
    assert other["checkpoint"] != meta["checkpoint"]
    # the validation images choose which gates the stage hands on: other ones are another stage, never this one
    other_val = _hrl(joint, (digits[0], backbones.load_dataset("digits", "test")))[1]
    assert other_val["checkpoint"] != meta["checkpoint"]
    assert _hrl(joint, digits, iterations=0) == joint


def test_an_interrupted_hrl_stage_resumes_bit_for_bit(joint, digits, tmp_path, monkeypatch):
    whole, _ = _hrl(joint, digits, path=tmp_path / "whole.pt", checkpoint_every=1)
    record = HybridTrainer.record

    def interrupted(self, values):
        if self.done_units == 2:  # the checkpoint holds 2 iterations
            raise KeyboardInterrupt
        record(self, values)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(HybridTrainer, "record", interrupted)
        _hrl(joint, digits, path=tmp_path / "split.pt", checkpoint_every=1)
    assert (tmp_path / "split.training.pt").is_file() and not (tmp_path / "split.pt").exists()
    resumed, _ = _hrl(joint, digits, path=tmp_path / "split.pt", checkpoint_every=1)
    assert fingerprint(resumed) == fingerprint(whole)
    assert not (tmp_path / "split.training.pt").exists()  # the trainer's checkpoint goes once the stage is done


def test_hrl_prices_compute_from_where_joint_sp_left_it_and_holds_the_budget_from_either_side(
    joint, digits, monkeypatch
):
    """Regression: the stage priced compute at the environment's default alpha (1.0) while joint SP's
    multiplier ended near 0.1-0.3, and the reward's price moved once in 100 iterations and never below
    0: the gates fell to 28-36% of the FLOPs for a budget of 50%. The price starts at joint SP's
    multiplier, reaches the reward every PRICE_EVERY iterations, and goes below 0 (compute rewarded)
    where the gates spend less than the budget."""
    import agents.recipe_hrl as stage

    _, joint_meta = joint
    assert stage.start_price(joint_meta) == joint_meta["skip_ready"]["history"][-1]["compute_weight"]
    assert stage.start_price({"skip_ready": {}}) == stage.DEFAULT_ALPHA  # a joint backbone without its history
    assert RecipeHRLConfig().hybrid().hrl.log_every == stage.PRICE_EVERY
    prices = []
    set_alpha, make_env = HybridTrainer.set_alpha, HybridTrainer.make_env

    def recorded(self, alpha):
        prices.append((self.done_units, alpha))
        set_alpha(self, alpha)

    def made(self):
        env = make_env(self)
        prices.append((self.done_units, env.alpha))  # the reward's price as HRL starts
        return env

    monkeypatch.setattr(HybridTrainer, "set_alpha", recorded)
    monkeypatch.setattr(HybridTrainer, "make_env", made)
    monkeypatch.setattr(stage, "PRICE_EVERY", 2)
    monkeypatch.setattr(stage, "start_price", lambda meta: -0.25)  # a multiplier below 0: compute rewarded
    _hrl(joint, digits, iterations=4)
    assert prices[0] == (0, -0.25)  # the env took it
    assert [units for units, _ in prices[1:]] == [2, 4]  # the budget's price reached the reward every 2 iterations


@pytest.mark.parametrize("hrl_wins", [True, False])
def test_validation_keeps_hrl_only_where_it_scores_at_least_joint_sps_at_the_budget(
    joint, digits, monkeypatch, hrl_wins
):
    """On a harder data set HRL lost 3 points to joint SP at the same FLOPs: the stage compares the
    two calibrated to the budget on validation images and hands the better one on."""
    from types import SimpleNamespace

    import agents.recipe_hrl as stage
    from experiments.config import RunConfig
    from experiments.recipe import training_epochs

    scores = iter([0.80, 0.85 if hrl_wins else 0.75])  # joint SP's, then HRL's, at the budget
    monkeypatch.setattr(stage, "calibrate_threshold", lambda *a, **k: (0.0, SimpleNamespace(accuracy=next(scores))))
    net, meta = _hrl(joint, digits, keep="validation")
    hrl = meta["skip_ready"]["hrl"]
    assert (hrl["val_accuracy_before_at_budget"], hrl["val_accuracy_after_at_budget"]) == (
        0.80,
        0.85 if hrl_wins else 0.75,
    )
    assert hrl["kept"] == ("hrl" if hrl_wins else "joint")
    assert (fingerprint(net) == fingerprint(joint[0])) == (not hrl_wins)  # joint SP's network handed on
    kept_gates = load_gates(meta["checkpoint"], net).out.weight
    assert torch.equal(kept_gates, load_gates(joint[1]["checkpoint"], joint[0]).out.weight) == (not hrl_wins)
    epochs = training_epochs(RunConfig(num_envs=32, eval_batch=64), {**meta, "skip_ready": {**meta["skip_ready"],
                             "base_train_config": {"epochs": 1}}}, len(digits[0]))  # fmt: skip
    assert ("hrl" in epochs) == hrl_wins  # a control trains as long as the network handed on was trained


def test_the_baseline_names_the_stage_only_when_changed():
    """--recipe-hrl-baseline: the stages cached before the option keep their keys; another baseline is
    another stage, and the trainer gets it."""
    from agents.recipe_hrl import RecipeHRLConfig, recipe_hrl_identity

    default = recipe_hrl_identity(RecipeHRLConfig(), 0.5, 0, "fp32")
    assert "baseline" not in default and RecipeHRLConfig().hybrid().hrl.baseline == "self_critical"
    batch_mean = RecipeHRLConfig(baseline="batch_mean")
    assert recipe_hrl_identity(batch_mean, 0.5, 0, "fp32") == {**default, "baseline": "batch_mean"}
    assert batch_mean.hybrid().hrl.baseline == "batch_mean"


def test_explore_names_the_stage_only_when_set():
    """--recipe-hrl-explore (0.1 by default): None, the gates' own probabilities, keeps the keys of the
    stages cached before the option; a value is another stage, and the trainer gets it."""
    from agents.recipe_hrl import RecipeHRLConfig, recipe_hrl_identity

    before = recipe_hrl_identity(RecipeHRLConfig(explore=None), 0.5, 0, "fp32")
    assert "explore" not in before and RecipeHRLConfig(explore=None).hybrid().hrl.explore is None
    assert recipe_hrl_identity(RecipeHRLConfig(), 0.5, 0, "fp32") == {**before, "explore": 0.1}
    explore = RecipeHRLConfig(explore=0.05)
    assert recipe_hrl_identity(explore, 0.5, 0, "fp32") == {**before, "explore": 0.05}
    assert explore.hybrid().hrl.explore == 0.05
