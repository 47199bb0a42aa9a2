"""Stable-Baselines3 baselines on the same batched environment: PPO and A2C with ``MlpPolicy``,
sb3-contrib's RecurrentPPO with ``MlpLstmPolicy`` (the recurrent counterpart of SkipNet's RNN gate).

On a skip-ready backbone PPO and A2C can start from the recipe's gates (``--sb3-distill-epochs``): their
policy is first fitted to the gates' decisions on the environment's observations (behaviour cloning:
the actor to the gates' ``p(execute)``, the critic to the returns of the gates' routes), then RL goes
on from there, and the policy's threshold is calibrated to the recipe's budget on validation images
like the gates' own: a comparison of PPO with SkipNet's gates between agents that start equal.
RecurrentPPO can start from the gates themselves (``--sb3-from-gates``): its actor is given the
recurrent gate's structure and weights (:mod:`agents.sb3_from_gates`), so nothing is lost to cloning.

SB3's own ``save``/``load`` pickle objects; here only the policy's ``state_dict`` (and its
optimizer's) go into our atomic, ``weights_only`` checkpoints, and loading rebuilds the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env import VecEnv
from torch import Tensor

from agents.compute_price import ComputePrice
from agents.early_exit import exit_classifier_for
from agents.gates import GatePolicy
from agents.hybrid import EXPLORE, discounted_returns, explore_scale
from agents.policies import RoutingPolicy, SB3OneShotPolicy, SB3RoutingPolicy
from agents.registry import AgentContext, AgentSpec, EnvId, register_agent
from agents.skip_ready import load_gates
from agents.trainer import check_weights
from backbones.batching import batches
from backbones.checkpoint import atomic_save
from backbones.data import Dataset
from backbones.exits import ExitHeads
from backbones.options import COUNT, POSITIVE, check_options, option
from backbones.progress import progress_bar
from skipnet_env.core import SKIPNET_REWARD, BatchedRouting, RewardConfig


def _minibatch(env: VecEnv, n_steps: int) -> int:
    """An eighth of the rollout (which it divides exactly), at least 1."""
    return max(1, env.num_envs * n_steps // 8)


def _ppo_kwargs(env: VecEnv, seed: int, device: str, num_gates: int, lr: float | None) -> dict[str, Any]:
    n_steps = 2 * num_gates  # two episodes of every image per rollout
    return {
        "n_steps": n_steps,
        "batch_size": _minibatch(env, n_steps),
        "n_epochs": 4,
        "gamma": 1.0,
        "gae_lambda": 0.95,
        "learning_rate": 3e-4 if lr is None else lr,
        "seed": seed,
        "device": device,
        "verbose": 0,
    }


def _ppo(env: VecEnv, seed: int, device: str, num_gates: int, lr: float | None) -> BaseAlgorithm:
    from stable_baselines3 import PPO

    return PPO("MlpPolicy", env, **_ppo_kwargs(env, seed, device, num_gates, lr))


def _a2c(env: VecEnv, seed: int, device: str, num_gates: int, lr: float | None) -> BaseAlgorithm:
    from stable_baselines3 import A2C

    rate = 7e-4 if lr is None else lr
    return A2C("MlpPolicy", env, n_steps=num_gates, gamma=1.0, learning_rate=rate, seed=seed, device=device, verbose=0)


def _recurrent_ppo(env: VecEnv, seed: int, device: str, num_gates: int, lr: float | None) -> BaseAlgorithm:
    from sb3_contrib import RecurrentPPO

    return RecurrentPPO(
        "MlpLstmPolicy",
        env,
        policy_kwargs={"lstm_hidden_size": 32, "n_lstm_layers": 1},
        **_ppo_kwargs(env, seed, device, num_gates, lr),
    )


# each algorithm built on (env, seed, device, episode length, learning rate or None: its own)
SB3_ALGOS: dict[str, Callable[[VecEnv, int, str, int, float | None], BaseAlgorithm]] = {
    "ppo": _ppo,
    "a2c": _a2c,
    "recurrent_ppo": _recurrent_ppo,
}


def build_model(
    algo: str,
    env: VecEnv,
    seed: int,
    device: torch.device,
    episode_length: int,
    learning_rate: float | None = None,
    gates: GatePolicy | None = None,
) -> BaseAlgorithm:
    """``algo`` on ``env``, its rollouts sized by the episodes' length in steps (the gated blocks
    of ``SkipNet-v0``; 1 on ``SkipNetOneShot-v0``); ``learning_rate``: the algorithm's own where ``None``;
    ``gates``: RecurrentPPO's actor has their structure (:mod:`agents.sb3_from_gates`; their weights are
    loaded by :func:`agents.sb3_from_gates.load_gates_into`)."""
    where = "cuda" if device.type == "cuda" else "cpu"
    if gates is not None:
        from sb3_contrib import RecurrentPPO

        from agents.sb3_from_gates import RecurrentGatePolicy, gate_structure

        if algo != "recurrent_ppo":
            raise ValueError(f"--sb3-from-gates makes recurrent_ppo's actor the recipe's gate, not {algo}'s: for "
                             f"{algo}, --sb3-distill-epochs clones the gates' decisions")  # fmt: skip
        kwargs = _ppo_kwargs(env, seed, where, episode_length, learning_rate)
        model: BaseAlgorithm = RecurrentPPO(RecurrentGatePolicy, env, policy_kwargs=gate_structure(gates), **kwargs)
    else:
        model = SB3_ALGOS[algo](env, seed, where, episode_length, learning_rate)
    # SB3's default logger makes a folder in the system's temporary one at every learn(), even when it
    # writes nothing: a logger of its own writes nothing and makes none (the run logs to its TensorBoard)
    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def model_state(model: BaseAlgorithm) -> dict[str, Any]:
    return {
        "policy": model.policy.state_dict(),
        "optimizer": model.policy.optimizer.state_dict(),
        "num_timesteps": model.num_timesteps,
    }


def load_model_state(model: BaseAlgorithm, state: dict[str, Any]) -> None:
    model.policy.load_state_dict(state["policy"])
    model.policy.optimizer.load_state_dict(state["optimizer"])
    model.num_timesteps = int(state["num_timesteps"])


class CheckpointCallback(BaseCallback):
    """Saves the policy atomically after every ``every`` rollouts; stops on diverging weights
    (:func:`agents.trainer.check_weights`: the last good checkpoint stays in place)."""

    def __init__(
        self, path: Path, metadata: dict[str, Any], every: int = 10, bar: Any = None, extra: dict | None = None
    ) -> None:
        super().__init__()
        self.path, self.metadata, self.every, self.bar, self.rollouts = path, metadata, every, bar, 0
        # saved beside the model (a CNN's exit heads; the held budget's price, which HoldBudget writes into
        # this dict as training goes: the caller's own, never a copy)
        self.extra = {} if extra is None else extra

    def _on_step(self) -> bool:
        if self.bar is not None:
            self.bar.update(self.training_env.num_envs)
        return True

    def _on_rollout_end(self) -> None:
        check_weights(self.model.policy.named_parameters(), self.path)  # the trainers' divergence guard
        self.rollouts += 1
        if self.rollouts % self.every == 0:
            self.save()

    def save(self) -> None:
        atomic_save(
            {
                "metadata": {**self.metadata, "num_timesteps": self.model.num_timesteps},
                **model_state(self.model),
                **self.extra,
            },  # fmt: skip
            self.path,
        )


log = logging.getLogger(__name__)

# behaviour cloning's batch and learning rate (Adam, on the SB3 policy's parameters)
DISTILL_BATCH, DISTILL_LR = 256, 1e-3
# RL's learning rate for a policy that is the recipe's gates (--sb3-from-gates): PPO's own 3e-4 and 1e-4 moved them
# off their front on validation, 1e-5 kept it (BENCHMARKS.md section 22)
FROM_GATES_LR = 1e-5


def distill_from_gates(
    model: BaseAlgorithm,
    gates: GatePolicy,
    backbone: Any,
    data: Dataset,
    device: torch.device,
    epochs: int,
    alpha: float,
    seed: int = 0,
    precision: str = "auto",
    progress: bool = False,
    explore: float | None = None,
) -> dict[str, float]:
    """Fit ``model``'s policy (an ``MlpPolicy`` on ``SkipNet-v0``) to ``gates``: on every training
    image, the gates' greedy route through the environment, and at each gated block the policy's
    action distribution fitted to the gates' ``p(execute)`` (cross-entropy to the soft target) and its
    value to the route's return-to-go under SkipNet's reward at ``alpha``. ``explore``: the target is
    ``sigmoid(s x logit)``, ``s`` set on the first batch so that a decision sampled from it leaves the
    gates' with this probability (:func:`agents.hybrid.explore_scale`). Returns the last epoch's
    agreement (the policy's greedy decision = the gates'), losses and the scale."""
    scoring = RewardConfig(alpha=alpha, accuracy="neg_ce", cost_timing="per_step")  # SKIPNET_REWARD's
    core = BatchedRouting(backbone, scoring, gates.first_gated == 0, precision=precision)
    policy = model.policy
    assert isinstance(policy, ActorCriticPolicy)  # PPO's and A2C's MlpPolicy
    opt = torch.optim.Adam(policy.parameters(), lr=DISTILL_LR)
    generator = torch.Generator().manual_seed(seed)
    steps = -(-len(data) // DISTILL_BATCH)
    bar = progress_bar(epochs * steps, "distilling the recipe's gates", progress)
    record: dict[str, float] = {}
    scale: float | None = None if explore is not None else 1.0
    for _ in range(epochs):
        agree, actor_losses, value_losses = [], [], []
        for x, y in batches(data, DISTILL_BATCH, device, train=True, generator=generator):
            seen, logits, returns = gate_episodes(core, gates, x, y)
            if scale is None:  # once, on the first batch
                assert explore is not None
                scale = explore_scale(logits, explore)
            o = seen.to(policy.device)
            p = torch.sigmoid(scale * logits).to(policy.device)
            log_p = torch.log_softmax(action_logits(policy, o), dim=1)  # (N*B, 2)
            actor = -(p * log_p[:, 1] + (1 - p) * log_p[:, 0]).mean()
            value = F.mse_loss(policy.predict_values(o).flatten(), returns.reshape(-1).to(policy.device))
            opt.zero_grad(set_to_none=True)
            (actor + 0.5 * value).backward()
            opt.step()
            agree.append(((log_p[:, 1] > log_p[:, 0]) == (p >= 0.5)).float().mean().detach())
            actor_losses.append(actor.detach())
            value_losses.append(value.detach())
            bar.update(1)
        record = {
            "agreement": float(torch.stack(agree).mean()),
            "actor_loss": float(torch.stack(actor_losses).mean()),
            "value_loss": float(torch.stack(value_losses).mean()),
            "scale": float(scale or 1.0),
        }
    bar.close()
    return record


@torch.no_grad()
def gate_episodes(core: BatchedRouting, gates: GatePolicy, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The gates' greedy routes of images ``x`` (labels ``y``) through ``core``: the observations
    ``(N*B, obs_dim)`` and the gates' logits ``(N*B,)`` at every gated block (block-major), and the
    routes' returns-to-go ``(N, B)`` under ``core``'s reward."""
    obs = core.start(x, y)
    state = gates.initial_state(x.shape[0], x.device)
    seen, logits, rewards = [], [], []
    for k in range(core.num_gates):
        logit, state = gates(core.activation, k, state)
        seen.append(obs)
        logits.append(logit)
        obs, reward, _ = core.advance(logit >= 0)
        rewards.append(reward)
    return torch.cat(seen), torch.cat(logits), discounted_returns(torch.stack(rewards), 1.0)


