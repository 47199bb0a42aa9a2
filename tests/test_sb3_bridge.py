import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv

import backbones
from skipnet_env.env import SkipNetEnv
from skipnet_env.sb3_bridge import SB3VecEnv, make_sb3_env
from skipnet_env.vector_env import SkipNetVectorEnv
from tests.conftest import tiny_backbone


def test_ppo_trains_on_the_batched_env():
    net, data = tiny_backbone(20), backbones.load_dataset("digits", "test")
    env = make_sb3_env(8, backbone=net, dataset=data, device="cpu", alpha=0.5)
    model = PPO("MlpPolicy", env, n_steps=16, batch_size=32, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=256)
    assert len(model.ep_info_buffer) > 0  # episodes finished and were monitored
    obs = env.reset()
    actions, _ = model.predict(obs, deterministic=True)
    assert actions.shape == (8,)


def test_bridge_reports_terminal_observations_and_seeds():
    net, data = tiny_backbone(20), backbones.load_dataset("digits", "test")
    env = SB3VecEnv(SkipNetVectorEnv(4, net, data, device="cpu"))
    env.seed(7)
    first = env.reset()
    env.seed(7)
    np.testing.assert_array_equal(env.reset(), first)
    for _ in range(8):
        obs, reward, dones, infos = env.step(np.ones(4, dtype=np.int64))
    assert dones.all()
    assert infos[0]["terminal_observation"].shape == first.shape[1:]
    assert infos[0]["flops_fraction"] == 1.0
    assert env.get_attr("num_gates") == [8] * 4


def test_single_env_also_works_in_sb3_dummy_vec_env():
    net, data = tiny_backbone(20), backbones.load_dataset("digits", "test")
    env = DummyVecEnv([lambda: SkipNetEnv(net, data, device="cpu")] * 2)
    env.reset()
    obs, reward, dones, infos = env.step(np.array([1, 0]))
    assert obs.shape == (2, 25)


def test_an_sb3_agent_leaves_no_folder_in_the_temporary_one(tmp_path, monkeypatch):
    """SB3's default logger made an empty SB3-<time> folder in /tmp at every learn(), each run's."""
    import tempfile

    import torch

    from agents.sb3_agents import build_model

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    net, data = tiny_backbone(20), backbones.load_dataset("digits", "test")
    model = build_model("ppo", make_sb3_env(8, backbone=net, dataset=data, device="cpu"), 0, torch.device("cpu"), 8)
    model.learn(total_timesteps=128)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_ppo_cloned_from_gates_takes_their_decisions_and_a_threshold_moves_them():
    """``--sb3-distill-epochs``: PPO's policy fitted to the recipe's gates on the environment's
    observations decides as they do; its log-odds threshold (what a calibration moves) trades blocks."""
    import torch

    from agents.evaluate import evaluate
    from agents.gates import create_gates
    from agents.policies import SB3RoutingPolicy
    from agents.sb3_agents import build_model, distill_from_gates

    net, data, cpu = tiny_backbone(), backbones.load_dataset("digits", "val"), torch.device("cpu")
    gates = create_gates("ff1", net).eval()
    pattern = [k % 2 == 0 for k in range(gates.num_gates)]  # every other block: learnable from the position alone
    with torch.no_grad():
        for gate, run in zip(gates.gates, pattern):
            gate[-2].weight.zero_()
            gate[-2].bias.fill_(8.0 if run else -8.0)
    env = make_sb3_env(32, "SkipNet-v0", backbone=net, dataset=data, device="cpu")
    model = build_model("ppo", env, seed=0, device=cpu, episode_length=gates.num_gates)
    fit = distill_from_gates(model, gates, net, data, cpu, epochs=100, alpha=0.5)  # 100 steps of 180 images
    assert fit["agreement"] > 0.95
    rates = evaluate(SB3RoutingPolicy(model, "ppo"), net, data, cpu).execute_rate
    assert [r > 0.5 for r in rates] == pattern
    fewer = evaluate(SB3RoutingPolicy(model, "ppo", threshold=50.0), net, data, cpu)
    assert sum(fewer.execute_rate) == 0  # no block is that likely


