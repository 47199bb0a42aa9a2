"""Routing agents: SkipNet's gates trained with the hybrid algorithm, SB3 baselines, fixed policies.

An agent is one module that registers itself (``registry.register_agent``: how to train it, how
to load it, its own options, what role it plays in comparisons, the env it decides in, the options of
a seconds-long run); importing it below is all it takes to add one. Trained ones subclass
``trainer.Trainer`` (checkpoint, exact resume, divergence guard, logged means): the hybrid SP +
HRL trainer (``hybrid``) and BlockDrop's (``blockdrop``), given the run's values as arguments
(``trainer.RunValues``: alpha, seed, precision, batch). Each module owns its options, a dataclass
beside the code it configures (``HybridConfig``, ``gates.RecurrentGateConfig``,
``blockdrop.BlockDropConfig``, ``skip_ready.JointConfig``, ``sb3_agents.SB3Config``,
``fixed.FixedConfig``); the run's configuration (``experiments.config.RunConfig``) is their tree
(the agents' parts as they registered them), and an agent reads its own as ``ctx.options``. Every
policy is evaluated by one ``evaluate`` on the environment's own state machine.
"""

from agents.evaluate import EvalResult, evaluate
from agents.gates import FeedforwardGates, GatePolicy, RecurrentGate, create_gates
from agents.hybrid import HybridConfig, HybridTrainer
from agents.policies import GateRoutingPolicy, RandomPolicy, RoutingPolicy, SB3RoutingPolicy, StaticPolicy
from agents.registry import AGENTS, get_agent, register_agent
from agents.trainer import Trainer

# the built-in agents: each module registers its own
from agents import blockdrop, early_exit, fixed, sb3_agents, skipnet  # noqa: E402, F401  isort: skip


__all__ = [
    "AGENTS",
    "EvalResult",
    "FeedforwardGates",
    "GatePolicy",
    "GateRoutingPolicy",
    "HybridConfig",
    "HybridTrainer",
    "RandomPolicy",
    "RecurrentGate",
    "RoutingPolicy",
    "SB3RoutingPolicy",
    "StaticPolicy",
    "Trainer",
    "create_gates",
    "evaluate",
    "get_agent",
    "register_agent",
]
