"""SkipNet's gates as agents: ``hybrid_rnn`` (the recurrent gate), ``hybrid_ff`` and ``hybrid_ff2``
(feedforward gates), trained by the hybrid algorithm (:mod:`agents.hybrid`: SP, then HRL). On a
skip-ready backbone whose recipe trained gates of the agent's kind and shape (joint SP, then the
recipe's HRL: :mod:`agents.recipe_hrl`), the agent starts from those gates; by default it evaluates
them as they are (calibrated to the budget), its own SP and HRL being 0.
"""

from __future__ import annotations

import logging
from typing import Any

from agents.gates import GatePolicy, create_gates
from agents.hybrid import HybridTrainer
from agents.policies import GateRoutingPolicy, RoutingPolicy
from agents.registry import AgentContext, AgentSpec, register_agent
from agents.skip_ready import gate_identity, load_gates
from backbones.base import FIRST_GATED

log = logging.getLogger(__name__)

# the hybrid agents and the kind of gates each trains
HYBRID_GATES = {"hybrid_rnn": "rnn", "hybrid_ff": "ff1", "hybrid_ff2": "ff2"}
SMOKE = ("--sp-epochs", "1", "--hrl-iterations", "3", "--num-envs", "32")


def _gates(ctx: AgentContext, kind: str) -> GatePolicy:
    return create_gates(kind, ctx.backbone, **_gate_options(ctx, kind)).to(ctx.device)


def _gate_options(ctx: AgentContext, kind: str) -> dict[str, Any]:
    return ctx.cfg.gates.options() if kind == "rnn" else {}


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
        log.info("hybrid_%s starts from the gates the recipe trained beside the backbone (joint SP, its HRL)", kind)
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

    # their options are the recipe's own parts of the run's configuration (hybrid, gates), not an agent's
    return AgentSpec(train, load, takes_budget=True, data_parallel=True, smoke=SMOKE)


for _agent, _kind in HYBRID_GATES.items():
    register_agent(_agent, _hybrid(_kind))
