"""The run configuration: one tree of the parts each module owns, seen flat by the command line;
the recipe's stage defaults; resuming runs saved by older versions."""

import dataclasses

import pytest
import torch

from agents.hybrid import HybridConfig
from agents.skip_ready import JointConfig, gate_identity
from agents.skipnet import starts_from_joint_gates
from backbones.options import build, flatten, option_fields, replace
from experiments.cli import build_parser, field_docs, parse
from experiments.config import SAFE_ON_RESUME, RunConfig
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
    resolved = {k: c.for_device(cpu, 10_000) for k, c in stages.items()}
    got = {k: (*c.hybrid.stages(), c.hybrid.finetunes(), c.budget) for k, c in resolved.items()}
    assert got == {  # the recipe's gates at their budget (joint SP, then the recipe's HRL: a backbone stage)
        "default": (0, 0, False, None),
        "its budget": (0, 0, False, 0.5),
        "another budget": (0, 0, False, 0.4),  # met by the recipe at that budget: its own skip-ready backbone
        "another alpha": (3, 0, False, None),
        "base recipe": (10, 500, False, None),
        "feedforward gates": (10, 0, False, None),
    }
    assert replace(RunConfig(), sp_epochs=1).for_device(cpu).hybrid.sp.epochs == 1  # what the user set stays
    assert RunConfig(budget=0.4).for_device(cpu).joint.budget == 0.4
    assert RunConfig(budget=0.4, agent="static").for_device(cpu).joint.budget == 0.5  # static spends it on 0.5's
    # gates that cannot start from the joint ones (another shape) are trained by the full SP, never evaluated untrained
    assert RunConfig().for_device(cpu, 10_000, joint_gates=False).hybrid.stages() == (10, 0)
    assert replace(RunConfig(), hrl_iterations=0).for_device(cpu).hybrid.stages() == (0, 0)  # SP alone, asked for


def test_only_gates_of_the_joint_kind_and_shape_start_from_them():
    """The bug: ``_start_gates`` returned fresh gates without a word when the skip-ready backbone's
    gates had another shape, and the skip-ready stages (0 SP epochs, 0 HRL) evaluated them untrained."""
    gate_options = RunConfig().gates.options()
    meta = {"checkpoint": "x.pt", "skip_ready": {"gates": gate_identity("rnn", gate_options)}}
    assert starts_from_joint_gates("hybrid_rnn", gate_options, meta)
    assert not starts_from_joint_gates("hybrid_rnn", {**gate_options, "hidden": 99}, meta)  # another shape
    assert not starts_from_joint_gates("hybrid_ff", {}, meta)  # another kind
    assert not starts_from_joint_gates("hybrid_rnn", gate_options, {"checkpoint": "x.pt"})  # a base network
    assert not starts_from_joint_gates("ppo", gate_options, meta)


def test_a_run_saved_before_the_recipes_resumes_on_the_base_network():
    """A checkpoint's run configuration from before ``backbone_recipe`` existed routed the base
    network; resuming it must not switch it to today's default, the skip-ready backbone."""
    saved = flatten(RunConfig(backbone_recipe="base"))
    del saved["backbone_recipe"]
    assert resumed_config(RunConfig(checkpoint="x.pt"), saved, given=set()).backbone_recipe == "base"
    saved["backbone_recipe"] = "skip_ready"
    assert resumed_config(RunConfig(checkpoint="x.pt"), saved, given=set()).backbone_recipe == "skip_ready"


# the flat run configuration checkpoints and results.json held before the tree (the flags were the same)
FLAT_BEFORE_THE_TREE = {
    "agent": "blockdrop", "backbone": "cifar_resnet20", "alpha": 2.0, "seed": 3, "sp_lr": 0.01, "rnn_hidden": 8,
    "rnn_pooling": "mean_max_std", "joint_budget": 0.4, "joint_bn": "frozen", "blockdrop_iterations": 7,
    "blockdrop_reward": "correct", "blockdrop_width": 8, "timesteps": 99, "rate": 0.3, "static_mix": False,
    "checkpoint_every": 5, "entropy_coef": 0.1,
}  # fmt: skip


