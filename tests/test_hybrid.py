import pytest
import torch

import backbones
from agents.gates import create_gates
from agents.hybrid import (
    HybridConfig,
    HybridTrainer,
    advantages,
    discounted_returns,
    reinforce_loss,
    sp_forward,
    straight_through,
)
from backbones.checkpoint import safe_load
from skipnet_env.core import BatchedRouting
from tests.conftest import tiny_backbone


def test_straight_through_is_hard_forward_identity_backward():
    p = torch.tensor([0.2, 0.5, 0.7], requires_grad=True)
    g = straight_through(p)
    assert g.tolist() == [0.0, 1.0, 1.0]
    (g * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert p.grad.tolist() == [1.0, 2.0, 3.0]


def test_sp_forward_hard_gates_match_routing_and_gradients_reach_the_gates():
    from skipnet_env.routing import routed_forward

    net = tiny_backbone(20)
    net.requires_grad_(False)
    gates = create_gates("rnn", net)
    x = torch.randn(6, 1, 16, 16)
    logits, probs, _ = sp_forward(net, gates, x)
    execute = torch.cat([torch.ones(6, 1, dtype=torch.bool), probs >= 0.5], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(logits, routed_forward(net, x, execute), rtol=1e-5, atol=1e-5)
    torch.nn.functional.cross_entropy(logits, torch.arange(6) % 10).backward()
    assert gates.out.weight.grad is not None and gates.out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())  # the backbone stays frozen


def test_discounted_returns():
    rewards = torch.tensor([[1.0], [0.0], [2.0]])  # (N=3, B=1)
    assert discounted_returns(rewards, 1.0).flatten().tolist() == [3.0, 2.0, 2.0]
    assert discounted_returns(rewards, 0.5).flatten().tolist() == [1.5, 1.0, 2.0]


def test_reinforce_loss_and_its_baselines():
    log_probs = torch.zeros(2, 4, requires_grad=True)
    returns = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 4.0]])
    greedy = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    reinforce_loss(log_probs, advantages(returns, "none")).backward()
    torch.testing.assert_close(log_probs.grad, -returns / 4)
    log_probs.grad = None
    reinforce_loss(log_probs, advantages(returns, "batch_mean")).backward()
    torch.testing.assert_close(log_probs.grad, -(returns - returns.mean(1, keepdim=True)) / 4)
    log_probs.grad = None
    reinforce_loss(log_probs, advantages(returns, "self_critical", greedy)).backward()
    torch.testing.assert_close(log_probs.grad, -(returns - greedy) / 4)


def test_reinforce_with_a_baseline_has_lower_gradient_variance():
    """The batch-mean baseline cuts the variance of the policy-gradient estimate (same samples)."""
    torch.manual_seed(0)
    theta = torch.zeros(1, requires_grad=True)
    grads = {"none": [], "batch_mean": []}
    for _ in range(200):
        dist = torch.distributions.Bernoulli(logits=theta.expand(1, 32))
        a = dist.sample()
        returns = 5.0 + a + 0.1 * torch.randn(1, 32)  # a large constant the baseline removes
        for name in grads:
            loss = reinforce_loss(dist.log_prob(a), advantages(returns, name))
            (g,) = torch.autograd.grad(loss, theta, retain_graph=True)
            grads[name].append(g.item())
    var = {k: torch.tensor(v).var().item() for k, v in grads.items()}
    assert var["batch_mean"] < 0.2 * var["none"]


def _trainer(tmp_path, **cfg):
    net = tiny_backbone(20)
    gates = create_gates("rnn", net)
    data = backbones.load_dataset("digits", "val")
    run = {"num_envs": 32, "checkpoint_every": 2}
    run.update({k: cfg.pop(k) for k in ("num_envs", "checkpoint_every", "alpha", "budget", "seed") if k in cfg})
    return HybridTrainer(
        net, gates, data, HybridConfig.flat(**cfg), torch.device("cpu"), tmp_path / "agent.pt", {"agent": "x"},
        progress=False, **run,
    )  # fmt: skip


def _gates_state(trainer):
    return {k: v.clone() for k, v in trainer.gates.state_dict().items()}


