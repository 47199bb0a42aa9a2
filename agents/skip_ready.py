"""The paper's supervised pre-training, jointly: a skip-ready backbone trained *with* its gates.

SkipNet's SP does not route a network trained without gates: it trains the backbone and the gates
together, with hard gates in the forward pass and the straight-through gradient. A frozen network
that was never taught to lose blocks caps what any router can do (BENCHMARKS.md section 4); a
network trained beside its gates learns to make the skipped blocks' work unnecessary for the
images that skip them. This module is that stage:

    base training ──► joint SP (backbone + gates) ──► skip-ready backbone checkpoint (+ its gates)

The result is an ordinary backbone checkpoint (``metadata`` + ``model``, loaded by
:func:`backbones.checkpoint.load_backbone`), its metadata saying it was trained with gates and how
(``metadata["skip_ready"]``), with the gates' weights beside it (``gates``). From there on it is
frozen: the environment serves it, and every agent (SkipNet's gates, PPO, BlockDrop, static,
random) is compared on the same network.

What the stage does, per batch: the routed network's forward with straight-through hard gates
(:func:`agents.hybrid.sp_forward`; sampled gates with ``sample``), loss = cross-entropy + ``alpha``
times the FLOPs the executed blocks cost (ramped up over ``alpha_warmup`` epochs; ``alpha = 0`` is
the paper's SP, cross-entropy alone); the backbone trains with the base trainer's optimizer for its
kind (SGD with momentum and weight decay for CNNs, AdamW for vision transformers; cosine schedule),
the gates with Adam; the base training's pad-and-crop (and flip) augmentation.
BatchNorm either trains (``bn="train"``: batch statistics of the routed network, as the paper) or
keeps the base network's statistics (``"frozen"``, affine parameters still trained).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from agents.compute_price import ComputePrice, SpendingMeter
from agents.gates import GatePolicy, create_gates
from agents.hybrid import Distillation, SPNetwork, sp_loss
from agents.trainer import Trainer
from backbones.base import FIRST_GATED, Backbone
from backbones.batching import batches, global_batch_sizes
from backbones.cache import building, cache_dir, content_key, file_name
from backbones.checkpoint import backbone_metadata, fingerprint, load_backbone, safe_load
from backbones.data import Dataset, ImageTensors
from backbones.device import precision_name, seed_everything, training_dtype
from backbones.distributed import synced_batchnorm, syncs_batchnorm
from backbones.options import COUNT, FLOPS_FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, UNIT, check_options, option
from backbones.progress import progress_bar
from skipnet_env.engine import freeze

log = logging.getLogger(__name__)

BatchNormMode = Literal["train", "frozen"]
JointOptimizer = Literal["auto", "sgd", "adamw"]
# part of the cache key: raise it when a change to this stage changes the backbones it makes
JOINT_SP_VERSION = 2
# joint SP's length when not given: DEFAULT_EPOCHS, or as many epochs as make MIN_STEPS steps on a small data set
# (the digits' 1,258 images make 10 steps an epoch: 6 epochs left the budget's multiplier wound up, spending 30%)
DEFAULT_EPOCHS, MIN_STEPS = 6, 500
# joint SP's SGD rate when not given: where the base network trains at SGD 0.6 (a CNN on the embedded sets:
# backbones.train.DEFAULT_SGD_LR) validation chose 0.06 over 0.02 (BENCHMARKS.md sections 24 and 25); elsewhere 0.02
# (a ViT, whose base trains with AdamW, lost every block's worth at 0.06: section 27)
DEFAULT_LR, DATASET_LR = 0.02, {"cluttered_digits": 0.06, "cluttered_digits_hard": 0.06}
# with AdamW (vision transformers, whose base trains with AdamW at 1e-3): rate and weight decay when not given
# (validation chose the rate over 1e-4, 3e-4, 1e-3, 1e-2 and SGD on the 6-block ViT: section 27)
ADAMW_LR, ADAMW_WEIGHT_DECAY, SGD_WEIGHT_DECAY = 3e-3, 0.05, 5e-4


@dataclass
class JointConfig:
    """Joint SP (--backbone-recipe skip_ready): the backbone trained with its gates, the paper's SP.

    Its seed is the run's, given to :func:`get_skip_ready` as it is."""

    flag_prefix: ClassVar[str] = "joint_"

    epochs: int | None = option(None, POSITIVE_INT)
    """skip_ready: epochs of joint SP (backbone + gates; default 6, or as many as make 500 steps on a small data set:
    the gates and the budget's multiplier need steps to settle)"""
    optimizer: JointOptimizer = "auto"
    """skip_ready: the backbone's optimizer in joint SP: auto (the base trainer's for the network: AdamW for vision
    transformers, SGD otherwise), sgd or adamw"""
    lr: float | None = option(None, POSITIVE)
    """skip_ready: peak learning rate of the backbone in joint SP (cosine decay to 0; SGD's default 0.06 for a CNN on
    cluttered_digits and cluttered_digits_hard, chosen on validation over 0.02, and 0.02 elsewhere; AdamW's 3e-3,
    chosen on validation for a ViT)"""
    gate_lr: float = option(3e-3, POSITIVE)
    """skip_ready: Adam learning rate of the gates in joint SP"""
    alpha: float = option(2.0, NON_NEGATIVE)
    """skip_ready: weight of compute in joint SP's loss (each gated block costs alpha x its share of the FLOPs; 0: the
    paper's SP, cross-entropy alone)"""
    budget: float | None = option(0.5, FLOPS_FRACTION)
    """skip_ready: FLOPs fraction (gates included) joint SP's gates are trained to spend: the compute weight becomes a
    multiplier, starting at --joint-alpha, that meets it (None: --joint-alpha prices compute)"""
    alpha_warmup: int = option(2, COUNT)
    """skip_ready: epochs over which joint SP's compute weight ramps up linearly from 0"""
    sample: bool = False
    """skip_ready: joint SP's gates are samples (logistic noise before the threshold), not thresholds (the paper's)"""
    bn: BatchNormMode = "train"
    """skip_ready: BatchNorm in joint SP: train (the routed network's batch statistics) or frozen (the base's)"""
    momentum: float = option(0.9, UNIT)
    """skip_ready: SGD momentum of the backbone in joint SP"""
    weight_decay: float | None = option(None, NON_NEGATIVE)
    """skip_ready: weight decay of the backbone in joint SP (default: SGD's L2 5e-4, AdamW's decoupled 0.05)"""
    shift: int = option(2, COUNT)
    """skip_ready: pad-and-crop augmentation in pixels in joint SP (the base training's)"""
    batch_size: int = option(128, POSITIVE_INT)
    """skip_ready: images per joint SP step, on every device"""
    accumulate: int = option(1, POSITIVE_INT)
    """skip_ready: split each joint SP step's images (this rank's part) into this many micro-batches whose gradients
    add up to the step's: for a batch that does not fit (BatchNorm and a budget's proportional term then see each
    micro-batch)"""
    distill: float = option(0.5, UNIT)
    """skip_ready: weight of the base network's soft labels in joint SP's loss (knowledge distillation from the base
    network, every block run: (1 - w) x cross-entropy + w x T^2 x KL; 0: cross-entropy alone, the paper's; validation
    chose 0.5 over 0 on the embedded set's base networks, BENCHMARKS.md section 21)"""
    distill_temperature: float = option(4.0, POSITIVE)
    """skip_ready: temperature T of --joint-distill's soft labels"""

    def __post_init__(self) -> None:
        check_options(self)

    def resolved(self, num_images: int, dataset: str, arch: str = "") -> JointConfig:
        """This configuration with ``optimizer``, ``lr``, ``weight_decay`` and ``epochs`` set, for a training set
        of ``num_images`` of ``dataset`` and the network ``arch`` (its registry name)."""
        from backbones.zoo import default_optimizer

        base_optimizer = default_optimizer(arch)
        optimizer = base_optimizer if self.optimizer == "auto" else self.optimizer
        adamw = optimizer == "adamw"
        sgd_lr = DATASET_LR.get(dataset, DEFAULT_LR) if base_optimizer == "sgd" else DEFAULT_LR
        cfg = dataclasses.replace(
            self,
            optimizer=optimizer,
            lr=self.lr if self.lr is not None else ADAMW_LR if adamw else sgd_lr,
            weight_decay=self.weight_decay
            if self.weight_decay is not None
            else ADAMW_WEIGHT_DECAY if adamw else SGD_WEIGHT_DECAY,
        )  # fmt: skip
        if cfg.epochs is not None:
            return cfg
        steps = math.ceil(num_images / cfg.batch_size)
        return dataclasses.replace(cfg, epochs=max(DEFAULT_EPOCHS, math.ceil(MIN_STEPS / steps)))


