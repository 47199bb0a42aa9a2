"""``SkipNet-v0``: one image per episode, one step per gated residual block.

Action ``Discrete(2)``: 0 skips the next block (its shortcut is applied), 1 executes it; with the
option ``early_exit=True``, ``Discrete(3)``: 2 exits (this block and every later one skipped, the
head classifies from here, and the episode ends).
Observation ``Box((C_max + N + 1,))``: the activation pooled over space (zero-padded to the widest
block), the one-hot position of the block being decided, (with ``early_exit``, a flag: 1 once the
episode has exited,) and the fraction of the full network's FLOPs spent so far. Reward: see
:class:`skipnet_env.core.RewardConfig`.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from typing_extensions import Unpack

from backbones.data import ImageTensors
from skipnet_env.sources import (
    DEFAULT_BACKBONE,
    DEFAULT_DATASET,
    BackboneSpec,
    DatasetSpec,
    EnvOptions,
    build_sources,
    one_image,
)


def observation_space(obs_dim: int) -> spaces.Box:
    return spaces.Box(-np.inf, np.inf, shape=(obs_dim,), dtype=np.float32)


class SkipNetEnv(gym.Env[np.ndarray, Any]):
    """One image per episode; the backbone and the image stay on ``device``.

    Args:
        backbone: a :class:`backbones.Backbone`, a checkpoint path, or a registry name.
        dataset: a data set name or an ``ImageTensors``.
        **options: ``split``, ``alpha``, ``accuracy_reward``, ``cost_timing``,
            ``gate_first_block``, ``device``, ``data_root``, ``download``, ``image_size``,
            ``backbone_train``, ``precision``, ``early_exit``: see :func:`skipnet_env.sources.build_sources`.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        backbone: BackboneSpec = DEFAULT_BACKBONE,
        dataset: DatasetSpec = DEFAULT_DATASET,
        **options: Unpack[EnvOptions],
    ) -> None:
        sources = build_sources(backbone, dataset, **options)
        self.device, self.backbone, self.core = sources.device, sources.backbone, sources.core
        data = sources.data
        self.data = data.to(self.device) if isinstance(data, ImageTensors) else data
        self.num_gates = self.core.num_gates
        self.observation_space = observation_space(self.core.obs_dim)
        self.action_space = spaces.Discrete(3 if self.core.early_exit else 2)
        self._execute = torch.tensor([[False], [True]], device=self.device)  # (2, 1): action -> mask, no copy per step
        self._index = -1

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """Start an episode on a random image, or on ``options["index"]``."""
        super().reset(seed=seed)
        self._index, x, y = one_image(self.data, self.device, self.np_random, options)
        obs = self.core.start(x, y)
        return obs[0].cpu().numpy(), {"index": self._index, "label": int(self.core.labels[0])}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self.core.h is None or self.core.done:
            raise RuntimeError("step() called after the episode ended (or before reset()): call reset() first")
        a = check_action(action, 3 if self.core.early_exit else 2)
        if a == EXIT:  # this block and every later one skipped: the episode ends here
            obs, reward, info = self.core.advance(self._execute[0], 0, exit=self._execute[1])
            while not self.core.done:
                obs, later, info = self.core.advance(self._execute[0], 0)
                reward = reward + later
        else:
            obs, reward, info = self.core.advance(self._execute[a], num_execute=a)
        out_info: dict[str, Any] = {"index": self._index}
        for key, value in info.items():
            if key != "logits":
                out_info[key] = value[0].cpu().numpy() if value.ndim > 1 else value[0].item()
        return obs[0].cpu().numpy(), float(reward[0]), self.core.done, False, out_info


EXIT = 2  # the action that stops an episode early (env option early_exit)


def action_names(n: int) -> str:
    return "0 (skip) or 1 (execute)" if n == 2 else "0 (skip), 1 (execute) or 2 (exit)"


def check_action(action: Any, n: int = 2) -> int:
    """An action of ``Discrete(n)`` from an int-like ``action``, else a ``ValueError`` that says what arrived."""
    arr = np.asarray(action)
    if arr.shape != ():
        raise ValueError(
            f"SkipNet-v0 takes one action per step, a scalar {action_names(n)}; got an array of shape "
            f"{arr.shape}. For batches use gymnasium.make_vec('SkipNet-v0', num_envs=B)."
        )
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_) or not 0 <= int(arr) < n:
        raise ValueError(f"action must be {action_names(n)}, got {action!r} ({arr.dtype})")
    return int(arr)