# killed in the iteration after a checkpoint, and two after it; with the backbone fine-tuned; with the
# sampling scale of --hrl-explore (set from the first batch: a resumed run keeps it)
@pytest.mark.parametrize(
    "die_at,finetune,explore", [(3, False, None), (5, False, None), (5, True, None), (3, True, 0.1)]
)
def test_interrupted_then_resumed_run_ends_with_the_same_gates(tmp_path, monkeypatch, die_at, finetune, explore):
    settings = {
        "sp_epochs": 1, "hrl_iterations": 6, "baseline": "self_critical", "finetune_backbone": finetune,
        "hrl_explore": explore,
    }  # fmt: skip
    straight = _trainer(tmp_path / "straight", **settings)
    straight.train()
    expected = _gates_state(straight)

    trainer = _trainer(tmp_path, **settings)
    calls = {"n": 0}
    real_rollout = trainer.rollout

    def dies(*a, **k):  # the process is killed during HRL iteration die_at
        calls["n"] += 1
        if calls["n"] == die_at:
            raise KeyboardInterrupt
        return real_rollout(*a, **k)

    monkeypatch.setattr(trainer, "rollout", dies)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    meta = safe_load(tmp_path / "agent.pt")["metadata"]
    assert meta["stage"] == "hrl" and meta["done_units"] == 2 * ((die_at - 1) // 2) and meta["agent"] == "x"
    resumed = _trainer(tmp_path, **settings)
    resumed.resume()
    resumed.train()
    assert safe_load(tmp_path / "agent.pt")["metadata"]["stage"] == "done"
    got = _gates_state(resumed)
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # bit for bit


def test_resume_applies_this_runs_learning_rates(tmp_path):
    trainer = _trainer(tmp_path, sp_epochs=1, hrl_iterations=4)
    trainer.train_sp()
    resumed = _trainer(tmp_path, sp_epochs=1, hrl_iterations=4, sp_lr=1e-5, hrl_lr=2e-6)
    resumed.resume()
    assert resumed.sp_opt.param_groups[0]["lr"] == 1e-5
    assert resumed.hrl_opt.param_groups[0]["lr"] == resumed.hrl_opt.param_groups[0]["initial_lr"] == 2e-6


def test_divergence_keeps_last_finite_checkpoint(tmp_path):
    """A learning rate that blows the weights up without a NaN stops the run, and the checkpoint on
    disk is the last good one."""
    trainer = _trainer(tmp_path, sp_epochs=1, hrl_iterations=100, hrl_lr=1e30, checkpoint_every=1)
    trainer.train_sp()
    good = (tmp_path / "agent.pt").read_bytes()
    with pytest.raises(FloatingPointError, match="last good checkpoint.*agent.pt.*--resume"):
        trainer.train_hrl()
    state = safe_load(tmp_path / "agent.pt")
    assert (tmp_path / "agent.pt").read_bytes() == good
    assert all(torch.isfinite(v).all() and v.abs().max() < 1e4 for v in state["gates"].values())


def test_divergence_before_any_checkpoint_says_so(tmp_path):
    trainer = _trainer(tmp_path, sp_epochs=1, sp_lr=1e30)
    with pytest.raises(FloatingPointError, match="No checkpoint was written yet"):
        trainer.train()
    assert not (tmp_path / "agent.pt").exists()


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, sp_epochs=1, hrl_iterations=2)
    trainer.train_sp()
    good = (tmp_path / "agent.pt").read_bytes()
    with torch.no_grad():
        trainer.gates.out.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        trainer.train_hrl()
    assert (tmp_path / "agent.pt").read_bytes() == good


def test_finetune_backbone_trains_it_with_frozen_batchnorm_statistics(tmp_path):
    trainer = _trainer(tmp_path, sp_epochs=1, hrl_iterations=2, finetune_backbone=True)
    before = {k: v.clone() for k, v in trainer.backbone.state_dict().items()}
    trainer.train()
    after = trainer.backbone.state_dict()
    assert not torch.equal(before["blocks.1.conv1.weight"], after["blocks.1.conv1.weight"])
    stats = [k for k in before if "running_" in k]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert "backbone" in safe_load(tmp_path / "agent.pt")


def test_each_stage_trains_at_its_own_learning_rate(tmp_path):
    """Regression: both optimizers once shared their parameter-group dicts, and the first one's
    learning rate (SP's) silently applied to HRL too."""
    trainer = _trainer(tmp_path, sp_lr=1e-3, hrl_lr=3e-2, finetune_backbone=True, finetune_lr=1e-5)
    assert [g["lr"] for g in trainer.sp_opt.param_groups] == [1e-3, 1e-5]
    assert [g["lr"] for g in trainer.hrl_opt.param_groups] == [3e-2, 1e-5]


@pytest.mark.slow
def test_sp_with_a_compute_term_learns_to_skip(tmp_path):
    """On a frozen trained backbone, SP with cross-entropy alone keeps (nearly) every block; its
    compute term teaches the gates to skip."""
    from backbones.pretrained import get_trained

    net, _ = get_trained("cifar_resnet20", "digits", width=0.25, epochs=4, progress=False)
    data = backbones.load_dataset("digits", "train")
    rates = {}
    for sp_alpha in (0.0, 3.0):
        torch.manual_seed(0)
        hc = HybridConfig.flat(sp_epochs=2, sp_lr=3e-2, sp_alpha=sp_alpha, sp_sample=True)
        trainer = HybridTrainer(
            net, create_gates("rnn", net), data, hc, torch.device("cpu"), tmp_path / f"{sp_alpha}.pt", {}, num_envs=64
        )
        trainer.progress = False
        trainer.train_sp()
        x, _ = data.batch(torch.arange(len(data)))
        with torch.no_grad():
            _, executed, _ = sp_forward(net, trainer.gates, x)
        rates[sp_alpha] = executed.mean().item()
    assert rates[0.0] > 0.8 and rates[3.0] < rates[0.0] - 0.2


