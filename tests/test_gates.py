import pytest
import torch

from agents.gates import FeedforwardGates, RecurrentGate, create_gates
from tests.conftest import tiny_backbone


@pytest.fixture(scope="module")
def net():
    return tiny_backbone(20)


@pytest.mark.parametrize("kind", ["rnn", "ff1", "ff2"])
def test_one_logit_per_image_per_gated_block(net, kind):
    gates = create_gates(kind, net)
    assert gates.num_gates == 8
    state = gates.initial_state(5, torch.device("cpu"))
    for k, shape in enumerate(gates.input_shapes):
        logit, state = gates(torch.randn(5, *shape), k, state)
        assert logit.shape == (5,)


def test_gate_flops_are_counted_and_in_the_papers_proportions():
    net = tiny_backbone(38)
    block = net.flops.block_executed[1:]
    plain = [s == 0 for s in net.flops.block_skipped[1:]]  # not downsampling: gate and block see the same map
    ratio = {
        kind: [g / b for g, b, p in zip(create_gates(kind, net).flops, block, plain) if p]
        for kind in ("ff1", "ff2", "rnn")
    }
    assert all(0.12 < r < 0.2 for r in ratio["ff1"])  # FFGate-I: paper ~19%
    assert all(abs(r - 0.125) < 0.01 for r in ratio["ff2"])  # FFGate-II: paper 12.5%
    assert all(0 < r < 0.05 for r in ratio["rnn"])  # recurrent: a tiny fraction


def test_recurrent_state_carries_across_blocks(net):
    gates = RecurrentGate(net)
    h = torch.randn(3, *gates.input_shapes[1])
    fresh, _ = gates(h, 1, gates.initial_state(3, torch.device("cpu")))
    _, state = gates(torch.randn(3, *gates.input_shapes[0]), 0, gates.initial_state(3, torch.device("cpu")))
    carried, _ = gates(h, 1, state)
    assert not torch.allclose(fresh, carried)


def test_gates_start_by_executing(net):
    gates = FeedforwardGates(net)
    logit, _ = gates(torch.randn(4, *gates.input_shapes[0]), 0)
    assert (torch.sigmoid(logit) > 0.5).all()


def test_unknown_gate_kind(net):
    with pytest.raises(ValueError, match="rnn"):
        create_gates("transformer", net)


def test_position_bias_shifts_one_block_and_pooling_options(net):
    gates = RecurrentGate(net, position_bias=True, pooling="mean_max_std")
    h = torch.randn(3, *gates.input_shapes[2])
    state = gates.initial_state(3, torch.device("cpu"))
    before, _ = gates(h, 2, state)
    with torch.no_grad():
        gates.position_bias[2] += 1.5
    after, _ = gates(h, 2, state)
    torch.testing.assert_close(after, before + 1.5)
    assert gates.proj[str(h.shape[1])].in_features == 3 * h.shape[1]  # mean, max and std of each channel
    with pytest.raises(ValueError, match="mean_max_std"):
        RecurrentGate(net, pooling="median")


@pytest.mark.parametrize("kind", ["rnn", "ff1"])
def test_gates_compute_in_fp32_under_a_trainers_bf16_autocast(net, kind):
    """Joint SP and the base trainer may autocast the forward to bf16: the gates' logits stay fp32
    (the thresholds and probabilities the routes and REINFORCE read), and gradients reach them."""
    gates = create_gates(kind, net)
    h = torch.randn(4, *gates.input_shapes[0], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logit, _ = gates(h, 0, gates.initial_state(4, h.device))
    assert logit.dtype == torch.float32
    logit.sum().backward()
    assert h.grad is not None and bool(h.grad.abs().sum() > 0)