def action_logits(policy: ActorCriticPolicy, obs: torch.Tensor) -> torch.Tensor:
    """``(B, 2)`` logits of skip / execute of a policy on ``SkipNet-v0``'s ``Discrete(2)`` actions
    (``(B, 3)`` with exit, under ``early_exit``)."""
    distribution = policy.get_distribution(obs).distribution
    assert isinstance(distribution, torch.distributions.Categorical)
    return distribution.logits


def recipe_gates(ctx: AgentContext) -> GatePolicy:
    """The gates the recipe trained beside the backbone (what ``--sb3-distill-epochs`` clones)."""
    if "gates" not in ctx.backbone_meta.get("skip_ready", {}) or "checkpoint" not in ctx.backbone_meta:
        raise ValueError(
            "--sb3-distill-epochs clones the recipe's gates: it needs a skip-ready backbone "
            "(--backbone-recipe skip_ready, or a skip-ready --backbone-checkpoint)"
        )
    return load_gates(ctx.backbone_meta["checkpoint"], ctx.backbone, ctx.device)


def gates_budget(ctx: AgentContext, algo: str) -> float | None:
    """The recipe's budget where the policy starts from its gates (``--sb3-distill-epochs``,
    ``--sb3-from-gates``): it is calibrated to it, as they are, and may hold it as it learns."""
    if not (ctx.options.from_gates or (ctx.options.distill_epochs > 0 and algo in DISTILLABLE)):
        return None
    return ctx.backbone_meta.get("skip_ready", {}).get("joint_config", {}).get("budget")


