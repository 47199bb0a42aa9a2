"""Early exit: by confidence (DeeBERT, CALM: the baseline of exit policies, beside static and random),
and learned (BERxiT's learning to exit).

At each gated block a classifier reads the activation entering it (:func:`backbones.exits.exit_classifier`:
the network's own head where it reads any depth, a vision transformer; on a CNN, exit heads fitted
beside the trained backbone, on its training images); once the prediction's top probability there
reaches the threshold, the image exits: every later block is skipped and the image is classified
where it stopped. The classifier's cost at every block is the policy's own FLOPs.
``--agent confidence_exit --budget B`` sets the threshold on training images so that it spends ``B``
of the FLOPs (the calibration's root search, as the gates' budgets are met).

``--agent learned_exit --budget B`` learns where to exit instead: a small network scores, at each gated
block, whether the classifier's prediction there is right (from the prediction's top probability, margin
and entropy and the block's position; ``--exit-tokens``: the activation pooled over tokens too), trained by
cross-entropy on the training images with every block run; an image exits at the first block whose
score reaches the threshold, set on training images to spend ``B`` as the confidence's is. The
classifier's and the scorer's cost at every block are the policy's FLOPs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agents.evaluate import calibrate_threshold
from agents.fixed import FIXED_POLICY_BUDGET, default_search_images
from agents.policies import ConfidenceExitPolicy, ExitPolicy, RoutingPolicy
from agents.registry import AgentContext, AgentSpec, register_agent
from backbones.base import FIRST_GATED, Backbone
from backbones.batching import batches
from backbones.checkpoint import atomic_save
from backbones.data import Dataset, ImageTensors
from backbones.exits import ExitHeads, exit_classifier, exit_shapes
from backbones.options import POSITIVE, POSITIVE_INT, check_options, option


def calibration_images(data: Dataset, device: torch.device) -> Dataset:
    """The first training images the threshold is set on (as many as the static search scores)."""
    n = default_search_images(device)
    if not isinstance(data, ImageTensors) or len(data) <= n:
        return data
    groups = None if data.groups is None else data.groups[:n]
    return dataclasses.replace(data, images=data.images[:n], labels=data.labels[:n], groups=groups, _fingerprint=None)


def exit_classifier_for(ctx: AgentContext, state: dict | None = None) -> nn.Module:
    """What classifies ``ctx.backbone``'s activations where images exit: the exit heads of the agent's
    checkpoint ``state`` where it has them; else the backbone's head where it reads any depth, else
    exit heads fitted on the training images (:func:`backbones.exits.exit_classifier`)."""
    if state is not None and "exit_heads" in state:
        heads = ExitHeads(exit_shapes(ctx.backbone), ctx.backbone.num_classes).to(ctx.device)
        heads.load_state_dict(state["exit_heads"])
        return heads.eval().requires_grad_(False)
    return exit_classifier(ctx.backbone.eval(), ctx.train_data, ctx.device, ctx.cfg.batch_sizes()[1], ctx.cfg.seed)


def calibrate_exit(ctx: AgentContext, policy: ExitPolicy, state: dict) -> ExitPolicy:
    """``policy``'s threshold set on training images to spend ``--budget`` (0.6 by default), written
    with ``state`` (and the exit heads, where it has them) to the agent's checkpoint."""
    budget = FIXED_POLICY_BUDGET if ctx.cfg.budget is None else ctx.cfg.budget
    data = calibration_images(ctx.train_data, ctx.device)
    threshold, _ = calibrate_threshold(
        policy, ctx.backbone, data, budget, ctx.device, ctx.cfg.batch_sizes()[1], ctx.cfg.precision
    )
    if policy.exit_heads is not None:
        state = {**state, "exit_heads": policy.exit_heads.state_dict()}
    atomic_save({"metadata": {**ctx.metadata, "stage": "done"}, "threshold": threshold, **state}, ctx.checkpoint)
    return policy


def _train(ctx: AgentContext, state: dict | None) -> RoutingPolicy:
    return calibrate_exit(ctx, ConfidenceExitPolicy(exit_classifier_for(ctx)), {})


def _load(ctx: AgentContext, state: dict) -> RoutingPolicy:
    return ConfidenceExitPolicy(exit_classifier_for(ctx, state), float(state["threshold"]))


def exit_features(classifier: nn.Module, activation: Tensor, k: int, num_gates: int, width: int) -> Tensor:
    """What the learned exit reads at gated block ``k`` ``(B, width + 3 + num_gates)``: the activation
    pooled over tokens (zero-padded to ``width``, the widest block's: a CNN's blocks differ), the
    classifier's prediction there (top probability, margin to the second, entropy over log C) and the
    block's one-hot position."""
    h = activation.float()
    probs = classifier(h, k).float().softmax(dim=1)
    top2 = probs.topk(2, dim=1).values
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1) / math.log(probs.shape[1])
    position = F.one_hot(torch.full((h.shape[0],), k, device=h.device), num_gates).float()
    stats = torch.stack([top2[:, 0], top2[:, 0] - top2[:, 1], entropy], dim=1)
    pooled = h.mean(dim=(2, 3))
    return torch.cat([F.pad(pooled, (0, width - pooled.shape[1])), stats, position], dim=1)


