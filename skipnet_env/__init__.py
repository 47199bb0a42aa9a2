"""SkipNet as reinforcement learning: the ``SkipNet-v0`` and ``SkipNetOneShot-v0`` Gymnasium
environments.

Importing this package registers ``SkipNet-v0`` (one image per episode, one step per block) with
the batched, device-resident :class:`SkipNetVectorEnv` as its vector entry point, and
``SkipNetOneShot-v0`` (one step per image: the whole execute mask at once, BlockDrop's framing)
with :class:`SkipNetOneShotVectorEnv`.
"""

import gymnasium

from skipnet_env.core import BatchedRouting, RewardConfig
from skipnet_env.env import SkipNetEnv
from skipnet_env.oneshot import SkipNetOneShotEnv, SkipNetOneShotVectorEnv
from skipnet_env.routing import masked_forward, route_block, routed_forward
from skipnet_env.vector_env import SkipNetVectorEnv

ENV_ID = "SkipNet-v0"
ONESHOT_ENV_ID = "SkipNetOneShot-v0"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(
        id=ENV_ID,
        entry_point="skipnet_env.env:SkipNetEnv",
        vector_entry_point="skipnet_env.vector_env:SkipNetVectorEnv",
    )
if ONESHOT_ENV_ID not in gymnasium.registry:
    gymnasium.register(
        id=ONESHOT_ENV_ID,
        entry_point="skipnet_env.oneshot:SkipNetOneShotEnv",
        vector_entry_point="skipnet_env.oneshot:SkipNetOneShotVectorEnv",
    )

__all__ = [
    "ENV_ID",
    "ONESHOT_ENV_ID",
    "BatchedRouting",
    "RewardConfig",
    "SkipNetEnv",
    "SkipNetOneShotEnv",
    "SkipNetOneShotVectorEnv",
    "SkipNetVectorEnv",
    "masked_forward",
    "route_block",
    "routed_forward",
]
