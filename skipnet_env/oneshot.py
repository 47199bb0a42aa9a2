"""``SkipNetOneShot-v0``: BlockDrop's framing. One step per image: the agent sees the image (or
the stem's activation) and picks the whole execute mask at once.

Action ``MultiBinary(N)``: 1 executes gated block ``k``, 0 skips it. Observation: the normalised
image ``(C, H, W)`` (``observation="image"``, default) or the activation entering the first gated
block (``"stem"``). Reward: the same accuracy-minus-compute as ``SkipNet-v0``
(:class:`skipnet_env.core.RewardConfig`, summed over the blocks). Every episode is one step long.

The batched :class:`SkipNetOneShotVectorEnv` (the ``vector_entry_point``) runs the mask through the
same routed execution as ``SkipNet-v0`` (:class:`skipnet_env.core.BatchedRouting`, one engine),
block by block, with one host sync per step for all the blocks' executed counts.
"""

from __future__ import annotations

from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor
from typing_extensions import Unpack

from backbones.data import ImageTensors
from skipnet_env.core import BatchedRouting
from skipnet_env.sources import (
    DEFAULT_BACKBONE,
    DEFAULT_DATASET,
    BackboneSpec,
    DatasetSpec,
    EnvOptions,
    build_sources,
    one_image,
)
from skipnet_env.vector_env import RoutingVectorEnv, as_mask

Observation = Literal["image", "stem"]


def observation_shape(core: BatchedRouting, observation: Observation) -> tuple[int, ...]:
    if observation == "image":
        return tuple(core.backbone.input_size)
    if observation == "stem":
        return tuple(core.backbone.activation_shapes[core.first_gated])
    raise ValueError(f"observation must be 'image' or 'stem', got {observation!r}")


def run_mask(core: BatchedRouting, images: Tensor, labels: Tensor, execute: Tensor, counts: list[int]) -> tuple:
    """One episode per image: ``execute`` ``(B, N)`` bool through the gated blocks; returns the
    stem observation ``(B, C, H, W)`` (fp32), the total reward ``(B,)`` and the final info."""
    core.start(images, labels)
    stem = core.activation.to(torch.float32, copy=True)  # the routing writes the activation in place
    total = torch.zeros(images.shape[0], device=images.device)
    info: dict[str, Tensor] = {}
    for k in range(core.num_gates):
        _, reward, info = core.advance(execute[:, k], counts[k])
        total += reward
    return stem, total, info


def refuse_early_exit(options: Any) -> None:
    if options.get("early_exit"):
        raise ValueError(
            "early_exit is an option of SkipNet-v0 (block by block); in SkipNetOneShot-v0 a mask that skips every "
            "block after block k is an exit at k"
        )


class SkipNetOneShotEnv(gym.Env[np.ndarray, np.ndarray]):
    """One image per episode, one step. Arguments as :class:`skipnet_env.env.SkipNetEnv`, plus
    ``observation`` (``"image"`` or ``"stem"``)."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        backbone: BackboneSpec = DEFAULT_BACKBONE,
        dataset: DatasetSpec = DEFAULT_DATASET,
        observation: Observation = "image",
        **options: Unpack[EnvOptions],
    ) -> None:
        refuse_early_exit(options)
        sources = build_sources(backbone, dataset, **options)
        self.device, self.backbone, self.core = sources.device, sources.backbone, sources.core
        self.data = sources.data.to(self.device) if isinstance(sources.data, ImageTensors) else sources.data
        self.observation = observation
        self.num_gates = self.core.num_gates
        self.obs_shape = observation_shape(self.core, observation)
        self.observation_space = spaces.Box(-np.inf, np.inf, self.obs_shape, np.float32)
        self.action_space = spaces.MultiBinary(self.num_gates)
        self._image: tuple[Tensor, Tensor] | None = None
        self._index = -1

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """Draw a random image, or ``options["index"]``."""
        super().reset(seed=seed)
        self._index, x, y = one_image(self.data, self.device, self.np_random, options)
        self._image = (x, y)
        if self.observation == "stem":
            self.core.start(x, y)
            x = self.core.activation
        return x[0].float().cpu().numpy(), {"index": self._index, "label": int(y[0])}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._image is None:
            raise RuntimeError("step() called after the episode ended (or before reset()): call reset() first")
        mask = check_mask(action, (self.num_gates,))
        x, y = self._image
        execute = torch.from_numpy(mask[None]).to(self.device)
        _, reward, info = run_mask(self.core, x, y, execute, mask.astype(int).tolist())
        self._image = None
        out = {k: (v[0].cpu().numpy() if v.ndim > 1 else v[0].item()) for k, v in info.items() if k != "logits"}
        out["index"] = self._index
        obs = np.zeros(self.obs_shape, dtype=np.float32)  # nothing follows the one step
        return obs, float(reward[0]), True, False, out


def check_mask(action: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A bool mask of ``shape`` from a 0/1 array (floats 0.0 / 1.0 too, as SB3 samples them), else a
    ``ValueError`` saying what arrived."""
    arr = np.asarray(action)
    if arr.shape != shape:
        raise ValueError(
            f"the action is the whole execute mask: an array of shape {shape} of 0 (skip) / 1 (execute), "
            f"got shape {arr.shape}"
        )
    return as_mask(arr, shape, floats=True)


class SkipNetOneShotVectorEnv(RoutingVectorEnv):
    """``num_envs`` images per step, on the device; every episode ends on its one step and the
    next batch is drawn at once (same-step autoreset). Arguments as
    :class:`skipnet_env.vector_env.SkipNetVectorEnv`, plus ``observation``. Actions: ``(B, N)``
    0/1 (numpy array or, with ``return_tensors``, a device tensor)."""

    def __init__(
        self,
        num_envs: int = 64,
        backbone: BackboneSpec = DEFAULT_BACKBONE,
        dataset: DatasetSpec = DEFAULT_DATASET,
        *,
        observation: Observation = "image",
        return_tensors: bool = False,
        num_workers: int = 0,
        **options: Unpack[EnvOptions],
    ) -> None:
        self.observation = observation
        refuse_early_exit(options)
        super().__init__(num_envs, backbone, dataset, return_tensors=return_tensors, num_workers=num_workers, **options)
        self._batch: tuple[Tensor, Tensor] | None = None

    def spaces(self) -> tuple[spaces.Space, spaces.Space]:
        shape = observation_shape(self.core, self.observation)
        return spaces.Box(-np.inf, np.inf, shape, np.float32), spaces.MultiBinary(self.num_gates)

    @property
    def batch(self) -> tuple[Tensor, Tensor]:
        """The current batch on the device: normalised images ``(B, C, H, W)`` and labels ``(B,)``."""
        if self._batch is None:
            raise RuntimeError("no images before reset(): call reset() first")
        return self._batch

    def _draw(self) -> Tensor:
        self._batch = x, y = self.sampler.next()
        if self.observation == "image":
            return x.float()
        self.core.start(x, y)
        return self.core.activation.to(torch.float32, copy=True)  # the next step writes the activation in place

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self.sampler.seed(seed)
        obs = self._draw()
        return self._out(obs), self._out_info({"label": self.batch[1]})

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict]:
        x, y = self.batch
        execute, _, counts = self._check_actions(actions)
        stem, reward, info = run_mask(self.core, x, y, execute, counts)
        out_info = self._autoreset_info(x.float() if self.observation == "image" else stem, info)
        obs = self._draw()
        out_info.update(self._out_info({"label": self.batch[1]}))
        return self._out(obs), self._out(reward), self._constant(self._all), self._constant(self._none), out_info
