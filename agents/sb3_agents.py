"""Stable-Baselines3 baselines on the same batched environment: PPO and A2C with ``MlpPolicy``,
sb3-contrib's RecurrentPPO with ``MlpLstmPolicy`` (the recurrent counterpart of SkipNet's RNN gate).

SB3's own ``save``/``load`` pickle objects; here only the policy's ``state_dict`` (and its
optimizer's) go into our atomic, ``weights_only`` checkpoints, and loading rebuilds the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.vec_env import VecEnv

from agents.policies import RoutingPolicy, SB3OneShotPolicy, SB3RoutingPolicy
from agents.registry import AgentContext, AgentSpec, EnvId, register_agent
from agents.trainer import check_weights
from backbones.checkpoint import atomic_save
from backbones.options import POSITIVE_INT, check_options, option
from backbones.progress import progress_bar
from skipnet_env.core import SKIPNET_REWARD


def _minibatch(env: VecEnv, n_steps: int) -> int:
    """An eighth of the rollout (which it divides exactly), at least 1."""
    return max(1, env.num_envs * n_steps // 8)


def _ppo_kwargs(env: VecEnv, seed: int, device: str, num_gates: int) -> dict[str, Any]:
    n_steps = 2 * num_gates  # two episodes of every image per rollout
    return {
        "n_steps": n_steps,
        "batch_size": _minibatch(env, n_steps),
        "n_epochs": 4,
        "gamma": 1.0,
        "gae_lambda": 0.95,
        "learning_rate": 3e-4,
        "seed": seed,
        "device": device,
        "verbose": 0,
    }


def _ppo(env: VecEnv, seed: int, device: str, num_gates: int) -> BaseAlgorithm:
    from stable_baselines3 import PPO

    return PPO("MlpPolicy", env, **_ppo_kwargs(env, seed, device, num_gates))


def _a2c(env: VecEnv, seed: int, device: str, num_gates: int) -> BaseAlgorithm:
    from stable_baselines3 import A2C

    return A2C("MlpPolicy", env, n_steps=num_gates, gamma=1.0, learning_rate=7e-4, seed=seed, device=device, verbose=0)


def _recurrent_ppo(env: VecEnv, seed: int, device: str, num_gates: int) -> BaseAlgorithm:
    from sb3_contrib import RecurrentPPO

    return RecurrentPPO(
        "MlpLstmPolicy",
        env,
        policy_kwargs={"lstm_hidden_size": 32, "n_lstm_layers": 1},
        **_ppo_kwargs(env, seed, device, num_gates),
    )


SB3_ALGOS: dict[str, Callable[[VecEnv, int, str, int], BaseAlgorithm]] = {
    "ppo": _ppo,
    "a2c": _a2c,
    "recurrent_ppo": _recurrent_ppo,
}


def build_model(algo: str, env: VecEnv, seed: int, device: torch.device, episode_length: int) -> BaseAlgorithm:
    """``algo`` on ``env``, its rollouts sized by the episodes' length in steps (the gated blocks
    of ``SkipNet-v0``; 1 on ``SkipNetOneShot-v0``)."""
    model = SB3_ALGOS[algo](env, seed, "cuda" if device.type == "cuda" else "cpu", episode_length)
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

    def __init__(self, path: Path, metadata: dict[str, Any], every: int = 10, bar: Any = None) -> None:
        super().__init__()
        self.path, self.metadata, self.every, self.bar, self.rollouts = path, metadata, every, bar, 0

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
            {"metadata": {**self.metadata, "num_timesteps": self.model.num_timesteps}, **model_state(self.model)},
            self.path,
        )


# the smoke runs' steps: rollouts of both envs
SMOKE: dict[str, tuple[str, ...]] = {
    "SkipNet-v0": ("--timesteps", "600", "--num-envs", "16"),
    "SkipNetOneShot-v0": ("--timesteps", "128", "--num-envs", "16"),
}


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
        return build_model(algo, env, ctx.cfg.seed, ctx.device, episode_length)

    def policy(model) -> RoutingPolicy:
        return SB3OneShotPolicy(model, f"{algo}_oneshot") if oneshot else SB3RoutingPolicy(model, algo)

    def train(ctx: AgentContext, state: dict | None) -> RoutingPolicy:
        model = make(ctx)
        if state is not None:
            load_model_state(model, state)
        timesteps = ctx.options.timesteps
        remaining = timesteps - model.num_timesteps
        bar = progress_bar(timesteps, f"{algo} (SB3)", ctx.cfg.progress, initial=model.num_timesteps)
        callback = CheckpointCallback(ctx.checkpoint, {**ctx.metadata, "stage": "train"}, bar=bar)
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
        load_model_state(model, state)
        return policy(model)

    return AgentSpec(train, load, env=env_id, options=SB3Config, part="sb3", smoke=SMOKE[env_id])


for _algo in ("ppo", "a2c", "recurrent_ppo"):
    register_agent(_algo, _sb3(_algo))
register_agent("ppo_oneshot", _sb3("ppo", "SkipNetOneShot-v0"))