def test_self_critical_advantage_vanishes_when_the_policy_is_deterministic(tmp_path):
    trainer = _trainer(tmp_path)
    with torch.no_grad():
        trainer.gates.out.bias.fill_(30.0)  # p(execute) = 1: samples and the greedy route coincide
    env = trainer.make_env()
    env.reset(seed=0)
    trainer.replay = BatchedRouting(trainer.backbone, env.core.reward)
    ep = trainer.rollout(env)
    returns = discounted_returns(ep["reward"], 1.0)
    torch.testing.assert_close(trainer.greedy_route(ep["start"], ep["label"])[0], returns)


def test_hrl_explore_samples_off_the_greedy_route_as_often_as_asked(tmp_path):
    """--hrl-explore p: the logits are scaled once so that a decision leaves the greedy route with
    probability p on average over the first batch's greedy routes; the greedy decisions are the
    gates' own; unset, the gates' own probabilities."""
    assert _trainer(tmp_path / "plain").sample_scale is None
    trainer = _trainer(tmp_path, hrl_explore=0.2)
    with torch.no_grad():
        trainer.gates.out.weight.mul_(0.01)  # logits near 0, as joint SP's thresholded gates have them
        trainer.gates.out.bias.zero_()
    env = trainer.make_env()
    _, info = env.reset(seed=0)
    trainer.replay = BatchedRouting(trainer.backbone, env.core.reward)
    start = env.activation.clone()
    trainer.set_sample_scale(start, info["label"])
    _, _, logits = trainer.replay_greedy(start, info["label"])
    scale = trainer.sample_scale
    assert scale is not None and scale > 1.0
    torch.testing.assert_close(torch.sigmoid(-scale * logits.abs()).mean(), torch.tensor(0.2), atol=1e-4, rtol=0)
    trainer.set_sample_scale(start, info["label"])  # once per run
    assert trainer.sample_scale == scale
    with pytest.raises(ValueError, match="--hrl-explore must be a probability in"):
        HybridConfig.flat(hrl_explore=0.5)


def test_hrl_is_reproducible_from_its_seed(tmp_path):
    def gates_after(folder):
        trainer = _trainer(tmp_path / folder, sp_epochs=0, hrl_iterations=3, baseline="self_critical")
        trainer.train()
        return trainer.gates.state_dict()

    a, b = gates_after("a"), gates_after("b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["ff1", "ff2", "rnn"])
def test_every_gate_trains_through_hrl(kind, tmp_path):
    """Regression: the feedforward gates kept a view of the environment's activation, which the next
    step overwrites in place, and HRL's backward failed ("modified by an inplace operation")."""
    net = tiny_backbone(20)
    data = backbones.load_dataset("digits", "val")
    hc = HybridConfig.flat(sp_epochs=0, hrl_iterations=2, baseline="self_critical")
    gates = create_gates(kind, net)
    before = {k: v.clone() for k, v in gates.state_dict().items()}
    trainer = HybridTrainer(
        net, gates, data, hc, torch.device("cpu"), tmp_path / "agent.pt", {}, progress=False, num_envs=32
    )
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in gates.state_dict().items())


@pytest.mark.parametrize("route", ["sampled", "greedy"])
def test_hrl_cross_entropy_trains_the_backbone_through_the_route_asked_for(route, tmp_path):
    """--hrl-ce-route greedy: the backbone learns the routes the evaluation takes. Gates at p = 0.45
    everywhere: the greedy route skips every gated block, sampled routes run about half of them; with
    the REINFORCE term off, only the cross-entropy trains the backbone."""
    trainer = _trainer(
        tmp_path, sp_epochs=0, hrl_iterations=1, finetune_backbone=True, rl_weight=0.0, ce_route=route, finetune_lr=1e-2
    )
    with torch.no_grad():
        trainer.gates.out.weight.zero_()
        trainer.gates.out.bias.fill_(-0.2)  # logit -0.2: p(execute) = 0.45
        trainer.gates.position_bias.zero_()
    gated = trainer.backbone.blocks[1].conv1.weight
    before, stem = gated.clone(), trainer.backbone.blocks[0].conv1.weight.clone()  # block 0 always runs
    trainer.train()
    assert not torch.equal(stem, trainer.backbone.blocks[0].conv1.weight)
    assert torch.equal(before, gated) == (route == "greedy")  # a block the greedy route skips learns nothing