class JointTrainer(Trainer):
    """Trains ``backbone`` and ``gates`` together; writes a skip-ready backbone checkpoint at
    ``checkpoint`` after every epoch (atomically, on the trainers' skeleton: :class:`agents.trainer.Trainer`)
    and resumes an unfinished one exactly.

    Args:
        backbone: the trained base network (modified in place).
        gates: the gates to train beside it.
        data: training images.
        cfg: the stage's settings.
        device: where it runs.
        checkpoint: the skip-ready backbone checkpoint to write.
        dataset: the data set's name, for the checkpoint's metadata.
        metadata: more metadata for the checkpoint (the base network's identity, the gates' kind).
        progress: show a progress bar (on a terminal only).
        autocast: the forward's autocast dtype (:func:`backbones.device.training_dtype`; ``None``: fp32).
        teacher: the network whose soft labels ``cfg.distill`` mixes into the loss (the base network, frozen).
    """

    def __init__(
        self,
        backbone: Backbone,
        gates: GatePolicy,
        data: Dataset,
        cfg: JointConfig,
        device: torch.device,
        checkpoint: Path,
        dataset: str,
        metadata: dict[str, Any] | None = None,
        progress: bool = True,
        data_fingerprint: str | None = None,
        seed: int = 0,
        autocast: torch.dtype | None = None,
        teacher: Backbone | None = None,
    ) -> None:
        cfg = cfg.resolved(len(data), dataset, backbone.arch)
        super().__init__(
            cfg, device, checkpoint, dict(metadata or {}), None, progress, num_envs=cfg.batch_size, seed=seed
        )
        self.backbone, self.gates, self.data, self.autocast = backbone.to(device), gates.to(device), data, autocast
        # the data's identity, where every backbone checkpoint has it (load_backbone checks it there)
        self.identity = {} if data_fingerprint is None else {"data_fingerprint": data_fingerprint}
        self.dataset = dataset
        self.extra: dict[str, Any] = {}  # the finished stage's figures, and how it ran: into the metadata
        self.backbone.requires_grad_(True)
        self.steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
        self.epochs: int = cfg.epochs  # type: ignore[assignment]  # resolved
        total = self.epochs * self.steps_per_epoch
        self.backbone_opt: torch.optim.Optimizer
        if cfg.optimizer == "adamw":
            self.backbone_opt = torch.optim.AdamW(
                self.backbone.parameters(),
                lr=cfg.lr,  # type: ignore[arg-type]  # resolved
                weight_decay=cfg.weight_decay,  # type: ignore[arg-type]  # resolved
            )
        else:
            self.backbone_opt = torch.optim.SGD(
                self.backbone.parameters(),
                lr=cfg.lr,  # type: ignore[arg-type]  # resolved
                momentum=cfg.momentum,
                weight_decay=cfg.weight_decay,  # type: ignore[arg-type]  # resolved
                nesterov=cfg.momentum > 0,
            )
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.backbone_opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
        self.gate_opt = torch.optim.Adam(self.gates.parameters(), lr=cfg.gate_lr)
        here = self.ranks  # under torchrun: each rank its part of every batch, rank 0 writes
        here.check_same("the training images' fingerprint", data.fingerprint)
        self.generator = torch.Generator().manual_seed(seed)  # data order (the same on every rank)
        # the gates' samples and the augmentation: each rank its own stream
        self.noise = torch.Generator(device=device).manual_seed(here.seed(seed + 1))
        if here.distributed:
            torch.manual_seed(here.seed(seed))
        self.price = ComputePrice(cfg.alpha, cfg.budget, device, ranks=here)
        self.history: list[dict[str, float]] = []
        self.distill: Distillation | None = None
        if cfg.distill > 0:
            if teacher is None:
                raise ValueError(
                    f"--joint-distill {cfg.distill} needs the base network as the teacher: pass teacher=, or distill=0"
                )
            self.distill = Distillation(teacher, cfg.distill, cfg.distill_temperature)

    @property
    def epoch(self) -> int:
        """Epochs done (the skeleton's ``done_units``)."""
        return self.done_units

    def trained_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [*self.backbone.named_parameters(), *(("gates." + n, p) for n, p in self.gates.named_parameters())]

    def checkpoint_metadata(self) -> dict[str, Any]:
        """A backbone checkpoint's metadata (:func:`load_backbone` reads it), saying how joint SP made it."""
        if self.ranks.distributed:  # how it was trained: the ranks, and whose BatchNorm statistics
            self.extra["data_parallel"] = {
                "ranks": self.ranks.world,
                "sync_bn": syncs_batchnorm(self.ranks, self.cfg.batch_size),
            }
        return backbone_metadata(
            self.backbone,
            self.dataset,
            complete=self.stage == "done",
            skip_ready={**self.metadata, "joint_config": joint_identity(self.cfg, self.seed), "history": self.history},
            stage=self.stage,
            done_units=self.done_units,
            **self.identity,
            **self.extra,
        )

    def training_state(self) -> dict[str, Any]:
        return {
            "model": self.backbone.state_dict(),
            "gates": self.gates.state_dict(),
            "backbone_opt": self.backbone_opt.state_dict(),
            "schedule": self.schedule.state_dict(),
            "gate_opt": self.gate_opt.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "price": self.price.state_dict(),
            **self.rank_state(),
        }

    def rank_state(self) -> dict[str, Any]:
        return {"torch_rng": torch.get_rng_state(), "noise": self.noise.get_state()}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Continue from an unfinished checkpoint of this stage, bit for bit (one written before joint SP
        was on the skeleton too: its epoch, and its ranks' streams as ``rank_streams``)."""
        self.backbone.load_state_dict(state["model"])
        self.gates.load_state_dict(state["gates"])
        self.backbone_opt.load_state_dict(state["backbone_opt"])
        self.schedule.load_state_dict(state["schedule"])
        self.gate_opt.load_state_dict(state["gate_opt"])
        self.generator.set_state(state["generator"])
        torch_rng, noise = state["torch_rng"], state["noise"]
        if "rank_streams" in state:
            torch_rng, noise = state["rank_streams"][self.ranks.rank]
        self.noise.set_state(noise.cpu())
        torch.set_rng_state(torch_rng.cpu())
        self.price.load_state_dict(state["price"])
        self.done_units = int(state["epoch"])
        self.history = list(state["metadata"]["skip_ready"].get("history", []))

    def train(self) -> tuple[Backbone, GatePolicy]:
        with synced_batchnorm(self.backbone, self.device, self.ranks, self.cfg.batch_size):
            self._train_epochs()
        self.ranks.share(self.backbone)  # every rank hands on rank 0's network, the one written
        self.ranks.share(self.gates)
        self.ranks.barrier()  # rank 0 has written the last checkpoint
        self.backbone.eval().requires_grad_(False)
        self.gates.eval()
        return self.backbone, self.gates

    def _train_epochs(self) -> None:
        cfg, here = self.cfg, self.ranks
        net = here.wrap(SPNetwork(self.backbone, self.gates), self.device)
        meter = SpendingMeter(self.backbone, self.gates, self.device)
        bar = progress_bar(
            total=self.epochs * self.steps_per_epoch,
            initial=self.epoch * self.steps_per_epoch,
            desc="joint SP (backbone + gates)",
            enabled=self.progress and here.main,
        )
        for epoch in range(self.epoch, self.epochs):
            t0 = time.perf_counter()
            self.backbone.train(cfg.bn == "train")
            self.gates.train()
            ramp = self.price.warmup(epoch, cfg.alpha_warmup)
            losses, rates, spent = [], [], []
            sizes = global_batch_sizes(self.data, cfg.batch_size, here)
            for (x, y), total in zip(
                batches(
                    self.data,
                    cfg.batch_size,
                    self.device,
                    train=True,
                    shift=cfg.shift,
                    generator=self.generator,
                    ranks=here,
                ),
                sizes,
                strict=True,
            ):
                noise = self.noise if cfg.sample else None
                self.backbone_opt.zero_grad(set_to_none=True)
                self.gate_opt.zero_grad(set_to_none=True)
                loss, parts = here.backward(
                    net,
                    x,
                    y,
                    total,
                    partial(sp_loss, net, noise=noise, meter=meter, price=self.price, ramp=ramp, distill=self.distill),
                    cfg.accumulate,
                    self.autocast,
                )
                executed, spending = (torch.cat(kept) for kept in zip(*parts))
                self.price.update(spending)  # once a step, from the whole step's spending
                spent.append(spending.mean())
                self.backbone_opt.step()
                self.gate_opt.step()
                self.schedule.step()
                losses.append(loss)
                rates.append(executed.detach().mean())
                bar.update(1)
            # the trainers' one divergence guard: a runaway loss stops the stage here, a runaway weight in save(),
            # before a checkpoint holds it
            self.check_losses(losses, f"joint SP (epoch {epoch + 1}; lower --joint-lr)")
            self.done_units = epoch + 1
            record = {
                "epoch": float(self.epoch),
                "loss": float(torch.stack(losses).mean()),
                "execute_rate": float(torch.stack(rates).mean()),
                "flops_fraction": float(torch.stack(spent).mean()),
                "compute_weight": float(self.price.value),
                "seconds": time.perf_counter() - t0,
            }
            self.history.append(record)
            log.info(
                "joint SP epoch %d/%d: loss %.4f, greedy gates spend %.1f%% of the FLOPs, compute weight %.3f (%.1f s)",
                self.epoch,
                self.epochs,
                record["loss"],
                100 * record["flops_fraction"],
                record["compute_weight"],
                record["seconds"],
            )
            if self.epoch == self.epochs:
                self.stage = "done"
            self.save()
        bar.close()


# the gates joint SP trains beside the backbone (the recurrent gate, with the run's --rnn-* options)
JOINT_GATE_KIND = "rnn"


def gate_identity(kind: str, options: dict[str, Any], first_gated: int = FIRST_GATED) -> dict[str, Any]:
    """What names a set of gates in a skip-ready checkpoint: kind, first gated block and options. A
    hybrid agent continues from the joint gates only when its own identity is the same."""
    return {"kind": kind, "first_gated": first_gated, **options}


def joint_identity(cfg: JointConfig, seed: int) -> dict[str, Any]:
    """What names a joint SP stage in a skip-ready checkpoint and its cache key: its options and seed
    (``accumulate`` only where it is not 1, the distillation only where it is on, the optimizer only
    where it is not SGD, so that the stages cached before they existed keep their names)."""
    left_out = {
        "accumulate": cfg.accumulate == 1,
        "distill": cfg.distill == 0,
        "distill_temperature": cfg.distill == 0,
        "optimizer": cfg.optimizer == "sgd",
    }
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if not left_out.get(k, False)}
    return {**options, "seed": seed}


