import pytest
import torch

import backbones
from agents.evaluate import evaluate
from agents.fixed import random_rate_for_budget, search_static, static_flops_fraction
from agents.gates import create_gates
from agents.policies import GateRoutingPolicy, RandomPolicy, RoutingPolicy, StaticPolicy
from tests.conftest import tiny_backbone

CPU = torch.device("cpu")


ONE_BATCH = 256


@pytest.fixture(scope="module")
def setup():
    return tiny_backbone(20), backbones.load_dataset("digits", "val")


def test_full_policy_evaluates_to_the_backbone(setup):
    net, data = setup
    r = evaluate(RoutingPolicy(), net, data, CPU, batch_size=64)  # several batches, a ragged last one
    with torch.no_grad():
        x, y = data.batch(torch.arange(len(data)))
        expected = (net(x).argmax(1) == y).float().mean().item()
    assert r.accuracy == pytest.approx(expected)
    assert r.flops_fraction == pytest.approx(1.0) and r.policy_flops_fraction == 0.0
    assert r.blocks_executed == 9 and r.computation_percent == pytest.approx(100.0)
    assert r.execute_rate == [1.0] * 8 and r.num_images == len(data)


def test_static_policy_spends_what_its_mask_says(setup):
    net, data = setup
    mask = [True, False] * 4
    r = evaluate(StaticPolicy(mask), net, data, CPU)
    assert r.flops_fraction == pytest.approx(static_flops_fraction(net, mask))
    assert r.execute_rate == [float(m) for m in mask]
    assert r.computation_percent == pytest.approx(100 * 5 / 9)


def test_random_policy_matches_its_budget(setup):
    net, data = setup
    rate = random_rate_for_budget(net, 0.5)
    r = evaluate(RandomPolicy(rate, seed=1), net, data, CPU)
    assert r.flops_fraction == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError):
        RandomPolicy(1.5)


def test_gate_policy_pays_for_its_gates(setup):
    net, data = setup
    gates = create_gates("ff2", net)
    r = evaluate(GateRoutingPolicy(gates, "ff2"), net, data, CPU)
    assert r.policy_flops_fraction == pytest.approx(sum(gates.flops) / net.flops.full)
    assert r.flops_fraction == pytest.approx(r.backbone_flops_fraction + r.policy_flops_fraction)


def test_static_search_meets_the_budget(setup):
    net, data = setup
    policy = search_static(net, data, 0.6, CPU, progress=False)
    assert static_flops_fraction(net, policy.mask) <= 0.6
    assert sum(policy.mask) >= 1
    with pytest.raises(ValueError, match="budget"):
        search_static(net, data, 0.0, CPU)


def test_static_mixture_spends_the_budget_exactly(setup):
    from agents.fixed import elimination_path, static_for_budget

    net, data = setup
    path = elimination_path(net, data, CPU, progress=False)
    flops = [f for f, _ in path]
    assert flops == sorted(flops, reverse=True) and path[0][1] == [True] * 8
    budget = (flops[3] + flops[4]) / 2  # between two subsets on the path
    pure = static_for_budget(path, budget)
    assert pure.mask == path[4][1] and static_flops_fraction(net, pure.mask) < budget
    mixed = static_for_budget(path, budget, mix=True, seed=1)
    assert mixed.mask == path[4][1] and mixed.mask_more == path[3][1] and mixed.share_more == pytest.approx(0.5)
    r = evaluate(mixed, net, data, CPU)
    assert r.flops_fraction == pytest.approx(budget, abs=0.03)  # on average over the images
    assert r.execute_rate == pytest.approx([float(m) for m in path[4][1]], abs=0.6)


def test_elimination_scores_each_removal_exactly(setup):
    """With one drop per round the path is exact greedy elimination: the cached-prefix scores
    pick the block a brute-force search over full forwards picks."""
    import torch.nn.functional as F

    from agents.fixed import elimination_path
    from skipnet_env.routing import routed_forward

    net, data = setup
    x, y = data.batch(torch.arange(len(data)))
    path = elimination_path(net, data, CPU, max_images=len(data), rerank=1e-3, progress=False, precision="fp32")
    mask = [True] * 8
    for step in range(3):
        scores = {}
        for k in (j for j in range(8) if mask[j]):
            trial = [run and j != k for j, run in enumerate(mask)]
            with torch.no_grad():
                logits = routed_forward(net, x, torch.tensor([[True] + trial] * len(y)))
            scores[k] = float(F.cross_entropy(logits, y))
        best = min(scores, key=scores.get)
        mask = [run and j != best for j, run in enumerate(mask)]
        assert path[step + 1][1] == mask
    with pytest.raises(ValueError, match="rerank"):
        elimination_path(net, data, CPU, rerank=0.0)