def test_a_clone_of_thresholded_gates_starts_from_their_decisions_with_distill_explore():
    """Joint SP's gates have logits near 0 (thresholds, not probabilities): cloned as they are, the
    policy RL samples from flips coins; ``--sb3-distill-explore`` sharpens the targets by one scale, so
    the cloned policy takes the gates' decisions with high probability."""
    import torch

    from agents.gates import create_gates
    from agents.sb3_agents import action_logits, build_model, distill_from_gates

    net, data, cpu = tiny_backbone(), backbones.load_dataset("digits", "val"), torch.device("cpu")
    gates = create_gates("ff1", net).eval()
    pattern = [k % 2 == 0 for k in range(gates.num_gates)]
    with torch.no_grad():
        for gate, run in zip(gates.gates, pattern):
            gate[-2].weight.zero_()
            gate[-2].bias.fill_(0.02 if run else -0.02)  # the right decision, barely
    env = make_sb3_env(32, "SkipNet-v0", backbone=net, dataset=data, device="cpu")
    obs = torch.as_tensor(env.reset()).float()  # the first block's observations
    taken = {}
    for explore in (None, 0.05):
        model = build_model("ppo", env, seed=0, device=cpu, episode_length=gates.num_gates)
        fit = distill_from_gates(model, gates, net, data, cpu, epochs=40, alpha=0.5, explore=explore)
        assert (fit["scale"] > 50) == (explore is not None)
        with torch.no_grad():
            taken[explore] = torch.softmax(action_logits(model.policy, obs), 1)[:, int(pattern[0])].mean().item()
    assert taken[None] < 0.6 and taken[0.05] > 0.8


def test_no_timesteps_is_only_for_a_cloned_policy():
    from agents.sb3_agents import SB3Config

    with pytest.raises(ValueError, match="--sb3-timesteps 0 would evaluate an untrained policy"):
        SB3Config(timesteps=0)
    assert SB3Config(timesteps=0, distill_epochs=3).timesteps == 0


def test_an_sb3_agents_learning_rate_is_the_one_asked_for():
    import torch

    from agents.sb3_agents import build_model

    net = tiny_backbone()
    env = make_sb3_env(8, "SkipNet-v0", backbone=net, dataset=backbones.load_dataset("digits", "val"), device="cpu")
    model = build_model("ppo", env, seed=0, device=torch.device("cpu"), episode_length=8, learning_rate=1e-5)
    model.learn(total_timesteps=128)
    assert [g["lr"] for g in model.policy.optimizer.param_groups] == [1e-5]


def test_recurrent_ppo_from_gates_is_the_gates_and_learns_from_there():
    """``--sb3-from-gates``: RecurrentPPO's actor given the recurrent gate's structure and weights
    decides as the gates do, image for image, at any threshold; its log-odds are the gate's logit
    times the exploration scale; PPO then trains it."""
    import torch

    from agents.evaluate import evaluate
    from agents.gates import create_gates
    from agents.policies import GateRoutingPolicy, SB3RoutingPolicy
    from agents.sb3_agents import build_model
    from agents.sb3_from_gates import load_gates_into

    net, data, cpu = tiny_backbone(), backbones.load_dataset("digits", "val"), torch.device("cpu")
    gates = create_gates("rnn", net).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # gates that decide per image: some blocks run, some not
        for p in gates.parameters():
            p.copy_(torch.randn_like(p))
    env = make_sb3_env(16, "SkipNet-v0", backbone=net, dataset=data, device="cpu")
    model = build_model("recurrent_ppo", env, seed=0, device=cpu, episode_length=gates.num_gates, gates=gates)
    load_gates_into(model.policy, gates, scale=3.0)
    for threshold in (0.0, 0.4):
        theirs = evaluate(GateRoutingPolicy(gates, "gates", threshold), net, data, cpu)
        ours = evaluate(SB3RoutingPolicy(model, "recurrent_ppo", 3.0 * threshold), net, data, cpu)
        np.testing.assert_array_equal(ours.per_image["executed"], theirs.per_image["executed"])
        assert 0.1 < np.mean(theirs.per_image["executed"]) < 0.9
        np.testing.assert_array_equal(ours.per_image["correct"], theirs.per_image["correct"])
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=16 * gates.num_gates * 2)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.parameters()))


def test_from_gates_refuses_gates_it_cannot_be():
    import torch

    from agents.gates import create_gates
    from agents.sb3_agents import SB3Config, build_model

    net = tiny_backbone()
    env = make_sb3_env(8, "SkipNet-v0", backbone=net, dataset=backbones.load_dataset("digits", "val"), device="cpu")
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="FeedforwardGates"):
        build_model("recurrent_ppo", env, 0, cpu, 8, gates=create_gates("ff1", net))
    with pytest.raises(ValueError, match="--rnn-pooling mean"):
        build_model("recurrent_ppo", env, 0, cpu, 8, gates=create_gates("rnn", net, pooling="mean_max_std"))
    with pytest.raises(ValueError, match="not ppo's"):
        build_model("ppo", env, 0, cpu, 8, gates=create_gates("rnn", net))
    with pytest.raises(ValueError, match="give one"):
        SB3Config(from_gates=True, distill_epochs=2)
    assert SB3Config(timesteps=0, from_gates=True).timesteps == 0