def skip_ready_path(
    base_meta: dict[str, Any],
    base_fingerprint: str,
    cfg: JointConfig,
    gates: dict[str, Any],
    data: str = "",
    seed: int = 0,
    autocast: torch.dtype | None = None,
) -> Path:
    """Where the cache keeps the skip-ready backbone made from the base network ``base_fingerprint``
    with ``cfg`` and gates ``gates`` (kind and options) on the training images of fingerprint
    ``data``, its forward autocast to ``autocast``: keyed by everything that changes it (the
    precision only where it is not fp32, so that the stages cached before it keep their names)."""
    key = content_key(
        {
            "version": JOINT_SP_VERSION,
            "base": base_fingerprint,
            "joint": joint_identity(cfg, seed),
            "gates": gates,
            "data": data,
            **({"precision": precision_name(autocast)} if autocast is not None else {}),
        }
    )
    return (
        cache_dir()
        / "backbones"
        / f"skipready-{file_name(base_meta['arch'])}-{file_name(base_meta['dataset'])}-{key}.pt"
    )


def get_skip_ready(
    base: Backbone,
    base_meta: dict[str, Any],
    train_data: Dataset,
    cfg: JointConfig,
    gate_kind: str,
    gate_options: dict[str, Any],
    device: torch.device,
    *,
    path: Path | None = None,
    progress: bool = True,
    seed: int = 0,
    precision: str = "fp32",
) -> tuple[Backbone, dict[str, Any]]:
    """The skip-ready backbone made from ``base`` by joint SP: trained on first use, then cached.
    ``precision``: of its training (:func:`backbones.device.training_dtype`).

    ``base`` itself is not modified (the stage trains a copy). Returns the skip-ready backbone (eval
    mode, frozen) and its checkpoint's metadata, with ``metadata["checkpoint"]`` its path (its gates
    are stored there too: :func:`load_gates`).
    """
    base_fp = fingerprint(base)
    # the key names the optimizer, epochs and rate, given or not
    cfg = cfg.resolved(len(train_data), base_meta["dataset"], base_meta["arch"])
    gates_id = gate_identity(gate_kind, gate_options)
    flip = isinstance(train_data, ImageTensors) and train_data.flip  # the augmentation changes the weights too
    autocast = training_dtype(precision, device)
    data_id = f"{train_data.fingerprint}-flip{flip}"
    path = path or skip_ready_path(base_meta, base_fp, cfg, gates_id, data_id, seed, autocast)
    with building(path):  # a second process wanting this backbone waits, then reuses it
        state = safe_load(path, map_location=device) if path.is_file() else None
        if state is not None and state["metadata"].get("complete"):
            log.info("reusing skip-ready backbone %s", path)
            net, meta = load_backbone(path, map_location=device)
            return net.to(device).eval(), {**meta, "checkpoint": str(path)}
        seed_everything(seed)  # the gates' initial weights
        backbone = copy.deepcopy(base).to(device)
        options = {k: v for k, v in gates_id.items() if k not in ("kind", "first_gated")}
        gates = create_gates(gates_id["kind"], backbone, gates_id["first_gated"], **options)
        metadata = {
            "base_fingerprint": base_fp,
            "base_test_accuracy": base_meta.get("test_accuracy"),
            "base_train_config": base_meta.get("train_config"),
            "gates": gates_id,
            "precision": precision_name(autocast),
        }
        trainer = JointTrainer(
            backbone, gates, train_data, cfg, device, path, base_meta["dataset"], metadata, progress,
            data_fingerprint=base_meta.get("data_fingerprint"), seed=seed, autocast=autocast,
            teacher=freeze(base, device, precision="fp32") if cfg.distill > 0 else None,
        )  # fmt: skip
        if state is not None:
            trainer.resume(state)
        net, _ = trainer.train()
        meta = safe_load(path)["metadata"]
        return net, {**meta, "checkpoint": str(path)}


def load_gates(path: str | Path, backbone: Backbone, device: torch.device | str = "cpu") -> GatePolicy:
    """The gates trained beside the skip-ready backbone at ``path`` (eval mode)."""
    state = safe_load(path, map_location=device)
    info = state.get("metadata", {}).get("skip_ready")
    if info is None or "gates" not in state:
        raise ValueError(f"{path} is not a skip-ready backbone (no gates trained beside it)")
    options = {k: v for k, v in info["gates"].items() if k not in ("kind", "first_gated")}
    gates = create_gates(info["gates"]["kind"], backbone, info["gates"]["first_gated"], **options)
    gates.load_state_dict(state["gates"])
    return gates.to(device).eval()