def test_a_calibrated_threshold_spends_the_budget_on_the_images_it_was_calibrated_on(setup, monkeypatch):
    """Gates trained for a budget land a few points off it on other images; the threshold moves until
    they spend it (a secant search over the logit threshold, in a few evaluations), and a gate that
    already does keeps its own."""
    import sys

    from agents.evaluate import CALIBRATION_TOLERANCE, ThresholdSearch, calibrate_threshold

    module = sys.modules["agents.evaluate"]  # the package's name `evaluate` is the function

    net, data = setup  # each evaluation one batch of the 180 images
    torch.manual_seed(0)
    gates = create_gates("rnn", net)
    with torch.no_grad():
        gates.out.weight.normal_(0, 2.0)  # per-image decisions, not all-or-nothing
    policy = GateRoutingPolicy(gates.eval(), "hybrid_rnn")
    start = evaluate(policy, net, data, CPU, ONE_BATCH).flops_fraction
    calls = []
    monkeypatch.setattr(module, "evaluate", lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    for budget in (0.5, 0.75):
        calls.clear()
        threshold, result = calibrate_threshold(policy, net, data, budget, CPU, ONE_BATCH)
        assert abs(result.flops_fraction - budget) <= CALIBRATION_TOLERANCE, (start, threshold, result.flops_fraction)
        assert len(calls) <= 9  # a bisection over [-12, 12] took 11 for each here
        assert policy.threshold == threshold
        assert (
            evaluate(policy, net, data, CPU, ONE_BATCH).flops_fraction == result.flops_fraction
        )  # what evaluation uses
    policy.threshold = 0.0
    threshold, _ = calibrate_threshold(policy, net, data, start, CPU, ONE_BATCH)
    assert threshold == 0.0  # within the tolerance already: p >= 0.5 stays
    _, result = calibrate_threshold(
        policy, net, data, 0.01, CPU, ONE_BATCH
    )  # below what skipping every gated block costs
    floor = evaluate(GateRoutingPolicy(gates, "hybrid_rnn", 12.0), net, data, CPU, ONE_BATCH).flops_fraction
    assert 0.01 < result.flops_fraction <= floor + 1e-9  # the closest it can get
    # the search: outward in doubling steps until the budget is bracketed, then the Illinois method inside
    search = ThresholdSearch(0.5)
    assert search.next(0.0, 0.9) == 1.0 and search.next(1.0, 0.8) == 3.0 and search.next(3.0, 0.7) == 7.0
    assert search.next(7.0, 0.1) == pytest.approx(3.0 + 4.0 * 0.2 / 0.6)  # between 3 (+0.2) and 7 (-0.4)
    assert search.next(4.4, 0.3) == pytest.approx(3.0 + 1.4 * 0.1 / 0.3)  # below kept twice: the +0.2 end halved
    assert ThresholdSearch(0.5).next(-11.5, 0.1) == -12.0  # within the logits' range
    search = ThresholdSearch(0.5)  # where an interpolation does not halve the bracket, the next step bisects it
    assert search.next(0.0, 0.9) == 1.0 and search.next(1.0, 0.1) == pytest.approx(0.5)
    assert search.next(0.9, 0.45) == pytest.approx(0.45)  # the bracket [0, 0.9] is more than half of [0, 1]


def test_a_policy_that_exits_is_evaluated_in_the_env_with_the_exit_action(setup):
    """``early_exit`` policies: the evaluation gives them the exited flag in the observation and
    skips every block after an image's exit, whatever the policy asks for later."""
    net, data = setup
    n = len(data)
    at = torch.arange(n) % 9  # image i exits before gated block i % 9 (8: never)

    class ExitAt(RoutingPolicy):
        early_exit = True

        def reset(self, batch_size, device):
            self.exited, self.flags = torch.zeros(batch_size, dtype=torch.bool), []

        def act(self, obs, activation, k):
            self.flags.append(obs[:, -2].clone())
            self.exited |= at[: obs.shape[0]] == k
            return torch.ones(obs.shape[0], dtype=torch.bool)  # asks for every block: the exits must win

    policy = ExitAt()
    result = evaluate(policy, net, data, CPU, ONE_BATCH)
    assert torch.equal(torch.from_numpy(result.per_image["executed"]), torch.arange(8)[None, :] < at[:, None])
    for k, flag in enumerate(policy.flags):  # what the policy saw: the exits before block k
        assert torch.equal(flag, (at < k).float())