class ExitScorer(nn.Module):
    """The log-odds that the head's prediction at a block is right, from :func:`exit_features` from
    index ``first`` on (standardised by the training features' mean and deviation)."""

    mean: Tensor
    std: Tensor

    def __init__(self, features: int, hidden: int, first: int = 0) -> None:
        super().__init__()
        self.first = first
        self.register_buffer("mean", torch.zeros(features - first))
        self.register_buffer("std", torch.ones(features - first))
        self.net = nn.Sequential(nn.Linear(features - first, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: Tensor) -> Tensor:
        return self.net((features[:, self.first :] - self.mean) / self.std).squeeze(1)


class LearnedExitPolicy(ExitPolicy):
    """Exit where the scorer's log-odds that the classifier is right reaches ``-threshold``."""

    name = "learned_exit"

    def __init__(self, classifier: nn.Module, scorer: ExitScorer, num_gates: int, threshold: float = 0.0) -> None:
        super().__init__(classifier, threshold)
        self.scorer, self.num_gates = scorer.eval(), num_gates
        self.width = scorer.first + scorer.mean.shape[0] - 3 - num_gates  # the pooled activation's, padded

    @torch.no_grad()
    def act(self, obs: Tensor, activation: Tensor, k: int) -> Tensor:
        features = exit_features(self.classifier, activation, k, self.num_gates, self.width)
        self.exited |= self.scorer(features) + self.threshold >= 0
        return ~self.exited


@dataclass
class LearnedExitConfig:
    """learned_exit: a small network scores, at each gated block, whether the head's prediction there is
    right; an image exits at the first block whose score reaches the threshold (set on training images to
    spend --budget)."""

    flag_prefix: ClassVar[str] = "exit_"

    hidden: int = option(32, POSITIVE_INT)
    """learned_exit: hidden units of the scorer"""
    epochs: int = option(10, POSITIVE_INT)
    """learned_exit: passes over the training images' features (one per gated block and image)"""
    lr: float = option(1e-3, POSITIVE)
    """learned_exit: Adam's learning rate"""
    tokens: bool = False
    """learned_exit: the activation pooled over tokens among the scorer's inputs, beside the head's top probability,
    margin and entropy and the block's position (validation tied the two, BENCHMARKS.md section 16: off, the simpler)"""

    def __post_init__(self) -> None:
        check_options(self)


@torch.no_grad()
def depth_outcomes(
    backbone: Backbone, classifier: nn.Module, data: Dataset, device: torch.device, batch: int
) -> tuple[Tensor, Tensor]:
    """For every image of ``data`` and gated block (every block run): :func:`exit_features` there and
    whether ``classifier``'s prediction there is right, ``(n, N, F)`` and ``(n, N)``."""
    num_gates = backbone.num_blocks - FIRST_GATED
    width = max(c for c, _, _ in exit_shapes(backbone))
    features, right = [], []
    for x, y in batches(data, batch, device, train=False):
        h, here, correct = backbone.enter(x, FIRST_GATED), [], []
        for k, block in enumerate(backbone.blocks[FIRST_GATED:]):
            here.append(exit_features(classifier, h, k, num_gates, width))
            correct.append((classifier(h, k).argmax(1) == y).float())
            h = block(h)
        features.append(torch.stack(here, dim=1))
        right.append(torch.stack(correct, dim=1))
    return torch.cat(features), torch.cat(right)


def fit_scorer(features: Tensor, right: Tensor, cfg: LearnedExitConfig, seed: int) -> ExitScorer:
    """The scorer trained by binary cross-entropy on ``features`` ``(n, N, F)`` -> ``right`` ``(n, N)``
    (:func:`depth_outcomes`)."""
    first = 0 if cfg.tokens else features.shape[-1] - 3 - right.shape[-1]  # the pooled tokens come first
    features, right = features.flatten(0, -2), right.flatten()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    scorer = ExitScorer(features.shape[1], cfg.hidden, first).to(features.device)
    scorer.mean.copy_(features[:, first:].mean(0))
    scorer.std.copy_(features[:, first:].std(0).clamp_min(1e-6))
    optimizer = torch.optim.Adam(scorer.parameters(), lr=cfg.lr)
    for _ in range(cfg.epochs):
        for index in torch.randperm(len(right), generator=generator).split(256):
            index = index.to(features.device)
            loss = F.binary_cross_entropy_with_logits(scorer(features[index]), right[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return scorer.eval()


def _train_learned(ctx: AgentContext, state: dict | None) -> RoutingPolicy:
    classifier = exit_classifier_for(ctx)
    features, right = depth_outcomes(ctx.backbone, classifier, ctx.train_data, ctx.device, ctx.cfg.batch_sizes()[1])
    scorer = fit_scorer(features, right, ctx.options, ctx.cfg.seed)
    policy = LearnedExitPolicy(classifier, scorer, ctx.backbone.num_blocks - FIRST_GATED)
    state = {"scorer": scorer.state_dict(), "hidden": ctx.options.hidden, "first": scorer.first}
    return calibrate_exit(ctx, policy, state)


def _load_learned(ctx: AgentContext, state: dict) -> RoutingPolicy:
    num_gates = ctx.backbone.num_blocks - FIRST_GATED
    first = int(state.get("first", 0))
    scorer = ExitScorer(first + state["scorer"]["mean"].shape[0], int(state["hidden"]), first).to(ctx.device)
    scorer.load_state_dict(state["scorer"])
    return LearnedExitPolicy(exit_classifier_for(ctx, state), scorer, num_gates, float(state["threshold"]))


# the smoke run's network: a small ViT (its head reads any depth), with the tiny ResNet-20's 8 gated blocks
VIT_SMOKE = ("--backbone", "timm:vit_tiny_patch16_224", "--backbone-args", "depth=9", "embed_dim=16", "num_heads=2")
register_agent(
    "confidence_exit",
    AgentSpec(_train, _load, role="matched", takes_budget=True, smoke=("--budget", "0.6")),  # on a CNN: exit heads
)
register_agent(
    "learned_exit",
    AgentSpec(
        _train_learned, _load_learned, role="matched", takes_budget=True, options=LearnedExitConfig,
        smoke=("--budget", "0.6", "--exit-epochs", "1", *VIT_SMOKE),
    ),
)  # fmt: skip