def joint_price(backbone_meta: dict[str, Any]) -> float | None:
    """The compute weight joint SP's gates ended at (its last epoch's), where the skip-ready backbone
    recorded it: the price at which they spend their budget."""
    history = backbone_meta.get("skip_ready", {}).get("history") or [{}]
    weight = history[-1].get("compute_weight")
    return None if weight is None else max(0.0, float(weight))


class HoldBudget(BaseCallback):
    """The reward's price of compute as a budget's multiplier (:class:`ComputePrice`): after each
    rollout the environment's ``alpha`` becomes the price at what the rollout's finished episodes
    spent (at least 0: the reward does not pay for compute), and the multiplier takes its step. A
    policy that starts from the recipe's gates then learns at their budget instead of drifting to the
    spending a fixed ``alpha`` would pay for. The price is kept in ``extra`` (what the checkpoint
    saves beside the model) and taken back from ``state`` on a resume.

    ``route``: whose spending is held. ``"sampled"``: the episodes' own, the decisions sampled.
    ``"greedy"``: what the policy's greedy decisions (the ones an evaluation takes) would spend along
    the sampled route, as SP prices its gates: sampled spending can stay at the budget while the greedy
    route drifts below it (BENCHMARKS.md section 26)."""

    def __init__(
        self, price: ComputePrice, extra: dict[str, Any], state: dict[str, Any] | None, route: str = "sampled"
    ) -> None:
        super().__init__()
        self.price, self.extra, self.route = price, extra, route
        self.spent: list[float] = []
        self.alpha = float(price.value)
        if state is not None and "compute_price" in state:
            self.price.load_state_dict({"value": state["compute_price"]["value"]})
            self.alpha = float(state["compute_price"]["alpha"])

    def _on_training_start(self) -> None:
        self.training_env.set_attr("alpha", self.alpha)
        if self.route == "greedy" and getattr(self.training_env.action_space, "n", None) != 2:
            raise ValueError("--sb3-hold-route greedy needs two actions (skip, execute): give --sb3-hold-route sampled")
        core = self.training_env.get_attr("core")[0]
        # per gated block: the share of the full network's FLOPs that executing it adds over skipping it
        self.extra_cost = ((core.exec_flops - core.skip_flops) / core.full_flops).cpu().numpy()
        n = self.training_env.num_envs
        self.block, self.greedy_minus_sampled = np.zeros(n, dtype=np.int64), np.zeros(n)

    def _on_step(self) -> bool:
        if self.route == "greedy":  # two actions (skip 0, execute 1): the greedy one has probability >= 1/2
            taken = np.asarray(self.locals["actions"]).reshape(-1)
            p_taken = torch.as_tensor(self.locals["log_probs"]).detach().exp().cpu().numpy().reshape(-1)
            greedy = np.where(p_taken >= 0.5, taken, 1 - taken)
            self.greedy_minus_sampled += (greedy - taken) * self.extra_cost[self.block]
            self.block += 1
        for i, (info, done) in enumerate(zip(self.locals["infos"], self.locals["dones"])):
            if done:
                self.spent.append(info["flops_fraction"] + self.greedy_minus_sampled[i])
                self.block[i], self.greedy_minus_sampled[i] = 0, 0.0
        return True

    def _on_rollout_end(self) -> None:
        if self.spent:
            spent = torch.tensor(self.spent)
            self.alpha = max(0.0, float(self.price.weight(spent)))
            self.price.update(spent)
            self.training_env.set_attr("alpha", self.alpha)
            self.spent = []
        self.extra["compute_price"] = {"value": self.price.value.clone(), "alpha": torch.tensor(self.alpha)}


