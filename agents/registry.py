"""One registry of agents: ``--agent hybrid_rnn`` is a lookup, not an if/elif chain.

Every agent trains (or loads) into a :class:`agents.policies.RoutingPolicy`, which the shared
evaluation routes the test images with.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from agents.blockdrop import BlockDropConfig, BlockDropNet, BlockDropTrainer, OneShotPolicy
from agents.fixed import (
    FIXED_POLICY_BUDGET,
    FixedConfig,
    cached_elimination_path,
    random_rate_for_budget,
    static_for_budget,
)
from agents.gates import GatePolicy, RecurrentGateConfig, create_gates
from agents.hybrid import HybridConfig, HybridTrainer
from agents.policies import (
    GateRoutingPolicy,
    RandomPolicy,
    RoutingPolicy,
    SB3OneShotPolicy,
    SB3RoutingPolicy,
    StaticPolicy,
)
from agents.skip_ready import gate_identity, load_gates
from agents.trainer import RunValues
from backbones.base import FIRST_GATED, Backbone
from backbones.checkpoint import atomic_save
from backbones.data import Dataset
from backbones.options import POSITIVE_INT, check_options, option
from backbones.progress import progress_bar
from skipnet_env.core import SKIPNET_REWARD
from skipnet_env.engine import Precision

log = logging.getLogger(__name__)


class AgentOptions(Protocol):
    """What an agent reads of the run's configuration (:class:`experiments.config.RunConfig` has it):
    the run's cross-cutting values and each agent's own part."""

    alpha: float
    budget: float | None
    seed: int
    precision: Precision
    progress: bool
    hybrid: HybridConfig
    gates: RecurrentGateConfig
    blockdrop: BlockDropConfig
    sb3: SB3Config
    fixed: FixedConfig

    def batch_sizes(self) -> tuple[int, int]: ...

    def run_values(self) -> RunValues:
        """The values every trainer is given (:class:`agents.trainer.RunValues`)."""
        ...


@dataclass
class AgentContext:
    """What an agent gets to train with."""

    cfg: AgentOptions
    backbone: Backbone
    train_data: Dataset
    device: torch.device
    checkpoint: Path
    metadata: dict[str, Any]
    writer: Any = None
    backbone_meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    """the backbone checkpoint's metadata (a skip-ready one names its file and its gates)"""


Role = Literal["learned", "matched", "reference"]
EnvId = Literal["SkipNet-v0", "SkipNetOneShot-v0"]


@dataclass(frozen=True)
class AgentSpec:
    """``train(ctx, state)`` trains (resuming from ``state`` if given) and returns the policy;
    ``load(ctx, state)`` rebuilds the policy from a checkpoint for evaluation.

    ``role`` says how comparisons use the agent: ``"learned"`` agents are trained at each compute
    weight (``--alpha``); ``"matched"`` ones (data-independent) run at the compute a learned agent
    reached (``--budget``); a ``"reference"`` runs once. ``seeded``: results vary with ``--seed``.
    """

    train: Callable[[AgentContext, dict | None], RoutingPolicy]
    load: Callable[[AgentContext, dict], RoutingPolicy]
    role: Role = "learned"
    seeded: bool = True
    takes_budget: bool = False
    """``--budget`` means something to this agent (static, random; the hybrid gates meet it by training)"""
    env: EnvId = "SkipNet-v0"
    """the environment the agent decides in: block by block, or one mask per image (runs are named by it)"""


AGENTS: dict[str, AgentSpec] = {}


def register_agent(name: str, spec: AgentSpec) -> None:
    if name in AGENTS:
        raise ValueError(f"agent {name!r} is registered twice")
    AGENTS[name] = spec


def agents_taking_budget() -> list[str]:
    return sorted(name for name, spec in AGENTS.items() if spec.takes_budget)


def get_agent(name: str) -> AgentSpec:
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; valid agents: {', '.join(sorted(AGENTS))}")
    return AGENTS[name]


# -- SkipNet's hybrid gates -----------------------------------------------------------------------


def _gates(ctx: AgentContext, kind: str) -> GatePolicy:
    return create_gates(kind, ctx.backbone, **_gate_options(ctx, kind)).to(ctx.device)


def _gate_options(ctx: AgentContext, kind: str) -> dict[str, Any]:
    return ctx.cfg.gates.options() if kind == "rnn" else {}


# the hybrid agents and the kind of gates each trains
HYBRID_GATES = {"hybrid_rnn": "rnn", "hybrid_ff": "ff1", "hybrid_ff2": "ff2"}


