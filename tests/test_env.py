import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import backbones
import skipnet_env  # noqa: F401  (registers SkipNet-v0)
from skipnet_env.env import SkipNetEnv
from tests.conftest import tiny_backbone


@pytest.fixture(scope="module")
def env_parts():
    return tiny_backbone(20), backbones.load_dataset("digits", "test")


def make(env_parts, **kwargs):
    net, data = env_parts
    return SkipNetEnv(net, data, device="cpu", **kwargs)


def rollout(env, actions, seed=0, index=None):
    obs, info = env.reset(seed=seed, options=None if index is None else {"index": index})
    observations, rewards = [obs], []
    for a in actions:
        obs, r, terminated, truncated, info = env.step(a)
        observations.append(obs)
        rewards.append(r)
    assert terminated and not truncated
    return observations, rewards, info


@pytest.mark.filterwarnings("ignore:.*Box observation space m.* value is .*infinity")
def test_gymnasium_and_sb3_env_checkers_pass(env_parts):
    check_env(make(env_parts), skip_render_check=True)
    sb3_check_env(make(env_parts), warn=False)


def test_gymnasium_make_registers_the_env(env_parts):
    net, data = env_parts
    env = gymnasium.make("SkipNet-v0", backbone=net, dataset=data, device="cpu", alpha=0.2)
    assert isinstance(env.unwrapped, SkipNetEnv)
    assert env.action_space == gymnasium.spaces.Discrete(2)
    # pooled activation (widest block: 16 channels at width 0.25) + 8 positions + spent fraction
    assert env.observation_space.shape == (16 + 8 + 1,)


def test_episode_shape_and_info(env_parts):
    env = make(env_parts, alpha=0.3)
    assert env.num_gates == 8  # 9 blocks, the first always runs
    obs, info = env.reset(seed=0)
    assert obs[16] == 1.0 and obs[17:24].sum() == 0  # position one-hot: first gate
    assert 0 < obs[-1] < 1
    _, rewards, info = rollout(env, [1] * 8)
    assert rewards[:-1] == [0.0] * 7
    assert info["flops_fraction"] == pytest.approx(1.0)
    assert rewards[-1] == pytest.approx(float(info["correct"]) - 0.3)
    assert info["executed"].tolist() == [True] * 8
    assert {"label", "prediction", "flops", "flops_fraction", "executed", "correct"} <= set(info)


def test_all_executed_prediction_is_the_backbone_prediction(env_parts):
    net, data = env_parts
    env = make(env_parts)
    for index in range(5):
        _, _, info = rollout(env, [1] * 8, index=index)
        with torch.no_grad():
            expected = net(data.normalize(data.images[index : index + 1])).argmax(1).item()
        assert info["prediction"] == expected and info["label"] == data.labels[index].item()


def test_seeded_reset_is_reproducible(env_parts):
    env = make(env_parts)
    actions = [1, 0, 1, 1, 0, 0, 1, 0]
    first = rollout(env, actions, seed=123)
    second = rollout(env, actions, seed=123)
    for a, b in zip(first[0], second[0]):
        np.testing.assert_array_equal(a, b)
    assert first[1] == second[1]


def test_per_step_cost_and_terminal_cost_give_the_same_return(env_parts):
    actions = [1, 0, 0, 1, 0, 1, 1, 0]
    _, terminal, _ = rollout(make(env_parts, alpha=0.5), actions, index=3)
    _, per_step, info = rollout(make(env_parts, alpha=0.5, cost_timing="per_step"), actions, index=3)
    assert sum(per_step) == pytest.approx(sum(terminal), abs=1e-6)
    assert per_step[0] < 0 and all(r <= 0 for r in per_step[:-1])  # a skipped identity block costs 0
    assert sum(per_step) == pytest.approx(float(info["correct"]) - 0.5 * info["flops_fraction"], abs=1e-6)