def test_a_flat_configuration_of_an_older_version_builds_the_same_run():
    cfg = build(RunConfig, FLAT_BEFORE_THE_TREE)
    assert (cfg.agent, cfg.alpha, cfg.hybrid.sp.lr, cfg.gates.hidden, cfg.gates.pooling) == (
        "blockdrop", 2.0, 0.01, 8, "mean_max_std"
    )  # fmt: skip
    parts = cfg.agent_options  # the agents' own parts, as they registered them
    assert (cfg.joint.budget, cfg.joint.bn, parts["blockdrop"].iterations, parts["blockdrop"].reward) == (
        0.4, "frozen", 7, "correct"
    )  # fmt: skip
    assert (parts["blockdrop"].width, parts["sb3"].timesteps, parts["fixed"].rate, parts["fixed"].static_mix) == (
        8, 99, 0.3, False
    )  # fmt: skip
    renamed = {"timesteps": "sb3_timesteps", "rate": "fixed_rate", "static_mix": "fixed_static_mix"}  # one prefix rule
    stored_again = {renamed.get(k, k): v for k, v in FLAT_BEFORE_THE_TREE.items()}
    assert flatten(cfg).items() >= stored_again.items()  # stored flat again, under today's names
    assert resumed_config(RunConfig(checkpoint="x.pt"), flatten(cfg), given=set()) == cfg
    with pytest.raises(ValueError, match="unknown options rnn_hiden"):
        build(RunConfig, {"rnn_hiden": 8})


def test_every_option_has_one_flag_help_and_default():
    options = option_fields(RunConfig)
    parser = build_parser(RunConfig)
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(flags) == set(options)
    defaults = flatten(RunConfig())
    for name, opt in options.items():
        assert field_docs(opt.owner).get(opt.field.name), f"{name} has no help"
        assert flags[name].help.endswith(f"(default: {defaults[name]})".replace("%", "%%")), name
    assert parse(RunConfig, []) == RunConfig()  # the defaults the help shows are the ones a run takes
    assert {"sp_lr", "hrl_lr", "hrl_finetune_lr", "blockdrop_lr", "hrl_log_every", "device", "resume"} <= SAFE_ON_RESUME
    assert not {"alpha", "seed", "sp_epochs", "joint_lr", "rnn_hidden"} & SAFE_ON_RESUME


def test_each_part_checks_itself_naming_the_flag():
    with pytest.raises(ValueError, match=r"--hrl-gamma must be in \[0, 1\], got 1.5"):
        HybridConfig.flat(gamma=1.5)
    with pytest.raises(ValueError, match="--hrl-baseline must be one of self_critical, batch_mean, none"):
        HybridConfig.flat(baseline="critic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--joint-epochs must be an integer >= 1.*--joint-bn must be one of"):
        JointConfig(epochs=0, bn="running")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--rnn-hidden must be an integer >= 1"):
        replace(RunConfig(), rnn_hidden=0)
    with pytest.raises(ValueError, match="--budget must be a fraction of the full network's FLOPs"):
        RunConfig(budget=1.5)


def test_a_default_filled_in_after_construction_is_not_a_flag_default():
    """Regression: the flags took their defaults from an instance, whose ``__post_init__`` had set
    ``TrainConfig.epochs`` for the default data set (10): ``train_backbone.py --dataset cifar10``
    trained 10 epochs instead of CIFAR's 30."""
    from backbones.train import DEFAULT_EPOCHS, TrainConfig
    from experiments.cli import parse

    assert parse(TrainConfig, ["--dataset", "cifar10"]).epochs == DEFAULT_EPOCHS.get("cifar10", 30) == 30
    assert parse(TrainConfig, ["--dataset", "cifar10", "--epochs", "2"]).epochs == 2


def test_the_base_trainers_learning_rate_follows_the_data_set_and_the_optimizer():
    """SGD's peak rate is 0.6 on the embedded set (its 10 epochs converge further: BENCHMARKS.md
    sections 21-22), 0.1 elsewhere; AdamW keeps its own; a rate given on the command line wins."""
    from backbones.train import TrainConfig

    assert parse(TrainConfig, []).lr == 0.6  # cluttered_digits, a CIFAR ResNet: SGD
    assert parse(TrainConfig, ["--dataset", "cifar10"]).lr == 0.1
    assert parse(TrainConfig, ["--optimizer", "adamw"]).lr == 1e-3
    assert parse(TrainConfig, ["--lr", "0.05"]).lr == 0.05


def test_run_py_sets_the_base_networks_batch_size():
    """``--backbone-batch-size`` (run.py, reproduce.py) is the base trainer's ``--batch-size``."""
    from backbones.train import TrainConfig

    assert parse(RunConfig, ["--backbone-batch-size", "64"]).backbone_training.batch_size == 64
    assert parse(TrainConfig, ["--batch-size", "64"]).batch_size == 64
    with pytest.raises(ValueError, match="--backbone-batch-size must be an integer >= 1"):
        parse(RunConfig, ["--backbone-batch-size", "0"])