def starts_from_joint_gates(agent: str, gate_options: dict[str, Any], backbone_meta: dict[str, Any]) -> bool:
    """Whether ``agent`` starts from the gates joint SP trained beside the backbone ``backbone_meta``
    describes: a skip-ready backbone whose gates are of the agent's kind, first gated block and
    options (``gate_options``: the recurrent gate's). Gates that do not start from them start untrained."""
    kind = HYBRID_GATES.get(agent)
    joint = backbone_meta.get("skip_ready", {}).get("gates")
    if kind is None or joint is None or "checkpoint" not in backbone_meta:
        return False
    return joint == gate_identity(kind, gate_options if kind == "rnn" else {}, FIRST_GATED)


def _start_gates(ctx: AgentContext, kind: str) -> GatePolicy:
    """New gates, or, on a skip-ready backbone whose joint SP trained gates of this kind and shape,
    those gates: the paper's recipe (SP jointly, then HRL) continues from them."""
    gates = _gates(ctx, kind)
    joint = ctx.backbone_meta.get("skip_ready", {}).get("gates")
    if starts_from_joint_gates(f"hybrid_{kind}", _gate_options(ctx, kind), ctx.backbone_meta):
        gates.load_state_dict(load_gates(ctx.backbone_meta["checkpoint"], ctx.backbone, ctx.device).state_dict())
        log.info("hybrid_%s starts from the gates joint SP trained beside the backbone", kind)
    elif joint is not None:
        log.warning(
            "hybrid_%s starts from new gates: the skip-ready backbone's gates (%s) are not this agent's (%s); SP "
            "trains them for %d epochs",
            kind, joint, gate_identity(kind, _gate_options(ctx, kind), gates.first_gated), ctx.cfg.hybrid.stages()[0],
        )  # fmt: skip
    return gates


def _hybrid(kind: str) -> AgentSpec:
    def train(ctx: AgentContext, state: dict | None) -> RoutingPolicy:
        c = ctx.cfg
        trainer = HybridTrainer(
            ctx.backbone, _start_gates(ctx, kind), ctx.train_data, c.hybrid, ctx.device, ctx.checkpoint,
            ctx.metadata, ctx.writer, c.progress, budget=c.budget, **c.run_values(),
        )  # fmt: skip
        if state is not None:
            trainer.resume()
        return GateRoutingPolicy(trainer.train(), f"hybrid_{kind}")

    def load(ctx: AgentContext, state: dict) -> RoutingPolicy:
        gates = _gates(ctx, kind)
        gates.load_state_dict(state["gates"])
        if "backbone" in state:  # a fine-tuned backbone travels with its gates
            ctx.backbone.load_state_dict(state["backbone"])
        # the threshold a budget's calibration chose (run.py writes it beside the gates)
        return GateRoutingPolicy(gates.eval(), f"hybrid_{kind}", float(state.get("threshold", 0.0)))

    return AgentSpec(train, load, takes_budget=True)


for _agent, _kind in HYBRID_GATES.items():
    register_agent(_agent, _hybrid(_kind))


# -- Stable-Baselines3 -----------------------------------------------------------------------------


@dataclass
class SB3Config:
    """Stable-Baselines3 agents (ppo, a2c, recurrent_ppo, ppo_oneshot).

    Their algorithms' own settings: :mod:`agents.sb3_agents`."""

    timesteps: int = option(150_000, POSITIVE_INT)
    """SB3 agents: environment steps to train for (image-blocks; images for ppo_oneshot)"""

    def __post_init__(self) -> None:
        check_options(self)


def _sb3(algo: str, env_id: EnvId = "SkipNet-v0") -> AgentSpec:
    """An SB3 algorithm on ``SkipNet-v0`` (block by block) or ``SkipNetOneShot-v0`` (one mask per image)."""
    from agents import sb3_agents

    oneshot = env_id == "SkipNetOneShot-v0"

    def make(ctx: AgentContext):
        from skipnet_env.sb3_bridge import make_sb3_env

        env = make_sb3_env(
            ctx.cfg.batch_sizes()[0],
            env_id,
            backbone=ctx.backbone,
            dataset=ctx.train_data,
            alpha=ctx.cfg.alpha,
            **({} if oneshot else SKIPNET_REWARD),
            device=ctx.device,
            precision=ctx.cfg.precision,
        )
        env.seed(ctx.cfg.seed)
        episode_length = 1 if oneshot else env.get_attr("num_gates")[0]
        return sb3_agents.build_model(algo, env, ctx.cfg.seed, ctx.device, episode_length)

    def policy(model) -> RoutingPolicy:
        return SB3OneShotPolicy(model, f"{algo}_oneshot") if oneshot else SB3RoutingPolicy(model, algo)

    def train(ctx: AgentContext, state: dict | None) -> RoutingPolicy:
        model = make(ctx)
        if state is not None:
            sb3_agents.load_model_state(model, state)
        timesteps = ctx.cfg.sb3.timesteps
        remaining = timesteps - model.num_timesteps
        bar = progress_bar(timesteps, f"{algo} (SB3)", ctx.cfg.progress, initial=model.num_timesteps)
        callback = sb3_agents.CheckpointCallback(ctx.checkpoint, {**ctx.metadata, "stage": "train"}, bar=bar)
        if remaining > 0:
            model.learn(total_timesteps=remaining, callback=callback, reset_num_timesteps=state is None)
        else:  # a finished run resumed: nothing to train, the model is only saved again
            callback.init_callback(model)
        bar.close()
        callback.metadata["stage"] = "done"
        callback.save()
        return policy(model)

    def load(ctx: AgentContext, state: dict) -> RoutingPolicy:
        model = make(ctx)
        sb3_agents.load_model_state(model, state)
        return policy(model)

    return AgentSpec(train, load, env=env_id)


