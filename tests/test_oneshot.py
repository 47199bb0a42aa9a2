"""SkipNetOneShot-v0 (the whole mask at once) and the agents that act on it: BlockDrop and SB3 PPO."""

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import backbones
import skipnet_env  # noqa: F401  (registers the envs)
from agents.blockdrop import BlockDropConfig, BlockDropNet, BlockDropTrainer
from agents.evaluate import evaluate
from backbones.checkpoint import safe_load
from skipnet_env.oneshot import SkipNetOneShotEnv, SkipNetOneShotVectorEnv
from skipnet_env.vector_env import SkipNetVectorEnv
from tests.conftest import tiny_backbone

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def parts():
    return tiny_backbone(20), backbones.load_dataset("digits", "train")


@pytest.mark.filterwarnings("ignore:.*Box observation space m.* value is .*infinity")
@pytest.mark.parametrize("observation", ["image", "stem"])
def test_checkers_pass_and_make_registers_it(parts, observation):
    net, data = parts
    env = SkipNetOneShotEnv(net, data, observation, device="cpu")
    check_env(env, skip_render_check=True)
    sb3_check_env(SkipNetOneShotEnv(net, data, observation, device="cpu"), warn=False)
    made = gymnasium.make("SkipNetOneShot-v0", backbone=net, dataset=data, device="cpu")
    assert made.action_space == gymnasium.spaces.MultiBinary(8)
    assert made.observation_space.shape == (1, 16, 16)
    assert env.observation_space.shape == ((1, 16, 16) if observation == "image" else (4, 16, 16))


def test_one_step_gives_what_the_block_by_block_env_gives(parts):
    """Same images, same mask: the same reward and prediction as SkipNet-v0 summed over its steps."""
    net, data = parts
    b = 16
    one = SkipNetOneShotVectorEnv(b, net, data, return_tensors=True, alpha=0.5, device="cpu")
    seq = SkipNetVectorEnv(b, net, data, return_tensors=True, alpha=0.5, device="cpu")
    obs, info = one.reset(seed=3)
    seq.reset(seed=3)
    assert torch.equal(info["label"], seq.core.labels) and obs.shape == (b, 1, 16, 16)
    mask = torch.rand(b, 8, generator=torch.Generator().manual_seed(0)) < 0.5
    _, reward, terminated, truncated, info = one.step(mask)
    total = torch.zeros(b)
    for k in range(8):
        _, r, _, _, seq_info = seq.step(mask[:, k])
        total += r
    assert terminated.all() and not truncated.any()
    torch.testing.assert_close(reward, total)
    assert torch.equal(info["final_info"]["prediction"], seq_info["final_info"]["prediction"])
    assert torch.equal(info["final_info"]["executed"], mask)


def test_bad_masks_are_refused_with_what_arrived(parts):
    net, data = parts
    vec = SkipNetOneShotVectorEnv(4, net, data, device="cpu")
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(4, 8\)"):
        vec.step(np.ones((4, 7), dtype=int))
    with pytest.raises(ValueError, match="0 \\(skip\\) or 1 \\(execute\\)"):
        vec.step(np.full((4, 8), 2))
    single = SkipNetOneShotEnv(net, data, device="cpu")
    single.reset(seed=0)
    with pytest.raises(ValueError, match="whole execute mask"):
        single.step(1)
    with pytest.raises(ValueError, match="observation must be"):
        SkipNetOneShotEnv(net, data, "pixels", device="cpu")


def _trainer(parts, tmp_path, iterations, every=2):
    net, data = parts
    torch.manual_seed(0)
    policy = BlockDropNet(1, 8, width=4)
    cfg = BlockDropConfig(iterations=iterations, lr=1e-2)
    return BlockDropTrainer(
        net, policy, data, cfg, CPU, tmp_path / "agent.pt", {"agent": "blockdrop"}, progress=False,
        num_envs=32, alpha=0.5, checkpoint_every=every,
    )  # fmt: skip


def test_blockdrop_learns_to_skip_and_resumes_exactly(parts, tmp_path):
    full = _trainer(parts, tmp_path / "a", 6)
    policy = full.train()
    assert safe_load(tmp_path / "a" / "agent.pt")["metadata"]["stage"] == "done"
    r = evaluate(policy, parts[0], backbones.load_dataset("digits", "test"), CPU)
    assert r.policy_flops_fraction > 0  # the policy network's FLOPs are counted
    # killed after 4 iterations (the last checkpoint), resumed: the same network bit for bit
    part = _trainer(parts, tmp_path / "b", 4)
    part.train()
    resumed = _trainer(parts, tmp_path / "b", 6)
    resumed.resume(safe_load(tmp_path / "b" / "agent.pt"))
    resumed.train()
    for key, value in full.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[key], value), key


@pytest.mark.parametrize("accuracy, explore", [("correct", 1.0), ("neg_ce", 0.8)])
def test_blockdrop_training_lowers_the_compute_it_spends(parts, tmp_path, accuracy, explore):
    trainer = _trainer(parts, tmp_path, 40, every=40)
    trainer.cfg.explore = explore
    trainer.env.core.reward = type(trainer.env.core.reward)(alpha=3.0, accuracy=accuracy)
    start = trainer.step()["charts/flops_fraction"]
    trainer.train()
    end = trainer.step()["charts/flops_fraction"]
    assert end < start - 0.1, (float(start), float(end))


def test_sb3_ppo_trains_on_the_multibinary_env(parts):
    from stable_baselines3 import PPO

    from skipnet_env.sb3_bridge import make_sb3_env

    net, data = parts
    env = make_sb3_env(16, "SkipNetOneShot-v0", backbone=net, dataset=data, device="cpu")
    model = PPO("MlpPolicy", env, n_steps=4, batch_size=32, n_epochs=1, seed=0, device="cpu")
    model.learn(64)
    actions, _ = model.predict(np.zeros((3, 1, 16, 16), dtype=np.float32), deterministic=True)
    assert actions.shape == (3, 8) and set(np.unique(actions)) <= {0, 1}


def test_the_stem_observation_is_the_episodes_own(parts):
    """Regression: in fp32 the stem observation and ``final_obs`` were the engine's activation buffer
    itself, which the routing overwrites in place: an off-policy learner stored another state."""
    net, data = parts
    env = SkipNetOneShotVectorEnv(8, net, data, observation="stem", return_tensors=True, device="cpu", precision="fp32")
    obs, _ = env.reset(seed=0)
    kept = obs.clone()
    x, y = env.batch
    env.core.start(x, y)
    torch.testing.assert_close(kept, env.core.activation.float())  # the episode's stem, as observed
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) < 0.5  # some rows routed in place
    _, _, _, _, info = env.step(mask)
    assert torch.equal(info["final_obs"], kept) and torch.equal(obs, kept)
