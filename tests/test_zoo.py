"""Backbones from the model zoos (timm, torchvision): split without copying their code, routed like
the project's own ResNets, ViTs included (their patch tokens travel as a grid)."""

import pytest
import torch
from gymnasium.utils.env_checker import check_env

import backbones
from agents.evaluate import evaluate
from agents.gates import create_gates
from agents.hybrid import HybridConfig, HybridTrainer
from agents.policies import RandomPolicy
from backbones.registry import create, list_backbones
from backbones.zoo import TESTED, parse_model_args
from skipnet_env.env import SkipNetEnv
from skipnet_env.routing import masked_forward, routed_forward

SMALL_VIT = {"depth": 3, "embed_dim": 32, "num_heads": 2}
CPU = torch.device("cpu")


def _zoo(name, **args):
    torch.manual_seed(0)
    return create(name, num_classes=10, in_channels=1, image_size=16, model_args=args)


@pytest.fixture(scope="module")
def vit():
    return _zoo("timm:vit_tiny_patch16_224", **SMALL_VIT)


def _model(name, **args):
    """The zoo's own model, as the adapter built it (the same seed, the same weights)."""
    from backbones.zoo import _timm_model, _torchvision_model

    torch.manual_seed(0)
    source, _, model = name.partition(":")
    if source == "timm":
        return _timm_model(model, 10, 1, 16, dict(args))
    return _torchvision_model(model, 10, 1, dict(args))


# a ViT with a class token read by the head and register tokens, and one whose head pools by attention
PREFIXED_VIT = {**SMALL_VIT, "class_token": True, "global_pool": "token", "reg_tokens": 2}
ATTENTION_POOLED_VIT = {**SMALL_VIT, "class_token": True, "global_pool": "map", "no_embed_class": True}


@pytest.mark.parametrize(
    "name,args",
    [
        ("timm:vit_tiny_patch16_224", SMALL_VIT),
        ("timm:vit_tiny_patch16_224", PREFIXED_VIT),
        ("timm:vit_tiny_patch16_224", ATTENTION_POOLED_VIT),
        ("timm:resnet18", {}),
        ("torchvision:resnet18", {}),
    ],
)
def test_a_zoo_model_split_into_stem_blocks_head_computes_what_the_model_does(name, args):
    backbone, model = _zoo(name, **args), _model(name, **args).eval()
    with torch.no_grad():  # class and register tokens that differ from what an initialisation gives, in both
        for token in ("cls_token", "reg_token"):
            if getattr(model, token, None) is not None:
                getattr(model, token).normal_()
                getattr(backbone.stem, token).copy_(getattr(model, token))
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), model(x), rtol=1e-4, atol=1e-5)
        execute = torch.rand(4, backbone.num_blocks) < 0.5  # and routes row by row as the masked forward
        torch.testing.assert_close(routed_forward(backbone, x, execute), masked_forward(backbone, x, execute))
    assert name in list_backbones()


@pytest.mark.filterwarnings("ignore:.*Box observation space m.* value is .*infinity")
def test_class_and_register_tokens_travel_as_a_column_and_the_env_checker_passes():
    vit = _zoo("timm:vit_tiny_patch16_224", **PREFIXED_VIT)
    assert vit.activation_shapes[0] == (32, 1 + 2 + 64, 1)  # class, 2 registers, an 8x8 grid of patches
    data = backbones.load_dataset("digits", "val")
    check_env(SkipNetEnv(vit, data, device="cpu"), skip_render_check=True)
    assert 0.3 < evaluate(RandomPolicy(0.5), vit, data, CPU).flops_fraction < 0.8