def test_a_renamed_option_keeps_its_old_flag_and_stored_runs_build():
    """--backbone-lr (the hybrid fine-tune's rate, which read as the base trainer's) is --hrl-finetune-lr;
    the old flag still parses and configurations stored under the old name still build and resume."""
    from experiments.cli import build_parser, parse
    from experiments.run import resumed_config

    assert parse(RunConfig, ["--backbone-lr", "3e-5"]).hybrid.hrl.finetune_lr == 3e-5
    assert parse(RunConfig, ["--finetune-lr", "4e-5"]).hybrid.hrl.finetune_lr == 4e-5
    assert parse(RunConfig, ["--hrl-finetune-lr", "2e-5"]).hybrid.hrl.finetune_lr == 2e-5
    help_text = build_parser(RunConfig).format_help()
    assert (
        "--hrl-finetune-lr HRL_FINETUNE_LR, --finetune-lr HRL_FINETUNE_LR, --backbone-lr HRL_FINETUNE_LR" in help_text
    )
    stored = {**flatten(RunConfig()), "sp_lr": 0.01}
    del stored["hrl_finetune_lr"]
    stored["backbone_lr"] = 3e-4  # a run stored before the rename
    cfg = resumed_config(RunConfig(checkpoint="x.pt"), stored, given=set())
    assert cfg.hybrid.hrl.finetune_lr == 3e-4 and cfg.hybrid.sp.lr == 0.01
    assert build(RunConfig, {"backbone_lr": 5e-5}).hybrid.hrl.finetune_lr == 5e-5


def test_an_agent_whose_options_declare_no_prefix_is_refused_at_registration():
    from agents.registry import AGENTS, AgentSpec, register_agent

    @dataclasses.dataclass
    class NoPrefix:
        k: int = 2

    with pytest.raises(ValueError, match='declare no flag_prefix; give them one, flag_prefix: ClassVar.str. = "toy_"'):
        register_agent("toy", AgentSpec(lambda ctx, s: None, lambda ctx, s: None, options=NoPrefix))  # type: ignore
    assert "toy" not in AGENTS


# one prefix rule: the flags of the options that had none before, old flag -> today's
FLAGS_BEFORE_THE_PREFIX_RULE = {
    "--gamma 0.9": "--hrl-gamma 0.9", "--baseline batch_mean": "--hrl-baseline batch_mean",
    "--rl-weight 0.5": "--hrl-rl-weight 0.5", "--finetune-backbone": "--hrl-finetune-backbone",
    "--ce-route greedy": "--hrl-ce-route greedy", "--log-every 7": "--hrl-log-every 7",
    "--timesteps 99": "--sb3-timesteps 99", "--learning-rate 0.01": "--sb3-learning-rate 0.01",
    "--distill-epochs 2": "--sb3-distill-epochs 2", "--distill-explore 0.2": "--sb3-distill-explore 0.2",
    "--early-exit": "--sb3-early-exit", "--rate 0.3": "--fixed-rate 0.3", "--no-static-mix": "--no-fixed-static-mix",
    "--train-precision bf16": "--backbone-precision bf16",
}  # fmt: skip


@pytest.mark.parametrize("before", list(FLAGS_BEFORE_THE_PREFIX_RULE))
def test_every_part_prefixes_its_flags_and_the_flags_before_still_parse(before):
    """Every option's flag begins with the prefix of the part that declares it (``--hrl-gamma``,
    ``--sb3-timesteps``, ``--fixed-rate``); the flags these options had before parse to the same."""
    from experiments.cli import parse

    assert parse(RunConfig, before.split()) == parse(RunConfig, FLAGS_BEFORE_THE_PREFIX_RULE[before].split())
    assert parse(RunConfig, before.split()) != RunConfig()
    for name, opt in option_fields(RunConfig).items():
        prefix = getattr(opt.owner, "flag_prefix", "")
        assert name.startswith(prefix), name
        assert prefix or opt.owner is RunConfig, f"{opt.owner.__name__} declares no flag_prefix"


def test_an_option_that_may_be_none_takes_none_from_the_command_line():
    """``--recipe-hrl-explore None`` (the gates' own probabilities) and ``--joint-budget None`` (alpha
    prices compute): an option whose default is a value can be set back to ``None``; a bad value
    still names the type."""
    from experiments.cli import parse

    cfg = parse(RunConfig, ["--recipe-hrl-explore", "None", "--joint-budget", "None", "--backbone-epochs", "3"])
    assert cfg.recipe_hrl.explore is None and cfg.joint.budget is None and cfg.backbone_training.epochs == 3
    with pytest.raises(SystemExit):
        parse(RunConfig, ["--recipe-hrl-explore", "abc"])
