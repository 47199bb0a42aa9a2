"""What every trainer of a routing agent shares (the hybrid SP + HRL trainer, BlockDrop's).

A subclass says what it trains and what its state is; :class:`Trainer` gives it the rest:

- **checkpoints**: :meth:`save` writes ``{"metadata": ..., **training_state()}`` atomically after
  the divergence guard has checked every trained weight (a good checkpoint is never replaced by a
  diverged one); the metadata carries the run's identity, the ``stage`` and the ``done_units``;
- **exact resume**: :meth:`resume` restores :meth:`load_training_state` and where the run stood;
- **one divergence guard**: losses and weights checked against :data:`LOSS_LIMIT` and
  :data:`WEIGHT_LIMIT`, with a message that names the last good checkpoint;
- **logging**: scalars :meth:`record`\\ ed per step and written as means every few steps
  (:meth:`flush`): one host sync per log, none per step;
- **ranks** (under ``torchrun``): rank 0 writes the checkpoint and TensorBoard; each rank's own
  random streams (:meth:`rank_state`) go into the checkpoint, so a resume on as many ranks is exact.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from typing_extensions import Required, TypedDict, Unpack

from backbones.checkpoint import atomic_save, safe_load
from backbones.distributed import ranks
from skipnet_env.core import DEFAULT_ALPHA

log = logging.getLogger(__name__)

# a trained weight past this, or a loss past LOSS_LIMIT, means the run is diverging: it stops before
# the weights become NaN and before a checkpoint holds them (trained gates stay far below: |w| < 100)
WEIGHT_LIMIT = 1e4
LOSS_LIMIT = 1e6
CHECKPOINT_EVERY = 50
"""iterations between checkpoints, every trainer's default"""


def check_losses(losses: list[Tensor], where: str, checkpoint: Path) -> None:
    """Stop on a non-finite or runaway loss among the recent ``losses`` (one host sync for all)."""
    worst = float(torch.stack(losses).detach().abs().nan_to_num(float("inf")).max())
    if not math.isfinite(worst) or worst > LOSS_LIMIT:
        raise diverged(f"{where} loss reached {worst:.4g}", checkpoint)


class RunValues(TypedDict, total=False):
    """The run's values every trainer is given as the run has them (the top of
    :class:`experiments.config.RunConfig`)."""

    num_envs: Required[int]
    """images per batch in the environment"""
    alpha: float
    """weight of compute in the reward (default :data:`skipnet_env.core.DEFAULT_ALPHA`)"""
    entropy_coef: float
    """weight of the policy's entropy bonus (default 0)"""
    seed: int
    """seeds the trainer's random generators: data order, sampled decisions (default 0)"""
    precision: str
    """the frozen backbone's compute precision: auto, fp32, bf16 (default auto)"""
    checkpoint_every: int
    """iterations between checkpoints (default :data:`CHECKPOINT_EVERY`)"""


def diverged(what: str, checkpoint: Path) -> FloatingPointError:
    """The error a diverging run stops with: what diverged, and what is left of the run."""
    kept = (
        f"The last good checkpoint ({checkpoint}) is kept: rerun with a lower learning rate and --resume."
        if checkpoint.is_file()
        else "No checkpoint was written yet: rerun with a lower learning rate (without --resume)."
    )
    return FloatingPointError(f"{what}: stopping. {kept}")


def check_weights(params: Iterable[tuple[str, Tensor]], checkpoint: Path) -> None:
    """Stop when a weight is not finite or past :data:`WEIGHT_LIMIT` (one host sync for all)."""
    named = list(params)
    largest = torch.stack([p.detach().abs().max() for _, p in named])
    worst = int(largest.nan_to_num(float("inf")).argmax())
    value = float(largest[worst])
    if not math.isfinite(value) or value > WEIGHT_LIMIT:
        raise diverged(f"weight {named[worst][0]} reached {value:.4g} (limit {WEIGHT_LIMIT:g})", checkpoint)


