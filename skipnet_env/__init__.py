"""SkipNet as reinforcement learning: the ``SkipNet-v0`` and ``SkipNetOneShot-v0`` Gymnasium
environments.

Importing this package registers ``SkipNet-v0`` (one image per episode, one step per block) with
the batched, device-resident :class:`SkipNetVectorEnv` as its vector entry point, and
``SkipNetOneShot-v0`` (one step per image: the whole execute mask at once, BlockDrop's framing)
with :class:`SkipNetOneShotVectorEnv`.

The layers, bottom up: ``routing`` (the routed block: a block on the rows that execute it),
``engine`` (the frozen inference copy; ``BlockExecutor``: in-place and bucketed execution of a
gated block, CUDA-graph capture; ``python -m experiments.check`` checks it on a GPU), ``core``
(:class:`BatchedRouting`, the one state machine every env, evaluation and replay steps),
``sources`` (``EnvSources``: backbone, data and the state machine from names or objects), and the
envs: single ones in ``env`` and ``oneshot``, the batched ones on one base,
``vector_env.RoutingVectorEnv``.
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
