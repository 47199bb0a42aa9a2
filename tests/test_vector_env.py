import gymnasium
import numpy as np
import pytest
import torch

import backbones
import backbones.loaders
import skipnet_env  # noqa: F401
from skipnet_env.env import SkipNetEnv
from skipnet_env.vector_env import SkipNetVectorEnv
from tests.conftest import tiny_backbone

B = 16


@pytest.fixture(scope="module")
def parts():
    return tiny_backbone(20), backbones.load_dataset("digits", "test")


def make(parts, **kwargs):
    net, data = parts
    return SkipNetVectorEnv(kwargs.pop("num_envs", B), net, data, device="cpu", **kwargs)


def test_make_vec_uses_the_batched_entry_point(parts):
    net, data = parts
    envs = gymnasium.make_vec(
        "SkipNet-v0", num_envs=B, vectorization_mode="vector_entry_point", backbone=net, dataset=data, device="cpu"
    )
    assert isinstance(envs, SkipNetVectorEnv)
    assert envs.metadata["autoreset_mode"] == gymnasium.vector.AutoresetMode.SAME_STEP
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (B, 25) and obs.dtype == np.float32
    assert envs.observation_space.contains(obs)


def test_same_step_autoreset(parts):
    envs = make(parts)
    obs, info = envs.reset(seed=0)
    first_labels = info["label"].copy()
    for step in range(envs.num_gates):
        actions = envs.action_space.sample()
        obs, reward, terminated, truncated, info = envs.step(actions)
        assert not truncated.any()
        assert terminated.all() == (step == envs.num_gates - 1)
    final = info["final_info"]
    np.testing.assert_array_equal(final["label"], first_labels)
    assert info["final_obs"].shape == (B, 25) and info["_final_obs"].all()
    assert (info["final_obs"][:, 16:24] == 0).all()  # no next block to decide
    assert obs[:, 16].tolist() == [1.0] * B  # already the first step of the next batch
    assert not np.array_equal(info["label"], first_labels)
    assert set(final) >= {"prediction", "correct", "flops", "flops_fraction", "executed"}
    assert final["executed"].shape == (B, envs.num_gates)


def test_vector_env_agrees_with_single_envs(parts):
    """The batched env must give each image exactly what the single env gives it."""
    net, data = parts
    envs = make(parts, alpha=0.25, return_tensors=True)
    envs.reset(seed=3)
    images = envs.core.labels.clone()
    index = envs.sampler._order[:B].clone()
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 2, size=(envs.num_gates, B))
    rewards = None
    for a in actions:
        _, rewards, _, _, info = envs.step(torch.as_tensor(a))
    single = SkipNetEnv(net, data, device="cpu", alpha=0.25)
    for b in range(B):
        single.reset(options={"index": int(index[b])})
        for a in actions[:, b]:
            _, r, *_, single_info = single.step(int(a))
        assert single_info["label"] == images[b].item()
        assert r == pytest.approx(rewards[b].item(), abs=1e-6)
        assert single_info["flops"] == info["final_info"]["flops"][b].item()


def test_tensor_mode_stays_on_the_device_and_exposes_the_activation(parts):
    envs = make(parts, return_tensors=True)
    obs, info = envs.reset(seed=0)
    assert isinstance(obs, torch.Tensor) and obs.device == envs.device
    assert envs.activation.shape == (B, 4, 16, 16)
    obs, reward, terminated, truncated, info = envs.step(torch.ones(B, dtype=torch.long))
    assert isinstance(reward, torch.Tensor) and reward.shape == (B,)
    assert isinstance(terminated, torch.Tensor) and terminated.dtype == torch.bool
    assert envs.step_index == 1


