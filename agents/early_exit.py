"""Early exit by confidence (DeeBERT, CALM): the baseline of exit policies, beside static and random.

On a network whose head reads any depth (every gated block's activation has the final one's shape:
a vision transformer, an isotropic network), the head classifies the activation entering each gated
block; once the prediction's top probability reaches the threshold, the image exits: every later
block is skipped, which on such a network (identity shortcuts) is classifying there. The head's cost
at every block is the policy's own FLOPs. ``--agent confidence_exit --budget B`` sets the threshold
on training images so that it spends ``B`` of the FLOPs (the calibration's bisection, as the gates'
budgets are met).
"""

from __future__ import annotations

import dataclasses

import torch

from agents.evaluate import calibrate_threshold
from agents.fixed import FIXED_POLICY_BUDGET, default_search_images
from agents.policies import ConfidenceExitPolicy, RoutingPolicy
from agents.registry import AgentContext, AgentSpec, register_agent
from backbones.base import FIRST_GATED, Backbone
from backbones.checkpoint import atomic_save
from backbones.data import Dataset, ImageTensors


def check_head_reads_any_depth(backbone: Backbone, first_gated: int = FIRST_GATED) -> None:
    """Refuse a network whose head cannot classify the activation entering every gated block."""
    shapes = backbone.activation_shapes[first_gated:]
    changed = [first_gated + i for i, shape in enumerate(shapes) if shape != shapes[-1]]
    if changed:
        raise ValueError(
            f"confidence_exit needs a network whose head reads any depth (a vision transformer); {backbone.arch}'s "
            f"activations entering blocks {changed} have another shape than the head's input"
        )


def calibration_images(data: Dataset, device: torch.device) -> Dataset:
    """The first training images the threshold is set on (as many as the static search scores)."""
    n = default_search_images(device)
    if not isinstance(data, ImageTensors) or len(data) <= n:
        return data
    groups = None if data.groups is None else data.groups[:n]
    return dataclasses.replace(data, images=data.images[:n], labels=data.labels[:n], groups=groups, _fingerprint=None)


def _train(ctx: AgentContext, state: dict | None) -> RoutingPolicy:
    check_head_reads_any_depth(ctx.backbone)
    budget = FIXED_POLICY_BUDGET if ctx.cfg.budget is None else ctx.cfg.budget
    policy = ConfidenceExitPolicy(ctx.backbone.head)
    data = calibration_images(ctx.train_data, ctx.device)
    threshold, _ = calibrate_threshold(
        policy, ctx.backbone, data, budget, ctx.device, ctx.cfg.batch_sizes()[1], ctx.cfg.precision
    )
    atomic_save({"metadata": {**ctx.metadata, "stage": "done"}, "threshold": threshold}, ctx.checkpoint)
    return policy


def _load(ctx: AgentContext, state: dict) -> RoutingPolicy:
    return ConfidenceExitPolicy(ctx.backbone.head, float(state["threshold"]))


# the smoke run's network: a small ViT (its head reads any depth), with the tiny ResNet-20's 8 gated blocks
VIT_SMOKE = ("--backbone", "timm:vit_tiny_patch16_224", "--backbone-args", "depth=9", "embed_dim=16", "num_heads=2")
register_agent(
    "confidence_exit",
    AgentSpec(_train, _load, role="matched", takes_budget=True, smoke=("--budget", "0.6", *VIT_SMOKE)),
)
