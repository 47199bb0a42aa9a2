"""The batched ``SkipNet-v0``: B images in lockstep on the backbone's device.

Registered as the ``vector_entry_point`` of ``SkipNet-v0``::

    envs = gymnasium.make_vec("SkipNet-v0", num_envs=256, vectorization_mode="vector_entry_point")

All B episodes have the same length (one step per gated block), so they end together and are
reset together on the same step (``AutoresetMode.SAME_STEP``) with the next batch of the data set;
the last observation and info are in ``info["final_obs"]`` and ``info["final_info"]``. With
``early_exit=True`` (action 2: exit) an image that exits has every later block skipped and its later
actions ignored until the batch ends; its observation and ``info["exited"]`` say so.

With ``return_tensors=True`` observations, rewards, flags and infos are torch tensors on the
device (no copy); otherwise numpy arrays. ``env.activation`` is the current activation map
``(B, C, H, W)`` for agents that look at the whole map.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from torch import Tensor
from typing_extensions import Unpack

from skipnet_env.core import RewardConfig
from skipnet_env.env import action_names, observation_space
from skipnet_env.sources import (
    DEFAULT_BACKBONE,
    DEFAULT_DATASET,
    BackboneSpec,
    BatchSampler,
    DatasetSpec,
    EnvOptions,
    build_sources,
)


def as_actions(actions: Any, shape: tuple[int, ...], floats: bool, n: int = 2) -> np.ndarray:
    """An int array of ``shape`` from actions of ``Discrete(n)`` (0 skip, 1 execute, 2 exit), else a
    ``ValueError`` saying what arrived. ``floats``: exact 0.0 / 1.0 floats count too (what SB3 samples
    from a ``MultiBinary`` space)."""
    arr = np.asarray(actions)
    kinds = "integers or bools" + (", or floats 0.0 / 1.0" if floats else "")
    numeric = np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_
    if arr.shape != shape or not (numeric or (floats and np.issubdtype(arr.dtype, np.floating))):
        raise ValueError(
            f"actions must be an array of shape {shape} holding {action_names(n)} as {kinds}, got shape "
            f"{arr.shape} dtype {arr.dtype}"
        )
    valid = np.isin(arr, np.arange(n))
    if not np.all(valid):
        raise ValueError(f"actions must be {action_names(n)}, got values {np.unique(arr[~valid]).tolist()}")
    return arr.astype(np.int64)


def as_mask(actions: Any, shape: tuple[int, ...], floats: bool) -> np.ndarray:
    """A bool execute mask of ``shape`` from a 0/1 array (:func:`as_actions`)."""
    return as_actions(actions, shape, floats) == 1


class RoutingVectorEnv(VectorEnv):
    """What the batched envs share (``SkipNet-v0``'s :class:`SkipNetVectorEnv` and
    ``SkipNetOneShot-v0``'s): B images in lockstep on the backbone's device, drawn batch after batch
    by a :class:`~skipnet_env.sources.BatchSampler`; every episode of a batch ends on the same step
    and the next batch starts on it (``AutoresetMode.SAME_STEP``); outputs as numpy arrays or, with
    ``return_tensors``, as tensors on the device; 0/1 actions checked with one host sync.

    A subclass sets its spaces in :meth:`spaces` (called once the sources are built) and writes
    ``reset`` and ``step``.

    Args:
        num_envs: images per batch (B).
        backbone, dataset, **options: the sources (:func:`skipnet_env.sources.build_sources`).
        return_tensors: return torch tensors on the device instead of numpy arrays.
        differentiable: keep the autograd graph through the backbone; needs ``return_tensors``.
        num_workers: data-loader workers for image folders.
    """

    metadata: dict[str, Any] = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(
        self,
        num_envs: int = 64,
        backbone: BackboneSpec = DEFAULT_BACKBONE,
        dataset: DatasetSpec = DEFAULT_DATASET,
        *,
        return_tensors: bool = False,
        differentiable: bool = False,
        num_workers: int = 0,
        **options: Unpack[EnvOptions],
    ) -> None:
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        if differentiable and not return_tensors:
            raise ValueError("differentiable=True needs return_tensors=True (numpy arrays carry no gradient)")
        sources = build_sources(backbone, dataset, differentiable, **options)
        self.device, self.backbone, self.core = sources.device, sources.backbone, sources.core
        self.sampler = BatchSampler(sources.data, num_envs, self.device, num_workers)
        self.num_envs, self.num_gates, self.return_tensors = num_envs, self.core.num_gates, return_tensors
        self.single_observation_space, self.single_action_space = self.spaces()
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        # constant (B,) flags and info masks, made once in the output's own kind: no copy per step
        ones, zeros = torch.ones(num_envs, dtype=torch.bool), torch.zeros(num_envs, dtype=torch.bool)
        self._all = ones.to(self.device) if return_tensors else ones.numpy()
        self._none = zeros.to(self.device) if return_tensors else zeros.numpy()

    @property
    def reward(self) -> RewardConfig:
        """The reward's scoring rule (set its compute weight with :attr:`alpha`)."""
        return self.core.reward

    @property
    def alpha(self) -> float:
        """The weight of compute in the reward (each block costs ``alpha`` x its share of the FLOPs)."""
        return self.core.reward.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        """Price compute anew from the next step on (a budget's price, as it moves: below 0 where the
        gates spend less than the budget, compute is rewarded)."""
        if not math.isfinite(value):
            raise ValueError(f"alpha must be a finite number, got {value}")
        self.core.reward = dataclasses.replace(self.core.reward, alpha=float(value))

    def spaces(self) -> tuple[spaces.Space, spaces.Space]:
        """One env's observation and action spaces."""
        raise NotImplementedError

    def _check_actions(self, actions: Any, exited: Tensor | None = None) -> tuple[Tensor, Tensor | None, list[int]]:
        """The execute mask ``(B, *action shape)`` bool on the device; with ``exited`` (early exit: the
        episodes stopped already, which execute nothing) the exit mask (action 2), else ``None``; and
        how many images execute each gated block it decides (a list on the host: the one sync)."""
        shape, n = (self.num_envs, *(self.single_action_space.shape or ())), 2 if exited is None else 3
        if isinstance(actions, Tensor):
            if tuple(actions.shape) != shape or actions.is_floating_point() or actions.is_complex():
                raise ValueError(
                    f"actions must be a {shape} integer or bool tensor of {action_names(n)}, got "
                    f"{tuple(actions.shape)} {actions.dtype}"
                )
            a = actions.to(self.device).long()
        else:
            floats = isinstance(self.single_action_space, spaces.MultiBinary)
            a = torch.from_numpy(as_actions(actions, shape, floats, n)).to(self.device)
        execute, exit = a == 1, (a == 2) if exited is not None else None
        if exited is not None:
            execute &= ~exited
        stats = torch.cat([execute.sum(0).reshape(-1), ((a < 0) | (a >= n)).sum().reshape(1)]).tolist()
        if stats[-1]:
            raise ValueError(f"actions must be {action_names(n)}; {stats[-1]} of {a.numel()} were none of these")
        return execute, exit, stats[:-1]

    def _out(self, x: Tensor) -> Any:
        return x if self.return_tensors else x.cpu().numpy()

    def _constant(self, x: Any) -> Any:
        """A constant flag array, already in the output's kind; numpy callers get their own copy."""
        return x if self.return_tensors else x.copy()

    def _out_info(self, info: dict[str, Tensor]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in info.items():
            out[key] = self._out(value)
            out[f"_{key}"] = self._constant(self._all)
        return out

    def _autoreset_info(self, final_obs: Tensor, final_info: dict[str, Tensor]) -> dict[str, Any]:
        """The ended episodes' last observation and info, as same-step autoreset hands them over."""
        if not self.return_tensors:
            final_info.pop("logits", None)
        return {
            "final_obs": self._out(final_obs),
            "_final_obs": self._constant(self._all),
            "final_info": self._out_info(final_info),
            "_final_info": self._constant(self._all),
        }


class SkipNetVectorEnv(RoutingVectorEnv):
    """``num_envs`` images per episode batch; ``backbone``, ``dataset`` and ``**options`` as
    :class:`skipnet_env.env.SkipNetEnv` (:func:`skipnet_env.sources.build_sources`), plus the
    arguments of :class:`RoutingVectorEnv`. With ``return_tensors`` the final info carries the
    ``logits`` too; with ``differentiable``, ``activation`` and the final ``logits`` require grad
    where the backbone does.
    """

    def spaces(self) -> tuple[spaces.Space, spaces.Space]:
        return observation_space(self.core.obs_dim), spaces.Discrete(3 if self.core.early_exit else 2)

    @property
    def activation(self) -> Tensor:
        """The current activation map ``(B, C, H, W)`` on the device (the input of the next gated
        block), in the backbone's compute precision. On the frozen engine the next step may write it
        in place: clone it to keep it."""
        if self.core.h is None:
            raise RuntimeError("no activation before reset()")
        return self.core.h

    @property
    def step_index(self) -> int:
        """Index (0-based, among gated blocks) of the block the next action decides."""
        return self.core.step_index

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self.sampler.seed(seed)
        obs = self.core.start(*self.sampler.next())
        return self._out(obs), self._out_info({"label": self.core.labels})

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict]:
        if self.core.h is None:
            raise RuntimeError("step() called before reset(): call reset() first")
        exited = self.core.exited if self.core.early_exit else None
        execute, exit, (num_execute,) = self._check_actions(actions, exited)
        obs, reward, info = self.core.advance(execute, num_execute, exit)
        done = self.core.done
        out_info: dict[str, Any] = {}
        if done:  # same-step autoreset: every episode ends on this step
            out_info = self._autoreset_info(obs, info)
            obs = self.core.start(*self.sampler.next())
            info = {"label": self.core.labels}
        out_info.update(self._out_info(info))
        flag = self._all if done else self._none
        return self._out(obs), self._out(reward), self._constant(flag), self._constant(self._none), out_info