def test_negative_cross_entropy_reward(env_parts):
    net, data = env_parts
    _, rewards, info = rollout(make(env_parts, alpha=0.0, accuracy_reward="neg_ce"), [1] * 8, index=7)
    with torch.no_grad():
        logits = net(data.normalize(data.images[7:8]))
    ce = torch.nn.functional.cross_entropy(logits, data.labels[7:8]).item()
    assert rewards[-1] == pytest.approx(-ce, abs=1e-6)


def test_gate_first_block_adds_a_step(env_parts):
    env = make(env_parts, gate_first_block=True)
    assert env.num_gates == 9
    _, _, info = rollout(env, [0] * 9)
    assert info["executed"].shape == (9,)


@pytest.mark.parametrize("action", [2, -1, 0.5, np.array([1, 0]), "1", None])
def test_bad_actions_are_refused(env_parts, action):
    env = make(env_parts)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="skip|execute"):
        env.step(action)


def test_step_after_the_end_needs_a_reset(env_parts):
    env = make(env_parts)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(1)
    rollout(env, [1] * 8)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(1)


@pytest.mark.parametrize("alpha", [-0.1, float("nan"), float("inf")])
def test_bad_alpha(env_parts, alpha):
    with pytest.raises(ValueError, match="alpha"):
        make(env_parts, alpha=alpha)


def test_bad_reward_options(env_parts):
    with pytest.raises(ValueError, match="accuracy"):
        make(env_parts, accuracy_reward="top5")
    with pytest.raises(ValueError, match="cost_timing"):
        make(env_parts, cost_timing="sometimes")


def test_mismatched_backbone_and_data(env_parts):
    _, data = env_parts
    with pytest.raises(ValueError, match="100 classes.*10"):
        SkipNetEnv(tiny_backbone(20, num_classes=100), data, device="cpu")
    with pytest.raises(ValueError, match=r"\(3, 32, 32\).*\(1, 16, 16\)"):
        SkipNetEnv(tiny_backbone(20, in_channels=3, image_size=32), data, device="cpu")


def test_unknown_backbone_name(env_parts):
    _, data = env_parts
    with pytest.raises(ValueError, match="cifar_resnet38"):
        SkipNetEnv("resnet9000", data, device="cpu")


def test_named_backbone_is_trained_once_and_cached(env_parts):
    _, data = env_parts
    train = {"epochs": 1, "width": 0.25}
    env = SkipNetEnv("cifar_resnet20", data, device="cpu", backbone_train=train)
    cached = list((backbones.pretrained.cache_dir() / "backbones").glob("cifar_resnet20-digits-*.pt"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime
    again = SkipNetEnv("cifar_resnet20", data, device="cpu", backbone_train=train)
    assert cached[0].stat().st_mtime == mtime  # reused, not retrained
    assert torch.equal(env.backbone.head[2].weight, again.backbone.head[2].weight)


@settings(max_examples=40, deadline=None)
@given(actions=st.lists(st.integers(0, 1), min_size=8, max_size=8), index=st.integers(0, 358))
def test_spent_fraction_is_the_sum_of_the_executed_parts(env_parts, actions, index):
    net, _ = env_parts
    env = make(env_parts)
    f = net.flops
    obs, _ = env.reset(options={"index": index})
    fractions = [obs[-1]]
    for a in actions:
        obs, _, _, _, info = env.step(a)
        fractions.append(obs[-1])
    assert all(0.0 <= x <= 1.0 for x in fractions)
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    expected = (
        f.stem
        + f.block_executed[0]
        + f.head
        + sum(f.block_executed[i + 1] if a else f.block_skipped[i + 1] for i, a in enumerate(actions))
    )
    assert info["flops"] == expected
    assert info["flops_fraction"] == pytest.approx(expected / f.full)
    assert (info["flops_fraction"] == 1.0) == all(actions)


@pytest.mark.parametrize("index", [1.7, "3", True, -1, 10_000])
def test_reset_index_must_be_an_integer_in_range(env_parts, index):
    env = make(env_parts)
    with pytest.raises(IndexError, match="must be an integer in"):
        env.reset(options={"index": index})