def test_seeded_reset_is_reproducible(parts):
    def run(seed):
        envs = make(parts)
        obs, _ = envs.reset(seed=seed)
        out = [obs]
        for _ in range(envs.num_gates * 2):  # through one autoreset
            out.append(envs.step(np.ones(B, dtype=np.int64))[0])
        return out

    for a, b in zip(run(5), run(5)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(run(5)[0], run(6)[0])


@pytest.mark.parametrize(
    "actions,match",
    [
        (np.ones(B + 1, dtype=np.int64), "shape"),
        (np.ones((B, 1), dtype=np.int64), "shape"),
        (np.full(B, 2), "0 \\(skip\\) or 1"),
        (np.ones(B, dtype=np.float32), "integer"),
        (torch.full((B,), 3), "none of these"),
        (torch.ones(B), "integer or bool tensor"),
        (torch.ones(B, 2, dtype=torch.long), "tensor"),
    ],
)
def test_bad_actions_are_refused(parts, actions, match):
    envs = make(parts)
    envs.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        envs.step(actions)


def test_step_before_reset(parts):
    with pytest.raises(RuntimeError, match="reset"):
        make(parts).step(np.ones(B, dtype=np.int64))


def test_bad_num_envs_and_alpha(parts):
    with pytest.raises(ValueError, match="num_envs"):
        make(parts, num_envs=0)
    with pytest.raises(ValueError, match="alpha"):
        make(parts, alpha=-1.0)
    with pytest.raises(ValueError, match="data set of"):
        make(parts, num_envs=100_000)


def test_folder_images_are_served_through_a_loader(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(backbones.loaders, "IN_MEMORY_SIDE", 16)  # these 40-pixel images count as large: streamed

    for cls in ("a", "b"):
        for split in ("train", "val"):
            folder = tmp_path / "imgs" / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((40, 40, 3), 60 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    data = backbones.load_dataset("imagefolder", "test", root=tmp_path / "imgs", image_size=32)
    assert isinstance(data, backbones.FolderImages)
    net = tiny_backbone(20, num_classes=2, in_channels=3, image_size=32)
    envs = SkipNetVectorEnv(4, net, data, device="cpu")
    obs, _ = envs.reset(seed=0)
    for _ in range(envs.num_gates * 3):  # more batches than the folder holds: the loader restarts
        obs, reward, terminated, *_ = envs.step(np.ones(4, dtype=np.int64))
    assert obs.shape == (4, envs.core.obs_dim)


def test_the_compute_weight_is_set_through_the_env(parts):
    """``env.alpha = a`` prices compute from the next step on (a budget's price moves it during
    training, below 0 where the gates spend less than the budget: compute rewarded); a weight that is
    not a finite number is refused; the env's own option stays >= 0 (a user's weight of compute)."""
    envs = make(parts, alpha=0.0, accuracy_reward="correct", cost_timing="per_step")
    envs.reset(seed=0)
    _, free, *_ = envs.step(np.ones(B, dtype=np.int64))
    envs.alpha = 2.0
    _, priced, *_ = envs.step(np.ones(B, dtype=np.int64))
    assert envs.alpha == envs.reward.alpha == 2.0 and (free == 0).all() and (priced < 0).all()
    envs.alpha = -1.0
    _, rewarded, *_ = envs.step(np.ones(B, dtype=np.int64))
    assert (rewarded > 0).all()
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        envs.alpha = float("nan")


def test_an_exit_skips_every_later_block_whatever_is_asked_after(parts):
    """``early_exit``: action 2 stops an image at a block. Its later actions are ignored (the blocks
    are skipped: a downsampling block's projection still runs), the observation says it exited, and
    the head classifies what the route left: the masked forward of that route, at its FLOPs."""
    net, _ = parts
    envs = make(parts, early_exit=True, return_tensors=True)
    assert envs.single_action_space.n == 3 and envs.single_observation_space.shape == (26,)
    obs, _ = envs.reset(seed=0)
    images, labels = envs.core.h.clone(), envs.core.labels.clone()  # entering the first gated block
    exit_at = torch.arange(B) % (envs.num_gates + 1)  # image i exits before gated block i % 9 (8: never)
    for k in range(envs.num_gates):
        actions = torch.where(exit_at == k, 2, 1)  # execute, but exit at the image's block; after it, ask 1 again
        obs, reward, terminated, _, info = envs.step(actions)
        if not terminated.all():
            assert torch.equal(obs[:, 16 + 8] == 1, exit_at <= k)  # the exited flag
    final = info["final_info"]
    route = torch.arange(envs.num_gates)[None, :] < exit_at[:, None]  # blocks before the exit run
    assert torch.equal(final["executed"], route) and torch.equal(final["exited"], exit_at < envs.num_gates)
    h = images
    with torch.no_grad():  # the route from the activation entering the first gated block
        for k, block in enumerate(net.blocks[envs.core.first_gated :]):
            h = torch.where(route[:, k, None, None, None], block(h), block.shortcut(h))
        logits = net.head(h)
    torch.testing.assert_close(final["logits"], logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(final["label"], labels)
    full = envs.core.full_flops
    spent = envs.core.prefix_flops + envs.core.head_flops
    expected = spent + torch.where(route, envs.core.exec_flops.float(), envs.core.skip_flops.float()).sum(1)
    torch.testing.assert_close(final["flops"].float() / full, expected / full)
    with pytest.raises(ValueError, match=r"0 \(skip\), 1 \(execute\) or 2 \(exit\)"):
        envs.step(torch.full((B,), 3))


def test_exit_is_an_option_of_the_block_by_block_env_only(parts):
    from skipnet_env.oneshot import SkipNetOneShotVectorEnv

    net, data = parts
    with pytest.raises(ValueError, match="early_exit is an option of SkipNet-v0"):
        SkipNetOneShotVectorEnv(B, net, data, device="cpu", early_exit=True)
    with pytest.raises(ValueError, match="exit needs early_exit=True"):
        envs = make(parts)
        envs.reset(seed=0)
        envs.core.advance(torch.ones(B, dtype=torch.bool), exit=torch.zeros(B, dtype=torch.bool))