for _algo in ("ppo", "a2c", "recurrent_ppo"):
    register_agent(_algo, _sb3(_algo))
register_agent("ppo_oneshot", _sb3("ppo", "SkipNetOneShot-v0"))


# -- one-shot agents (SkipNetOneShot-v0: the whole mask from the image) -----------------------------


def _blockdrop_net(ctx: AgentContext, width: int | None = None) -> BlockDropNet:
    num_gates = ctx.backbone.num_blocks - FIRST_GATED
    return BlockDropNet(ctx.backbone.input_size[0], num_gates, width or ctx.cfg.blockdrop.width).to(ctx.device)


def _train_blockdrop(ctx: AgentContext, state: dict | None) -> RoutingPolicy:
    c = ctx.cfg
    trainer = BlockDropTrainer(
        ctx.backbone, _blockdrop_net(ctx), ctx.train_data, c.blockdrop, ctx.device, ctx.checkpoint, ctx.metadata,
        ctx.writer, c.progress, **c.run_values(),
    )  # fmt: skip
    if state is not None:
        trainer.resume(state)
    return trainer.train()


def _load_blockdrop(ctx: AgentContext, state: dict) -> RoutingPolicy:
    net = _blockdrop_net(ctx, width=state["net"]["features.0.weight"].shape[0])  # the width it was trained with
    net.load_state_dict(state["net"])
    return OneShotPolicy(net)


register_agent("blockdrop", AgentSpec(_train_blockdrop, _load_blockdrop, env="SkipNetOneShot-v0"))


# -- fixed policies ---------------------------------------------------------------------------------


def _fixed_save(ctx: AgentContext, **payload: Any) -> None:
    atomic_save({"metadata": {**ctx.metadata, "stage": "done"}, **payload}, ctx.checkpoint)


def _train_full(ctx: AgentContext, state: dict | None) -> RoutingPolicy:
    _fixed_save(ctx)
    return RoutingPolicy()


def _budget(ctx: AgentContext) -> float:
    return FIXED_POLICY_BUDGET if ctx.cfg.budget is None else ctx.cfg.budget


def _random_rate(ctx: AgentContext) -> float:
    """``--rate``, or the rate at which random skipping spends ``--budget`` of the FLOPs."""
    if ctx.cfg.fixed.rate is not None:
        return ctx.cfg.fixed.rate
    return random_rate_for_budget(ctx.backbone, _budget(ctx))


def _train_random(ctx: AgentContext, state: dict | None) -> RoutingPolicy:
    rate = _random_rate(ctx)
    _fixed_save(ctx, rate=rate)
    return RandomPolicy(rate, ctx.cfg.seed)


def _train_static(ctx: AgentContext, state: dict | None) -> RoutingPolicy:
    path = cached_elimination_path(
        ctx.backbone, ctx.train_data, ctx.device, ctx.metadata, ctx.cfg.progress, precision=ctx.cfg.precision
    )
    policy = static_for_budget(path, _budget(ctx), ctx.cfg.fixed.static_mix, ctx.cfg.seed)
    more = {} if policy.mask_more is None else {"mask_more": torch.tensor(policy.mask_more)}
    _fixed_save(ctx, mask=torch.tensor(policy.mask), share_more=policy.share_more, **more)
    return policy


def _load_static(ctx: AgentContext, state: dict) -> RoutingPolicy:
    more = state["mask_more"].tolist() if "mask_more" in state else None
    return StaticPolicy(state["mask"].tolist(), more, float(state.get("share_more", 0.0)), ctx.cfg.seed)


register_agent("full", AgentSpec(_train_full, lambda ctx, s: RoutingPolicy(), role="reference", seeded=False))
register_agent(
    "random",
    AgentSpec(
        _train_random, lambda ctx, s: RandomPolicy(float(s["rate"]), ctx.cfg.seed), role="matched", takes_budget=True
    ),
)
register_agent(
    "static",
    AgentSpec(_train_static, _load_static, role="matched", takes_budget=True),
)

__all__ = [
    "AGENTS", "HYBRID_GATES", "AgentContext", "AgentOptions", "AgentSpec", "SB3Config", "get_agent", "register_agent",
    "starts_from_joint_gates",
]  # fmt: skip
