"""One registry of agents: ``--agent hybrid_rnn`` is a lookup, not an if/elif chain.

An agent is one module that registers itself (:func:`register_agent`): how it trains, how it loads,
its own options (a configuration dataclass the run's configuration and the command line pick up from
the registration: ``cfg.agent_options[part]`` and its flags) and the options of a seconds-long run
(the test suite's). The built-in ones: :mod:`agents.skipnet` (SkipNet's gates), :mod:`agents.sb3_agents`,
:mod:`agents.blockdrop`, :mod:`agents.fixed`; ``run.py --agents-from my_agent.py`` imports a user's.
Every agent trains (or loads) into a :class:`agents.policies.RoutingPolicy`, which the shared
evaluation routes the test images with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

if TYPE_CHECKING:  # the registry imports no agent: the agents' modules import it
    from agents.gates import RecurrentGateConfig
    from agents.hybrid import HybridConfig
    from agents.policies import RoutingPolicy
    from agents.trainer import RunValues
    from backbones.base import Backbone
    from backbones.data import Dataset
    from backbones.device import Precision


class RunOptions(Protocol):
    """What an agent reads of the run's configuration (:class:`experiments.config.RunConfig` has it):
    the cross-cutting values, the recipe's parts (the hybrid trainer's, the recurrent gate's) and
    every agent's own part (``agent_options``; an agent reads its own as ``ctx.options``)."""

    alpha: float
    budget: float | None
    seed: int
    precision: Precision
    progress: bool
    hybrid: HybridConfig
    gates: RecurrentGateConfig
    agent_options: dict[str, Any]

    def batch_sizes(self) -> tuple[int, int]: ...

    def run_values(self) -> RunValues:
        """The values every trainer is given (:class:`agents.trainer.RunValues`)."""
        ...


@dataclass
class AgentContext:
    """What an agent gets to train with."""

    cfg: RunOptions
    backbone: Backbone
    train_data: Dataset
    device: torch.device
    checkpoint: Path
    metadata: dict[str, Any]
    writer: Any = None
    backbone_meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    """the backbone checkpoint's metadata (a skip-ready one names its file and its gates)"""
    options: Any = None
    """the agent's own options (its :attr:`AgentSpec.options` part of the run's configuration)"""


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
    data_parallel: bool = False
    """under ``torchrun`` the agent trains on every rank (its trainer is data-parallel); otherwise the
    ranks other than 0 end before it trains, and it trains on rank 0 alone"""
    options: type | None = None
    """the agent's own configuration: a dataclass of :func:`backbones.options.option` fields (its
    ``flag_prefix``, which every part declares, goes before their flags); the run's configuration holds it as
    ``agent_options[part]``, the command line has its flags, the agent reads it as ``ctx.options``"""
    part: str | None = None
    """the name of that part (default: the agent's); agents that share options share a part (``sb3``)"""
    smoke: tuple[str, ...] = ()
    """command-line options for a run of seconds (on the test suite's tiny backbone: every agent is
    trained and reloaded end to end with them)"""


AGENTS: dict[str, AgentSpec] = {}


def register_agent(name: str, spec: AgentSpec) -> None:
    """Make ``--agent name`` run ``spec`` (call it at the import of the agent's module)."""
    if name in AGENTS:
        raise ValueError(f"agent {name!r} is registered twice")
    if spec.options is not None:
        if not hasattr(spec.options, "flag_prefix"):  # one rule: a part's flags begin with its prefix
            raise ValueError(
                f"agent {name!r}: its options {spec.options.__name__} declare no flag_prefix; give them one, "
                f'flag_prefix: ClassVar[str] = "{name}_" (its flags are --{name.replace("_", "-")}-...)'
            )
        part = part_of(name, spec)
        known = agent_parts().get(part)
        if known not in (None, spec.options):
            raise ValueError(f"agent {name!r}: options part {part!r} is {known.__name__} already")
    AGENTS[name] = spec


def part_of(name: str, spec: AgentSpec) -> str:
    """The name of agent ``name``'s options part."""
    return spec.part or name


def agent_parts() -> dict[str, type]:
    """``{part: configuration}`` of every registered agent's own options (what the run's
    configuration holds as ``agent_options``), in registration order."""
    return {part_of(n, s): s.options for n, s in AGENTS.items() if s.options is not None}


def agents_taking_budget() -> list[str]:
    return sorted(name for name, spec in AGENTS.items() if spec.takes_budget)


def get_agent(name: str) -> AgentSpec:
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; valid agents: {', '.join(sorted(AGENTS))}")
    return AGENTS[name]


def import_agents(source: str) -> None:
    """Import the module ``source`` (a ``.py`` file or a dotted module name) whose import registers
    agents; a file imported before is not imported again."""
    if not source.endswith(".py"):
        importlib.import_module(source)
        return
    path = Path(source).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"--agents-from {source}: no such file")
    name = "skipnet_user_agents_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


__all__ = [
    "AGENTS", "AgentContext", "AgentSpec", "RunOptions", "agent_parts", "get_agent", "import_agents",
    "register_agent",
]  # fmt: skip
