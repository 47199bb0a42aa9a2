"""SkipNet as reinforcement learning: the ``SkipNet-v0`` Gymnasium environment.

Importing this package registers ``SkipNet-v0`` (single image per episode) with the batched,
device-resident :class:`SkipNetVectorEnv` as its vector entry point.
"""

import gymnasium

from skipnet_env.core import BatchedRouting, RewardConfig
from skipnet_env.env import SkipNetEnv
from skipnet_env.routing import masked_forward, route_block, routed_forward
from skipnet_env.vector_env import SkipNetVectorEnv

ENV_ID = "SkipNet-v0"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(
        id=ENV_ID,
        entry_point="skipnet_env.env:SkipNetEnv",
        vector_entry_point="skipnet_env.vector_env:SkipNetVectorEnv",
    )

__all__ = [
    "ENV_ID",
    "BatchedRouting",
    "RewardConfig",
    "SkipNetEnv",
    "SkipNetVectorEnv",
    "masked_forward",
    "route_block",
    "routed_forward",
]
