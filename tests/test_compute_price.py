"""The price of compute: a fixed alpha, or the Lagrange multiplier that meets a FLOPs budget."""

import pytest
import torch

import backbones
from agents.compute_price import ComputePrice, SpendingMeter
from agents.evaluate import evaluate
from agents.gates import create_gates
from agents.hybrid import HybridConfig, HybridTrainer, sp_forward
from agents.policies import GateRoutingPolicy
from tests.conftest import tiny_backbone


def test_the_multiplier_rises_over_budget_and_falls_under_it():
    price = ComputePrice(1.0, 0.5, step=1.0, device=torch.device("cpu"))
    price.update(torch.tensor([0.7, 0.9]))  # spent 0.8: 0.3 over
    assert price.value.item() == pytest.approx(1.3)
    price.update(torch.tensor(0.1))  # 0.4 under
    assert price.value.item() == pytest.approx(0.9)
    fixed = ComputePrice(2.0, None, step=1.0, device=torch.device("cpu"))
    fixed.update(torch.tensor(1.0))
    assert fixed.value.item() == 2.0
    with pytest.raises(ValueError, match="budget must be"):
        ComputePrice(1.0, 1.5, step=1.0, device=torch.device("cpu"))


def test_the_budget_term_pulls_the_spending_toward_the_budget_from_both_sides():
    price = ComputePrice(0.0, 0.5, step=1.0, device=torch.device("cpu"), gain=10.0)
    for spent, sign in ((0.2, -1), (1.0, 1)):
        added = torch.full((4,), 0.3, requires_grad=True)
        price.loss(added, torch.full((4,), spent)).backward()
        assert torch.sign(added.grad).eq(sign).all()  # under budget the gradient asks for more compute


def test_the_meter_counts_what_the_evaluation_counts(digits_test):
    """The FLOPs fraction SP prices is the one the evaluation reports, gates included."""
    net = tiny_backbone(20)
    gates = create_gates("rnn", net)
    meter = SpendingMeter(net, gates, torch.device("cpu"))
    x, _ = digits_test.batch(torch.arange(len(digits_test)))
    with torch.no_grad():
        gates.out.weight.normal_(0, 3.0)  # decisions that differ from image to image
        _, _, greedy = sp_forward(net, gates, x)
    result = evaluate(GateRoutingPolicy(gates.eval(), "g"), net, digits_test, torch.device("cpu"), precision="fp32")
    assert meter.spent(greedy).mean().item() == pytest.approx(result.flops_fraction, rel=1e-4)


@pytest.mark.slow
def test_sp_with_a_budget_lands_near_it(tmp_path):
    """With --budget, SP's compute weight moves until the greedy gates spend the budget: two budgets
    far apart land near each, from the same alpha."""
    from backbones.pretrained import get_trained

    net, _ = get_trained("cifar_resnet20", "digits", width=0.25, epochs=6, progress=False)
    data = backbones.load_dataset("digits", "train")
    spent = {}
    for budget in (0.3, 0.8):
        torch.manual_seed(0)
        # thresholded gates: the spending priced is the evaluation's exactly (sampled gates price the
        # greedy decisions along the sampled route, an estimate; measured in BENCHMARKS.md)
        cfg = HybridConfig.flat(sp_batch=64, sp_epochs=5, sp_lr=5e-2, hrl_iterations=0, sp_sample=False)
        gates = create_gates("rnn", net)
        trainer = HybridTrainer(
            net, gates, data, cfg, torch.device("cpu"), tmp_path / f"{budget}.pt", {}, num_envs=128, budget=budget
        )
        trainer.progress = False
        trainer.train_sp()
        result = evaluate(GateRoutingPolicy(gates.eval(), "g"), net, data, torch.device("cpu"), precision="fp32")
        spent[budget] = result.flops_fraction
    # a barely trained tiny network, 100 steps per budget (0.27 and 0.81 here): near, not on
    # (the embedded set's figures are in BENCHMARKS)
    assert abs(spent[0.3] - 0.3) < 0.15 and abs(spent[0.8] - 0.8) < 0.15 and spent[0.8] - spent[0.3] > 0.3, spent


def test_a_negative_multiplier_reaches_the_reward(tmp_path):
    """Regression: a budget above what the gates want drove the multiplier below 0, and HRL's
    environment refused the negative alpha (the run crashed after SP); then it was clamped at 0, which
    left HRL no pull towards the budget from below. The reward takes it: compute rewarded."""
    net = tiny_backbone(20)
    data = backbones.load_dataset("digits", "val")
    cfg = HybridConfig.flat(sp_epochs=0, hrl_iterations=1)
    trainer = HybridTrainer(
        net, create_gates("rnn", net), data, cfg, torch.device("cpu"), tmp_path / "a.pt", {}, num_envs=32, budget=0.9
    )
    trainer.price.value = torch.tensor(-0.5)
    assert trainer.hrl_alpha == -0.5
    trainer.progress = False
    trainer.train()