def start_from_gates(model: BaseAlgorithm, gates: GatePolicy, ctx: AgentContext, explore: float | None) -> float:
    """Load ``gates`` into ``model``'s actor (:mod:`agents.sb3_from_gates`), their logits scaled so that a
    sampled decision leaves theirs with probability ``explore`` on a batch of training images (``None``:
    unscaled); returns the scale."""
    from agents.sb3_from_gates import load_gates_into

    scale = 1.0
    if explore is not None:
        precision = ctx.cfg.precision
        core = BatchedRouting(ctx.backbone, RewardConfig(alpha=0.0), gates.first_gated == 0, precision=precision)
        generator = torch.Generator().manual_seed(ctx.cfg.seed)
        x, y = next(iter(batches(ctx.train_data, DISTILL_BATCH, ctx.device, train=True, generator=generator)))
        scale = explore_scale(gate_episodes(core, gates, x, y)[1], explore)
    load_gates_into(model.policy, gates, scale)  # type: ignore[arg-type]
    return scale


# the smoke runs' steps: rollouts of both envs
SMOKE: dict[str, tuple[str, ...]] = {
    "SkipNet-v0": ("--sb3-timesteps", "600", "--num-envs", "16"),
    "SkipNetOneShot-v0": ("--sb3-timesteps", "128", "--num-envs", "16"),
}