def test_a_vit_block_reads_tokens_and_is_the_identity_when_skipped(vit):
    assert vit.num_blocks == 3 and vit.activation_shapes[0] == (32, 8, 8)  # 16 px, 2 px patches: an 8x8 grid
    h = torch.randn(2, 32, 8, 8)
    assert torch.equal(vit.blocks[1].shortcut(h), h)
    tokens = h.flatten(2).transpose(1, 2)  # (B, 64, 32): what the timm block sees
    with torch.no_grad():
        torch.testing.assert_close(vit.blocks[1](h), vit.blocks[1].block(tokens).transpose(1, 2).reshape(2, 32, 8, 8))
    # the stem lays the tokens out token by token, so every block reads the sequence without a copy
    with torch.no_grad():
        grid = vit.stem(torch.randn(2, 1, 16, 16))
        out = vit.blocks[0](grid)
    for a in (grid, out):
        assert a.shape == (2, 32, 8, 8) and a.flatten(2).transpose(1, 2).is_contiguous()
    # attention's FLOPs are counted (the fused CPU kernel counts none): 4 matmuls of the attention per block
    n, d = 64, 32
    linear = 2 * n * d * (3 * d + d + 4 * d + 4 * d)
    assert vit.flops.block_executed[0] == linear + 2 * 2 * n * n * d


@pytest.mark.filterwarnings("ignore:.*Box observation space m.* value is .*infinity")
def test_every_agent_kind_runs_on_a_vit(vit, tmp_path):
    data = backbones.load_dataset("digits", "val")
    env = SkipNetEnv(vit, data, device="cpu")
    check_env(env, skip_render_check=True)
    half = evaluate(RandomPolicy(0.5), vit, data, CPU)
    assert 0.3 < half.flops_fraction < 0.8  # skipped blocks cost nothing
    trainer = HybridTrainer(
        vit, create_gates("rnn", vit), data, HybridConfig.flat(sp_epochs=1, hrl_iterations=2, sp_batch=64), CPU,
        tmp_path / "agent.pt", {}, progress=False, num_envs=32,
    )  # fmt: skip
    trainer.train()
    assert (tmp_path / "agent.pt").is_file()


def test_a_model_the_adapters_cannot_split_is_named_with_what_was_looked_for():
    with pytest.raises(ValueError, match="looked for residual stages .* and flat transformer blocks"):
        _zoo("torchvision:mobilenet_v2")
    with pytest.raises(ValueError, match="timm has no model 'no_such_net'"):
        _zoo("timm:no_such_net")
    with pytest.raises(ValueError, match="dynamic_img_size and patch_drop_rate change the token grid"):
        _zoo("timm:vit_tiny_patch16_224", dynamic_img_size=True, **SMALL_VIT)


def test_model_args_are_python_literals_or_strings():
    assert parse_model_args(("depth=6", "qkv_bias=False", "act_layer=gelu", "img_size=(24, 24)")) == {
        "depth": 6, "qkv_bias": False, "act_layer": "gelu", "img_size": (24, 24)
    }  # fmt: skip
    with pytest.raises(ValueError, match="key=value pairs"):
        parse_model_args(("depth",))


def test_confidence_exit_skips_every_block_after_a_confident_prediction(vit):
    from agents.policies import ConfidenceExitPolicy
    from backbones.exits import SharedHead, exit_classifier

    data = backbones.load_dataset("digits", "val")
    head = exit_classifier(vit)  # a ViT's head reads any depth: its own head at every block
    assert isinstance(head, SharedHead) and head.head is vit.head
    never, always = ConfidenceExitPolicy(head, -30.0), ConfidenceExitPolicy(head, 30.0)  # confidence 1, ~0
    assert evaluate(never, vit, data, CPU).execute_rate == [1.0, 1.0]
    assert evaluate(always, vit, data, CPU).execute_rate == [0.0, 0.0]
    with torch.no_grad():  # an image exits once, and stays out
        policy = ConfidenceExitPolicy(head, 0.0)
        policy.reset(3, CPU)
        policy.exited[1] = True
        assert not policy.act(None, torch.randn(3, 32, 8, 8), 0)[1]


