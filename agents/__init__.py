"""Routing agents: SkipNet's gates trained with the hybrid algorithm, SB3 baselines, fixed policies."""

from agents.config import RunConfig
from agents.evaluate import EvalResult, evaluate
from agents.gates import FeedforwardGates, GatePolicy, RecurrentGate, create_gates
from agents.hybrid import HybridConfig, HybridTrainer
from agents.policies import GateRoutingPolicy, RandomPolicy, RoutingPolicy, SB3RoutingPolicy, StaticPolicy
from agents.registry import AGENTS, get_agent, register_agent

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
    "RunConfig",
    "SB3RoutingPolicy",
    "StaticPolicy",
    "create_gates",
    "evaluate",
    "get_agent",
    "register_agent",
]
