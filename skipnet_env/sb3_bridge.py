"""Stable-Baselines3 ``VecEnv`` over the batched environments, so
``stable_baselines3.PPO("MlpPolicy", make_sb3_env(...))`` trains on B images in lockstep, block
by block (``SkipNet-v0``) or a whole mask per image (``SkipNetOneShot-v0``, ``MultiBinary``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env import VecEnv, VecMonitor
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from skipnet_env.oneshot import SkipNetOneShotVectorEnv
from skipnet_env.vector_env import SkipNetVectorEnv

VECTOR_ENVS = {"SkipNet-v0": SkipNetVectorEnv, "SkipNetOneShot-v0": SkipNetOneShotVectorEnv}


class SB3VecEnv(VecEnv):
    """Adapts a batched env (numpy mode) to SB3's ``VecEnv`` interface."""

    def __init__(self, venv: SkipNetVectorEnv | SkipNetOneShotVectorEnv) -> None:
        if venv.return_tensors:
            raise ValueError("the SB3 bridge needs a SkipNetVectorEnv with return_tensors=False")
        self.venv = venv
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self._actions: np.ndarray | None = None

    def reset(self) -> np.ndarray:
        seed = self._seeds[0] if self._seeds and self._seeds[0] is not None else None
        obs, _ = self.venv.reset(seed=seed)
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs, *(self.action_space.shape or ()))

    def step_wait(self) -> VecEnvStepReturn:
        obs, reward, terminated, truncated, info = self.venv.step(self._actions)
        dones = terminated | truncated
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]  # SB3's API: one dict per env
        if dones.any():
            final = info["final_info"]
            for i, env_info in enumerate(infos):
                env_info["terminal_observation"] = info["final_obs"][i]
                env_info["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
                env_info["is_success"] = bool(final["correct"][i])
                env_info["flops_fraction"] = float(final["flops_fraction"][i])
        return obs, reward.astype(np.float32), dones, infos

    def close(self) -> None:
        self.venv.close()

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(self.venv, attr_name)] * len(self._get_indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *args: Any, indices: Any = None, **kwargs: Any) -> list[Any]:
        result = getattr(self.venv, method_name)(*args, **kwargs)
        return [result] * len(self._get_indices(indices))

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False] * len(self._get_indices(indices))

    def _get_indices(self, indices: Any) -> Sequence[int]:
        if indices is None:
            return range(self.num_envs)
        return [indices] if isinstance(indices, int) else list(indices)


def make_sb3_env(num_envs: int = 64, env_id: str = "SkipNet-v0", **env_kwargs: Any) -> VecMonitor:
    """A monitored SB3 ``VecEnv`` of ``num_envs`` images in lockstep (episode returns logged)."""
    if env_id not in VECTOR_ENVS:
        raise ValueError(f"env_id must be one of {', '.join(VECTOR_ENVS)}, got {env_id!r}")
    return VecMonitor(SB3VecEnv(VECTOR_ENVS[env_id](num_envs, **env_kwargs)))