@pytest.mark.filterwarnings("ignore:.*Box observation space m.* value is .*infinity")
def test_an_exit_ends_a_vit_episode_and_its_head_classifies_from_there(vit):
    """``SkipNet-v0`` with ``early_exit``: action 2 ends the episode at a block; the reward, the
    prediction and the FLOPs are those of the route that ran (every later block skipped)."""
    data = backbones.load_dataset("digits", "val")
    env = SkipNetEnv(vit, data, device="cpu", early_exit=True, alpha=0.5)
    check_env(env, skip_render_check=True)
    assert env.action_space.n == 3
    env.reset(options={"index": 5})
    _, first, terminated, _, _ = env.step(1)  # the first gated block runs
    assert not terminated and first == 0.0
    obs, reward, terminated, _, info = env.step(2)  # exits before the second (the last of this ViT)
    assert terminated and info["exited"] and info["executed"].tolist() == [True, False]
    assert obs[-2] == 1.0  # the exited flag
    x, y = data.batch(torch.tensor([5]))
    with torch.no_grad():
        logits = masked_forward(vit, x, torch.tensor([[True, True, False]]))
    assert info["prediction"] == int(logits.argmax(1)) and info["correct"] == (info["prediction"] == int(y))
    flops = vit.flops
    spent = flops.stem + flops.block_executed[0] + flops.block_executed[1] + flops.head  # the last block: identity
    assert info["flops"] == pytest.approx(spent)
    assert reward == pytest.approx(float(info["correct"]) - 0.5 * spent / flops.full)


def test_learned_exit_scores_where_the_head_is_right_and_its_threshold_moves_the_exits(vit):
    from agents.early_exit import LearnedExitConfig, LearnedExitPolicy, depth_outcomes, fit_scorer
    from backbones.exits import SharedHead

    data = backbones.load_dataset("digits", "val")
    head = SharedHead(vit.head)
    features, right = depth_outcomes(vit, head, data, CPU, 64)
    assert features.shape == (len(data), 2, 32 + 3 + 2) and right.shape == (len(data), 2)
    x, y = data.batch(torch.arange(len(data)))
    with torch.no_grad():  # the second gated block's target: the head on the activation entering it
        entering = vit.blocks[1](vit.enter(x, 1))
        assert torch.equal(right[:, 1].bool(), vit.head(entering).argmax(1) == y)
    scorer = fit_scorer(features, right, LearnedExitConfig(epochs=2), seed=0)
    assert scorer.first == 32 and fit_scorer(features, right, LearnedExitConfig(epochs=1, tokens=True), 0).first == 0
    # the fit learns what a feature says: a rule of the first feature, on features of that shape
    g = torch.Generator().manual_seed(0)
    made = torch.randn(2000, features.shape[-1], generator=g)
    every_input = LearnedExitConfig(epochs=10, lr=1e-2, tokens=True)
    fitted = fit_scorer(made[:, None], (made[:, :1] > 0.3).float(), every_input, seed=0)
    with torch.no_grad():
        assert ((fitted(made) > 0) == (made[:, 0] > 0.3)).float().mean() > 0.95
    stay, leave = LearnedExitPolicy(head, scorer, 2, -30.0), LearnedExitPolicy(head, scorer, 2, 30.0)
    assert evaluate(stay, vit, data, CPU).execute_rate == [1.0, 1.0]
    assert evaluate(leave, vit, data, CPU).execute_rate == [0.0, 0.0]


@pytest.mark.slow
@pytest.mark.parametrize("name", TESTED)
@pytest.mark.parametrize("side", [16, 24])  # the embedded data sets: digits, cluttered_digits
def test_every_listed_zoo_backbone_routes_with_its_defaults_on_the_embedded_data(name, side):
    """What ``backbones.list_backbones()`` names works with no model arguments at the embedded data
    sets' sizes (16 px digits, 24 px cluttered digits; one channel, ten classes): routed as masked."""
    torch.manual_seed(0)
    net = create(name, num_classes=10, in_channels=1, image_size=side)
    x, n = torch.randn(3, 1, side, side), net.num_blocks
    execute = torch.tensor([[True] * n, [i % 2 == 0 for i in range(n)], [i == 0 for i in range(n)]])
    with torch.no_grad():
        assert net(x).shape == (3, 10)
        torch.testing.assert_close(routed_forward(net, x, execute), masked_forward(net, x, execute))