@dataclass
class SB3Config:
    """Stable-Baselines3 agents (ppo, a2c, recurrent_ppo, ppo_oneshot).

    Their algorithms' own settings: :mod:`agents.sb3_agents`."""

    flag_prefix: ClassVar[str] = "sb3_"

    timesteps: int = option(150_000, COUNT, was=("timesteps",))
    """environment steps to train for (image-blocks; images for ppo_oneshot; 0 with --sb3-distill-epochs: the
    policy cloned from the recipe's gates, as it is)"""
    learning_rate: float | None = option(None, POSITIVE, was=("learning_rate",))
    """the optimizer's learning rate (default: the algorithm's, PPO 3e-4, A2C 7e-4; 1e-5 with --sb3-from-gates, chosen
    on validation over 1e-4 and 3e-4: BENCHMARKS.md section 22)"""
    distill_epochs: int = option(0, COUNT, was=("distill_epochs",))
    """ppo, a2c on a skip-ready backbone: epochs of behaviour cloning of the recipe's gates before RL (the policy
    starts from the gates' decisions; its threshold is then calibrated to --joint-budget on validation); 0: new"""
    distill_explore: float | None = option(0.1, EXPLORE, was=("distill_explore",))
    """ppo, a2c with --sb3-distill-epochs, recurrent_ppo with --sb3-from-gates: the policy leaves the gates' decisions
    with this probability (their p(execute) sharpened by one scale, as --hrl-explore does; 0.1 chosen on validation
    over None, the gates' own p(execute), close to coin flips for joint SP's thresholded gates: BENCHMARKS.md
    section 18)"""
    hold_budget: bool | None = None
    """ppo, a2c, recurrent_ppo started from the recipe's gates: the reward's price of compute follows their budget
    (a multiplier stepped after each rollout, from --sb3-hold-from), so that RL goes on at the budget they are
    calibrated to (default: on with --sb3-from-gates, off with --sb3-distill-epochs)"""
    hold_from: Literal["joint", "alpha"] = "joint"
    """with the budget held: where its price starts, at the compute weight joint SP's gates ended at (joint: the
    price at which they spend the budget) or at --alpha (from --alpha 1, PPO's greedy routes fell to 37% of the
    FLOPs, and calibrated back to the budget lost 0.13 points on test: BENCHMARKS.md section 26)"""
    hold_route: Literal["greedy", "sampled"] = "greedy"
    """with the budget held: whose spending its price follows, what the policy's greedy decisions, the evaluation's,
    spend along the sampled episodes (greedy; as SP prices its gates) or the sampled episodes' own (sampled); greedy
    and joint chosen on validation over the other three pairs, 5 seeds: BENCHMARKS.md section 26"""
    from_gates: bool = False
    """recurrent_ppo on a skip-ready backbone: its actor is the recipe's recurrent gate, weights and all (it starts
    deciding as they do; --sb3-distill-explore sets how often a sampled decision leaves theirs; the critic starts new),
    calibrated to --joint-budget on validation like them; with --sb3-timesteps 0, the gates themselves"""
    early_exit: bool = option(False, was=("early_exit",))
    """ppo, a2c, recurrent_ppo: decide in SkipNet-v0 with its exit action (2: this block and every later one skipped,
    the image classified from there: by the head where it reads any depth, a ViT; on a CNN by exit heads fitted beside
    the backbone on the training images); compute is priced by --alpha"""

    def __post_init__(self) -> None:
        check_options(self)
        if self.early_exit and (self.distill_epochs or self.from_gates):
            raise ValueError("--sb3-distill-epochs and --sb3-from-gates start from the recipe's gates, which never "
                             "exit: leave out --sb3-early-exit")  # fmt: skip
        if self.distill_epochs and self.from_gates:
            raise ValueError("--sb3-from-gates (recurrent_ppo: the gates' weights) and --sb3-distill-epochs (ppo, "
                             "a2c: their decisions cloned) are two ways to start from the gates: give one")  # fmt: skip
        if self.timesteps == 0 and self.distill_epochs == 0 and not self.from_gates:
            raise ValueError("--sb3-timesteps 0 would evaluate an untrained policy: give --sb3-distill-epochs or "
                             "--sb3-from-gates too (the policy started from the recipe's gates, as it is) or "
                             "--sb3-timesteps N")  # fmt: skip