def test_hold_budget_raises_the_price_of_compute_while_the_policy_spends_more_and_saves_it(tmp_path):
    """``--sb3-hold-budget``: the reward's alpha follows a budget's multiplier, stepped after each
    rollout from what its episodes spent; the price is handed to the checkpoint and resumed."""
    import torch

    from agents.compute_price import ComputePrice
    from agents.sb3_agents import CheckpointCallback, HoldBudget, build_model

    net = tiny_backbone()
    env = make_sb3_env(8, "SkipNet-v0", backbone=net, dataset=backbones.load_dataset("digits", "val"), device="cpu")
    model = build_model("ppo", env, seed=0, device=torch.device("cpu"), episode_length=8)
    extra: dict = {}
    hold = HoldBudget(ComputePrice(1.0, 0.05, torch.device("cpu")), extra, None)  # a budget no policy spends
    saver = CheckpointCallback(tmp_path / "agent.pt", {}, every=1, extra=extra)  # as the agent's train orders them
    model.learn(total_timesteps=3 * 8 * 16, callback=[hold, saver])  # 3 rollouts
    assert env.get_attr("alpha")[0] == hold.alpha > 1.0  # a new policy runs far more than 5%: the price rose
    assert float(extra["compute_price"]["value"]) > 1.0
    # regression: the checkpoint copied an empty extra dict and saved no price (a resume restarted it)
    saved = torch.load(tmp_path / "agent.pt", weights_only=True)["compute_price"]
    assert float(saved["value"]) == float(extra["compute_price"]["value"])
    resumed = HoldBudget(ComputePrice(1.0, 0.05, torch.device("cpu")), {}, {"compute_price": extra["compute_price"]})
    assert resumed.alpha == hold.alpha and float(resumed.price.value) == float(extra["compute_price"]["value"])


def test_hold_budget_on_the_greedy_route_prices_what_the_greedy_decisions_spend_along_the_episode():
    """``--sb3-hold-route greedy``: where a sampled decision left the greedy one (the taken action's
    probability < 1/2), the block's cost is moved by what executing it adds over skipping it."""
    import numpy as np
    import torch

    from agents.compute_price import ComputePrice
    from agents.sb3_agents import HoldBudget, build_model

    net = tiny_backbone()
    env = make_sb3_env(3, "SkipNet-v0", backbone=net, dataset=backbones.load_dataset("digits", "val"), device="cpu")
    model = build_model("ppo", env, seed=0, device=torch.device("cpu"), episode_length=8)
    hold = HoldBudget(ComputePrice(1.0, 0.5, torch.device("cpu")), {}, None, route="greedy")
    hold.init_callback(model)
    hold._on_training_start()
    core = env.get_attr("core")[0]
    cost = ((core.exec_flops - core.skip_flops) / core.full_flops).numpy()
    rng = np.random.default_rng(0)
    expected = np.zeros(3)
    for k in range(core.num_gates):
        taken = rng.integers(0, 2, 3)
        p_taken = rng.uniform(0.05, 0.95, 3)
        greedy = np.where(p_taken >= 0.5, taken, 1 - taken)
        expected += (greedy - taken) * cost[k]
        last = k == core.num_gates - 1
        hold.locals = {
            "actions": taken, "log_probs": torch.tensor(np.log(p_taken)), "dones": np.full(3, last),
            "infos": [{"flops_fraction": 0.4} if last else {} for _ in range(3)],
        }  # fmt: skip
        hold._on_step()
    assert hold.spent == pytest.approx(list(0.4 + expected)) and expected.any()
    assert not hold.block.any() and not hold.greedy_minus_sampled.any()  # the next episodes start afresh
    val = backbones.load_dataset("digits", "val")
    with pytest.raises(ValueError, match="two actions"):
        exits = make_sb3_env(3, "SkipNet-v0", backbone=net, dataset=val, device="cpu", early_exit=True)
        other = HoldBudget(ComputePrice(1.0, 0.5, torch.device("cpu")), {}, None, route="greedy")
        other.init_callback(build_model("ppo", exits, seed=0, device=torch.device("cpu"), episode_length=8))
        other._on_training_start()


def test_the_held_price_may_start_where_joint_sp_ended():
    """``--sb3-hold-from joint``: the compute weight of joint SP's last epoch, recorded with the
    skip-ready backbone; none where the backbone recorded no history (then --alpha)."""
    from agents.sb3_agents import joint_price

    history = [{"epoch": 1.0, "compute_weight": 3.4}, {"epoch": 2.0, "compute_weight": 0.27}]
    assert joint_price({"skip_ready": {"history": history}}) == pytest.approx(0.27)
    assert joint_price({"skip_ready": {"history": [{"compute_weight": -0.1}]}}) == 0.0  # the reward's alpha is >= 0
    assert joint_price({}) is None and joint_price({"skip_ready": {"history": []}}) is None
