"""Early exit on a CNN: exit heads fitted beside the backbone classify an image where it exits."""

from __future__ import annotations

import pytest
import torch

import backbones
from agents.evaluate import evaluate
from agents.policies import ConfidenceExitPolicy
from backbones.checkpoint import fingerprint
from backbones.exits import ExitHeads, exit_classifier, exit_shapes, fit_exit_heads, pooled_activations
from skipnet_env.core import BatchedRouting, RewardConfig
from skipnet_env.vector_env import SkipNetVectorEnv
from tests.conftest import tiny_backbone

CPU = torch.device("cpu")
B = 16


@pytest.fixture(scope="module")
def fitted():
    net, data = tiny_backbone(20), backbones.load_dataset("digits", "test")
    before = fingerprint(net)
    heads = fit_exit_heads(net, data, CPU, epochs=100)
    assert fingerprint(net) == before  # fitted beside the backbone: its weights are as they were
    return net, data, heads


def test_exit_heads_learn_from_the_activation_entering_each_gated_block(fitted):
    net, data, heads = fitted
    assert [h.in_features for h in heads.heads] == [c for c, _, _ in exit_shapes(net)]  # ResNet-20: 8 gated blocks
    features, labels = pooled_activations(net, data, CPU, 100)
    with torch.no_grad():
        accuracy = [float((head(f).argmax(1) == labels).float().mean()) for head, f in zip(heads.heads, features)]
    assert accuracy[-1] > 0.4  # ten classes: chance is 0.1 (the network itself is random)
    again = fit_exit_heads(net, data, CPU, epochs=100)  # deterministic given the seed
    assert all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="exit heads need training images"):
        exit_classifier(net)  # a ResNet's head reads only the last block's activation


def test_an_exited_image_is_classified_by_its_exit_head_and_charged_nothing_after_it(fitted):
    """With exit heads the env classifies an exited image with the head of the block it exits at,
    from the activation entering that block, and charges the exit head's FLOPs and nothing after it
    (no later shortcut, no final head); an image that never exits is the masked forward of its route."""
    net, data, heads = fitted
    envs = SkipNetVectorEnv(B, net, data, device="cpu", early_exit=True, exit_heads=heads, return_tensors=True)
    envs.reset(seed=0)
    h0, labels = envs.core.h.clone(), envs.core.labels.clone()
    exit_at = torch.arange(B) % (envs.num_gates + 1)  # image i exits before gated block i % 9 (8: never)
    for k in range(envs.num_gates):
        *_, info = envs.step(torch.where(exit_at == k, 2, 1))
    final = info["final_info"]
    assert torch.equal(final["label"], labels) and torch.equal(final["exited"], exit_at < envs.num_gates)
    core, expected, flops = envs.core, torch.empty(B, 10), torch.full((B,), envs.core.prefix_flops, dtype=torch.float64)
    exit_flops = heads.flops(exit_shapes(net))
    with torch.no_grad():
        h = h0
        for k, block in enumerate(net.blocks[core.first_gated :]):
            here = exit_at == k
            expected[here] = heads(h[here], k)
            flops[here] += exit_flops[k]
            running = exit_at > k
            flops[running] += core.exec_flops[k]
            h = block(h)
        never = exit_at == envs.num_gates
        expected[never] = net.head(h[never])
        flops[never] += core.head_flops
    torch.testing.assert_close(final["logits"], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final["flops"], flops)
    with pytest.raises(ValueError, match="need early_exit=True"):
        BatchedRouting(net, RewardConfig(), exit_heads=heads)


def test_confidence_exit_routes_a_cnn_through_its_exit_heads(fitted):
    net, data, heads = fitted
    never, always = ConfidenceExitPolicy(heads, -30.0), ConfidenceExitPolicy(heads, 30.0)
    full, first = evaluate(never, net, data, CPU), evaluate(always, net, data, CPU)
    assert full.execute_rate == [1.0] * 8 and first.execute_rate == [0.0] * 8
    x, y = data.batch(torch.arange(len(data)))
    with torch.no_grad():  # every image exits at the first gated block: its exit head's prediction there
        predicted = heads(net.enter(x, 1), 0).argmax(1)
    assert first.accuracy == pytest.approx(float((predicted == y).float().mean()))
    spent = net.flops.stem + net.flops.block_executed[0] + heads.flops(exit_shapes(net))[0]
    assert first.backbone_flops_fraction == pytest.approx(spent / net.flops.full)
    assert isinstance(ConfidenceExitPolicy(heads).exit_heads, ExitHeads)


def test_learned_exit_reads_a_cnns_blocks_of_every_width(fitted):
    """The scorer's input pads each block's pooled activation to the widest block's (a CNN's widen)."""
    from agents.early_exit import LearnedExitConfig, LearnedExitPolicy, depth_outcomes, fit_scorer

    net, data, heads = fitted
    features, right = depth_outcomes(net, heads, data, CPU, 100)
    assert features.shape == (len(data), 8, 16 + 3 + 8) and right.shape == (len(data), 8)
    assert (features[:, 0, 4:16] == 0).all() and (features[:, -1, 4:16] != 0).any()  # 4 channels first, 16 last
    scorer = fit_scorer(features, right, LearnedExitConfig(epochs=1, tokens=True), seed=0)
    stay, leave = LearnedExitPolicy(heads, scorer, 8, -30.0), LearnedExitPolicy(heads, scorer, 8, 30.0)
    assert evaluate(stay, net, data, CPU).execute_rate == [1.0] * 8
    assert evaluate(leave, net, data, CPU).execute_rate == [0.0] * 8


@pytest.mark.filterwarnings("ignore:.*Box observation space m.* value is .*infinity")
def test_the_single_env_ends_an_exited_cnn_episode_at_its_exit_head(fitted):
    from gymnasium.utils.env_checker import check_env

    from skipnet_env.env import SkipNetEnv

    net, data, heads = fitted
    env = SkipNetEnv(net, data, device="cpu", early_exit=True, exit_heads=heads, alpha=0.5)
    check_env(env, skip_render_check=True)
    env.reset(options={"index": 3})
    env.step(1)
    _, reward, terminated, _, info = env.step(2)  # exits before the second gated block
    assert terminated and info["exited"]
    x, y = data.batch(torch.tensor([3]))
    with torch.no_grad():
        logits = heads(net.blocks[1](net.enter(x, 1)), 1)
    spent = (
        net.flops.stem + net.flops.block_executed[0] + net.flops.block_executed[1] + heads.flops(exit_shapes(net))[1]
    )
    assert info["prediction"] == int(logits.argmax(1)) and info["flops"] == pytest.approx(spent)
    assert reward == pytest.approx(float(info["correct"]) - 0.5 * spent / net.flops.full)