class Trainer:
    """The skeleton of an agent's trainer.

    Args:
        cfg: the trainer's own options (a dataclass, recorded in every checkpoint).
        device: where everything runs.
        checkpoint: path of the agent checkpoint.
        metadata: written into every checkpoint (agent, backbone and data identity, ...).
        writer: a TensorBoard ``SummaryWriter`` (or ``None``).
        progress: show progress bars (on a terminal).
        **run: the run's values, given to every trainer as the run has them (:class:`RunValues`); the
            subclass's own options are its ``cfg``.

    A subclass implements :meth:`trained_parameters`, :meth:`training_state` and
    :meth:`load_training_state` (and, if it trains on ranks, :meth:`rank_state`), and moves
    ``stage`` (a name of its own; ``"done"`` at the end) and ``done_units`` (epochs, iterations)
    as it trains.
    """

    def __init__(
        self,
        cfg: Any,
        device: torch.device,
        checkpoint: Path,
        metadata: dict[str, Any],
        writer: Any,
        progress: bool,
        **run: Unpack[RunValues],
    ) -> None:
        self.cfg, self.device, self.checkpoint, self.metadata = cfg, device, Path(checkpoint), metadata
        self.ranks = ranks()  # under torchrun: this process's place; rank 0 writes and shows progress
        self.writer, self.progress = writer, progress and self.ranks.main
        self.num_envs = run["num_envs"]
        self.alpha = run.get("alpha", DEFAULT_ALPHA)
        self.entropy_coef = run.get("entropy_coef", 0.0)
        self.seed = run.get("seed", 0)
        self.precision = run.get("precision", "auto")
        self.checkpoint_every = run.get("checkpoint_every", CHECKPOINT_EVERY)
        self.stage, self.done_units = "train", 0
        self._logged: dict[str, list[Tensor]] = {}

    # -- what a subclass says ---------------------------------------------------------------
    def trained_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """``(name, parameter)`` of every weight the trainer changes (what the guard checks)."""
        raise NotImplementedError

    def training_state(self) -> dict[str, Any]:
        """Everything an exact resume needs besides the metadata: weights, optimizers, generators."""
        raise NotImplementedError

    def load_training_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def rank_state(self) -> dict[str, Any]:
        """The entries of :meth:`training_state` that differ between the ranks of a data-parallel
        run (their own random streams, their environments' places in the data): saved for every
        rank, and given back to each rank's :meth:`load_training_state` in place of rank 0's."""
        return {}

    def checkpoint_metadata(self) -> dict[str, Any]:
        """The checkpoint's ``metadata``: the run's identity, where the run stands, the settings."""
        return {**self.metadata, "stage": self.stage, "done_units": self.done_units, **self.config_metadata()}

    def config_metadata(self) -> dict[str, Any]:
        """Entries of the checkpoint's metadata that describe the trainer's settings."""
        return {"trainer_config": {**dataclasses.asdict(self.cfg), "seed": self.seed, "precision": self.precision}}

    # -- checkpoints ------------------------------------------------------------------------
    def save(self) -> None:
        """Write the checkpoint atomically, after checking the trained weights (on ranks: rank 0
        writes, with every rank's :meth:`rank_state`)."""
        self.check_weights()
        streams = self.ranks.gather(self.rank_state()) if self.ranks.distributed else []
        if self.ranks.main:
            ranked = {"world": self.ranks.world, "rank_states": streams} if streams else {}
            atomic_save({"metadata": self.checkpoint_metadata(), **self.training_state(), **ranked}, self.checkpoint)
        self.ranks.barrier()  # no rank goes on (or ends) before the checkpoint is written

    def resume(self, state: dict[str, Any] | None = None) -> None:
        """Continue from ``state`` (default: the checkpoint file) where the run stood (on as many
        ranks as wrote it: each rank's random streams are its own)."""
        if state is None:
            state = safe_load(self.checkpoint, map_location=self.device)
        if state.get("world", 1) != self.ranks.world:
            raise ValueError(
                f"{self.checkpoint} was written by a run on {state.get('world', 1)} rank(s), resumed on "
                f"{self.ranks.world}: resume it on {state.get('world', 1)} (each rank's random streams are in it)"
            )
        if self.ranks.distributed and "rank_states" in state:
            state = {**state, **state["rank_states"][self.ranks.rank]}
        self.load_training_state(state)  # a checkpoint without stage and units: the subclass set them
        meta = state["metadata"]
        self.stage, self.done_units = meta.get("stage", self.stage), int(meta.get("done_units", self.done_units))
        log.info("resuming %s at stage %s, %d done", self.checkpoint, self.stage, self.done_units)

    # -- the divergence guard ---------------------------------------------------------------
    def check_losses(self, losses: list[Tensor], where: str) -> None:
        check_losses(losses, where, self.checkpoint)

    def check_weights(self) -> None:
        check_weights(self.trained_parameters(), self.checkpoint)

    # -- logging ----------------------------------------------------------------------------
    def record(self, values: dict[str, Tensor]) -> None:
        """Keep this step's scalars (on the device: no sync) for the next :meth:`flush`."""
        for name, value in values.items():
            self._logged.setdefault(name, []).append(value.detach())

    def flush(self, step: int, loss: str, where: str) -> dict[str, float]:
        """The means of the scalars recorded since the last flush (one host sync), after the guard
        has checked the recorded ``loss``; written to TensorBoard at ``step``."""
        self.check_losses(self._logged[loss], where)
        means = {name: float(torch.stack(values).mean()) for name, values in self._logged.items()}
        self._logged.clear()
        self.write(means, step)
        return means

    def write(self, scalars: dict[str, float], step: int) -> None:
        if self.writer and self.ranks.main:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
