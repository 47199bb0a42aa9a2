"""The run configuration: the recipe's stage defaults, resuming runs saved by older versions."""

import dataclasses

import torch

from agents.config import RunConfig
from experiments.run import resumed_config


def test_a_skip_ready_backbone_keeps_its_gates_unless_another_compute_is_asked_for():
    cpu = torch.device("cpu")
    stages = {
        "default": RunConfig(),
        "its budget": RunConfig(budget=0.5),
        "another budget": RunConfig(budget=0.4),
        "another alpha": RunConfig(alpha=2.0),
        "base recipe": RunConfig(backbone_recipe="base"),
        "feedforward gates": RunConfig(agent="hybrid_ff"),  # untrained on a skip-ready backbone: the full SP
    }
    got = {
        k: (c.for_device(cpu, 10_000).sp_epochs, c.for_device(cpu, 10_000).hrl_iterations) for k, c in stages.items()
    }
    assert got == {
        "default": (0, 0),
        "its budget": (0, 0),
        "another budget": (3, 0),
        "another alpha": (3, 0),
        "base recipe": (10, 500),
        "feedforward gates": (10, 0),
    }
    assert RunConfig(sp_epochs=1).for_device(cpu).sp_epochs == 1  # what the user set stays


def test_a_run_saved_before_the_recipes_resumes_on_the_base_network():
    """A checkpoint's run configuration from before ``backbone_recipe`` existed routed the base
    network; resuming it must not switch it to today's default, the skip-ready backbone."""
    saved = dataclasses.asdict(RunConfig(backbone_recipe="base"))
    del saved["backbone_recipe"]
    assert resumed_config(RunConfig(checkpoint="x.pt"), saved, given=set()).backbone_recipe == "base"
    saved["backbone_recipe"] = "skip_ready"
    assert resumed_config(RunConfig(checkpoint="x.pt"), saved, given=set()).backbone_recipe == "skip_ready"