def _sb3(algo: str, env_id: EnvId = "SkipNet-v0") -> AgentSpec:
    """An SB3 algorithm on ``SkipNet-v0`` (block by block) or ``SkipNetOneShot-v0`` (one mask per image)."""
    oneshot = env_id == "SkipNetOneShot-v0"

    def make(ctx: AgentContext, state: dict | None = None) -> tuple[BaseAlgorithm, ExitHeads | None]:
        from skipnet_env.sb3_bridge import make_sb3_env

        heads = None  # with the exit action on a CNN: where the exited images are classified
        if ctx.options.early_exit:
            classifier = exit_classifier_for(ctx, state)
            heads = classifier if isinstance(classifier, ExitHeads) else None
        env = make_sb3_env(
            ctx.cfg.batch_sizes()[0],
            env_id,
            backbone=ctx.backbone,
            dataset=ctx.train_data,
            alpha=ctx.cfg.alpha,
            **({} if oneshot else SKIPNET_REWARD),
            device=ctx.device,
            precision=ctx.cfg.precision,
            **({"early_exit": True, "exit_heads": heads} if ctx.options.early_exit else {}),
        )
        env.seed(ctx.cfg.seed)
        episode_length = 1 if oneshot else env.get_attr("num_gates")[0]
        gates, rate = None, ctx.options.learning_rate
        if ctx.options.from_gates:
            gates, rate = recipe_gates(ctx), FROM_GATES_LR if rate is None else rate
        model = build_model(algo, env, ctx.cfg.seed, ctx.device, episode_length, rate, gates)
        return model, heads

    def policy(
        model: BaseAlgorithm, ctx: AgentContext, state: dict | None = None, heads: ExitHeads | None = None
    ) -> RoutingPolicy:
        if oneshot:
            return SB3OneShotPolicy(model, f"{algo}_oneshot")
        # a policy cloned from the recipe's gates is calibrated to their budget, as they are
        budget = gates_budget(ctx, algo)
        threshold = float((state or {}).get("threshold", 0.0))  # a calibration's, written beside the model
        return SB3RoutingPolicy(model, algo, threshold, budget, ctx.options.early_exit, heads)

    def train(ctx: AgentContext, state: dict | None) -> RoutingPolicy:
        model, heads = make(ctx, state)
        if state is not None:
            load_model_state(model, state)
        elif ctx.options.distill_epochs:
            if algo not in DISTILLABLE or oneshot:
                raise ValueError(
                    f"--sb3-distill-epochs applies to {', '.join(DISTILLABLE)} (block by block), not {algo}"
                )
            fit = distill_from_gates(
                model, recipe_gates(ctx), ctx.backbone, ctx.train_data, ctx.device, ctx.options.distill_epochs,
                ctx.cfg.alpha, ctx.cfg.seed, ctx.cfg.precision, ctx.cfg.progress, ctx.options.distill_explore,
            )  # fmt: skip
            log.info(
                "%s starts from the recipe's gates: %d epochs of behaviour cloning, the policy's greedy decision is "
                "the gates' at %.1f%% of the blocks", algo, ctx.options.distill_epochs, 100 * fit["agreement"],
            )  # fmt: skip
        elif ctx.options.from_gates:
            scale = start_from_gates(model, recipe_gates(ctx), ctx, ctx.options.distill_explore)
            log.info("%s's actor is the recipe's gate (its logits x %.3g), RL at learning rate %g", algo, scale,
                     model.policy.optimizer.param_groups[0]["lr"])  # fmt: skip
        timesteps = ctx.options.timesteps
        remaining = timesteps - model.num_timesteps
        bar = progress_bar(timesteps, f"{algo} (SB3)", ctx.cfg.progress, initial=model.num_timesteps)
        extra: dict[str, Any] = {} if heads is None else {"exit_heads": heads.state_dict()}
        callback = CheckpointCallback(ctx.checkpoint, {**ctx.metadata, "stage": "train"}, bar=bar, extra=extra)
        callbacks: list[BaseCallback] = [callback]
        budget = gates_budget(ctx, algo)
        hold = ctx.options.hold_budget if ctx.options.hold_budget is not None else ctx.options.from_gates
        if hold and budget is not None:  # before the checkpoint's save: its price saved with it
            start = joint_price(ctx.backbone_meta) if ctx.options.hold_from == "joint" else ctx.cfg.alpha
            price = ComputePrice(ctx.cfg.alpha if start is None else start, budget, torch.device("cpu"))
            callbacks.insert(0, HoldBudget(price, extra, state, ctx.options.hold_route))
            log.info("%s holds the recipe's budget %g: the reward's price of compute, from %.3g, follows the %s "
                     "route's spending", algo, budget, float(price.value), ctx.options.hold_route)  # fmt: skip
        if remaining > 0:
            model.learn(total_timesteps=remaining, callback=callbacks, reset_num_timesteps=state is None)
        else:  # a finished run resumed: nothing to train, the model is only saved again
            callback.init_callback(model)
        bar.close()
        callback.metadata["stage"] = "done"
        callback.save()
        return policy(model, ctx, heads=heads)

    def load(ctx: AgentContext, state: dict) -> RoutingPolicy:
        model, heads = make(ctx, state)
        load_model_state(model, state)
        return policy(model, ctx, state, heads)

    return AgentSpec(train, load, env=env_id, options=SB3Config, part="sb3", smoke=SMOKE[env_id])


# the SB3 agents whose policy can start from the recipe's gates (an MLP on SkipNet-v0's observations)
DISTILLABLE = ("ppo", "a2c")
for _algo in ("ppo", "a2c", "recurrent_ppo"):
    register_agent(_algo, _sb3(_algo))
register_agent("ppo_oneshot", _sb3("ppo", "SkipNetOneShot-v0"))
