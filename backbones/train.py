"""Train a backbone (the command line: ``python -m experiments.train_backbone --arch cifar_resnet38``).

Standard SGD recipe (momentum 0.9, weight decay, cosine learning rate), optional stochastic depth
(random block drops; a backbone trained with it tolerates skipped blocks far better), a progress
bar, TensorBoard scalars, an atomic checkpoint with metadata after every epoch, and resume after
an interruption: rerun the same command and it continues from the last finished epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from backbones.base import Backbone
from backbones.batching import batches, global_batch_sizes
from backbones.checkpoint import atomic_save, backbone_metadata, check_metadata, load_backbone, safe_load
from backbones.data import Dataset, data_fingerprint, load_splits, with_flip
from backbones.device import Precision, precision_name, resolve_device, seed_everything, training_dtype
from backbones.distributed import Ranks, ranks, synced_batchnorm, syncs_batchnorm
from backbones.options import COUNT, POSITIVE_INT, Rule, check_options, option
from backbones.progress import progress_bar
from backbones.registry import create, options
from backbones.splits import SPLITS
from backbones.zoo import default_optimizer, parse_model_args

log = logging.getLogger(__name__)


# epochs where a data set's default differs from 30: 12,000 cluttered images need fewer passes
DEFAULT_EPOCHS = {"cluttered_digits": 10, "cluttered_digits_hard": 10}
# the optimizers' learning rate and weight decay where not given
OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 0.1, "weight_decay": 5e-4},
    "adamw": {"lr": 1e-3, "weight_decay": 0.05},
}
# SGD's peak learning rate where a data set's default differs: the embedded set's 10 epochs converge further at 0.6
# (0.1 -> 0.2: BENCHMARKS.md section 21; 0.2 -> 0.6, over 0.4: section 22); the harder rendering too, where 0.1
# left the network 12 points short (section 22)
DEFAULT_SGD_LR = {"cluttered_digits": 0.6, "cluttered_digits_hard": 0.6}


@dataclass
class BaseTraining:
    """How the base network trains, where run.py trains it (its --backbone-* options; train_backbone.py's own)."""

    flag_prefix: ClassVar[str] = "backbone_"

    epochs: int | None = option(None, POSITIVE_INT)
    """training epochs (default: 10 on cluttered_digits, 30 elsewhere)"""
    drop_rate: float = option(0.5, Rule(lambda v: 0.0 <= v < 1.0, "in [0, 1)"))
    """stochastic depth: drop rate of the last block (0 disables)"""
    drop_schedule: Literal["linear", "uniform"] = "linear"
    """stochastic depth: linear (decaying to 0 at the first block) or uniform (every block but the first)"""
    flip: bool | None = None
    """horizontal-flip augmentation (default: the data set's own: on for CIFAR and your own images, off for digits
    and SVHN)"""
    batch_size: int = option(128, POSITIVE_INT)
    """images per step"""
    accumulate: int = option(1, POSITIVE_INT)
    """split each step's images (this rank's part of the batch) into this many micro-batches whose gradients add up
    to the step's: for a batch that does not fit in memory (BatchNorm then normalises over each micro-batch)"""
    seed: int | None = option(None, COUNT)
    """seed of the training: python, numpy and torch (default: run.py's --seed, so that every seed trains its own base
    network; 0 in train_backbone.py)"""
    precision: Precision = option("fp32", was=("train_precision",))
    """training precision (run.py: of joint SP too): fp32, bf16 (autocast: the weights stay fp32; named in the cached
    networks' keys) or auto (bf16 on a CUDA GPU of the Ampere generation or newer, fp32 elsewhere)"""

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class TrainConfig(BaseTraining):
    """Train a frozen-to-be residual backbone on a data set."""

    flag_prefix: ClassVar[str] = ""

    arch: str = "cifar_resnet38"
    """backbone registry name (see backbones.list_backbones())"""
    dataset: str = "cluttered_digits"
    """data set name (see backbones.list_datasets())"""
    data_root: str | None = None
    """folder with the data set's files (default $SKIPNET_DATA or ./data)"""
    download: bool = True
    """download the data set when its files are missing"""
    width: float = 0.5
    """channel multiplier of CIFAR ResNets"""
    image_size: int | None = None
    """square input side (default: the data set's own; 16 for digits)"""
    optimizer: Literal["auto", "sgd", "adamw"] = "auto"
    """auto: SGD with Nesterov momentum for CNNs, AdamW for vision transformers"""
    lr: float | None = None
    """peak learning rate (cosine decay to 0; default 0.1 with SGD, 0.6 on cluttered_digits(_hard); 1e-3 with AdamW)"""
    momentum: float = 0.9
    """SGD momentum"""
    weight_decay: float | None = None
    """weight decay (default 5e-4 with SGD, 0.05 with AdamW)"""
    model_args: tuple[str, ...] = ()
    """zoo backbones (timm:..., torchvision:...): the model's own keyword arguments, key=value (depth=6 embed_dim=64)"""
    shift: int = 2
    """random-translation augmentation in pixels (in-memory data sets)"""
    device: str = "auto"
    """torch device: auto, cpu, cuda, cuda:1, ..."""
    out: str | None = None
    """checkpoint path (default: checkpoints/{arch}-{dataset}.pt)"""
    resume: bool = True
    """continue from the checkpoint at --out when it holds an unfinished run"""
    log_dir: str = "runs"
    """TensorBoard folder"""
    num_workers: int = 4
    """data-loader workers (image folders only)"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seed is None:
            self.seed = 0
        if self.epochs is None:
            self.epochs = DEFAULT_EPOCHS.get(self.dataset, 30)
        if self.optimizer == "auto":
            self.optimizer = default_optimizer(self.arch)
        defaults = OPTIMIZER_DEFAULTS[self.optimizer]
        if self.optimizer == "sgd":
            defaults = {**defaults, "lr": DEFAULT_SGD_LR.get(self.dataset, defaults["lr"])}
        self.lr = defaults["lr"] if self.lr is None else self.lr
        self.weight_decay = defaults["weight_decay"] if self.weight_decay is None else self.weight_decay

    @property
    def total_epochs(self) -> int:
        """``epochs``, or the data set's default when it was left unset."""
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS.get(self.dataset, 30)

    def arch_kwargs(self, data: Dataset) -> dict[str, Any]:
        c, h, _ = data.input_size
        wanted = {
            "in_channels": c,
            "width": self.width,
            "image_size": h,
            "model_args": parse_model_args(self.model_args),
        }
        return {k: v for k, v in wanted.items() if k in options(self.arch)}

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.out) if self.out else Path("checkpoints") / f"{self.arch}-{self.dataset}.pt"


def make_optimizer(cfg: TrainConfig, backbone: Backbone) -> torch.optim.Optimizer:
    """The base trainer's optimizer (``cfg.optimizer``, resolved)."""
    assert cfg.lr is not None and cfg.weight_decay is not None  # resolved by TrainConfig
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(backbone.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        backbone.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
    )


def train_step(
    net: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    here: Ranks,
    total: int,
    accumulate: int = 1,
    autocast: torch.dtype | None = None,
) -> torch.Tensor:
    """One step of the base trainer on this rank's images ``x`` and labels ``y`` of a global batch
    of ``total`` images (``net``: the backbone, or its DDP wrapper), in ``accumulate`` micro-batches
    (:meth:`Ranks.backward`), the forward under ``torch.autocast`` to ``autocast`` where given;
    returns this rank's mean loss. A non-finite loss raises
    ``FloatingPointError`` before the weights change."""

    def loss_of(xi: torch.Tensor, yi: torch.Tensor) -> tuple[torch.Tensor]:
        loss = F.cross_entropy(net(xi), yi)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()}")
        return (loss,)

    optimizer.zero_grad(set_to_none=True)
    mean_loss, _ = here.backward(net, x, y, total, loss_of, accumulate, autocast)
    optimizer.step()
    scheduler.step()
    return mean_loss


@torch.no_grad()
def full_accuracy(
    backbone: Backbone, data: Dataset, device: torch.device, batch_size: int = 512, ranks: Ranks | None = None
) -> float:
    """Top-1 accuracy of the full network on ``data`` (on ``ranks``: rank 0's network, each rank
    counting its part of the images)."""
    if ranks is not None:
        ranks.share(backbone)
    was_training = backbone.training
    backbone.eval()
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # correct, total
    for x, y in batches(data, batch_size, device, train=False, ranks=ranks):
        counts += torch.stack([(backbone(x).argmax(1) == y).sum(), torch.tensor(y.numel(), device=device)])
    backbone.train(was_training)
    correct, total = (ranks.sum(counts) if ranks is not None else counts).tolist()
    return correct / max(total, 1)


def train(cfg: TrainConfig, splits: dict[str, Dataset] | None = None) -> tuple[Backbone, dict[str, Any]]:
    """Train (or resume, or reuse a finished run of) ``cfg``; returns the backbone in eval mode and
    its checkpoint metadata. ``splits``: the data, when the caller has loaded it
    (``backbones.data.load_splits``). Under ``torchrun`` every rank trains on its part of each
    batch (:mod:`backbones.distributed`) and rank 0 writes.

    The checkpoint records the data's fingerprint: a checkpoint made on other data (another
    ``--data-root``, a changed file) is never resumed nor reused."""
    device = resolve_device(cfg.device)
    here = ranks()
    path = cfg.checkpoint_path
    splits = splits or load_splits(cfg.dataset, cfg.data_root, cfg.download, cfg.image_size)
    train_data, val_data, test_data = (splits[s] for s in SPLITS)
    train_data = with_flip(train_data, cfg.flip)
    arch_kwargs = cfg.arch_kwargs(train_data)
    expected: dict[str, Any] = {
        "arch": cfg.arch,
        "dataset": cfg.dataset,
        "num_classes": train_data.num_classes,
        "input_size": list(train_data.input_size),
        "arch_kwargs": arch_kwargs,
        "data_fingerprint": data_fingerprint(splits.values()),
    }
    here.check_same("the data's fingerprint", expected["data_fingerprint"])
    state = None
    if cfg.resume and path.is_file():
        state = safe_load(path, map_location=device)
        check_metadata(state["metadata"], path, **expected)
        if state.get("world", 1) != here.world and not state["metadata"].get("complete"):
            raise ValueError(
                f"{path} is a run on {state.get('world', 1)} rank(s), resumed on {here.world}: each rank's "
                f"augmentation draws its own random stream, which the checkpoint holds per rank; resume it on "
                f"{state.get('world', 1)} rank(s), or give a new --out"
            )
        if state["metadata"].get("complete"):
            log.info("reusing finished backbone %s", path)
            return load_backbone(path, map_location=device, arch=cfg.arch, dataset=cfg.dataset)

    seed = cfg.seed or 0  # resolved by TrainConfig
    seed_everything(seed)
    backbone = create(cfg.arch, num_classes=train_data.num_classes, **arch_kwargs).to(device)
    if cfg.drop_rate > 0:
        backbone.set_stochastic_depth(cfg.drop_rate, schedule=cfg.drop_schedule)
    if here.distributed:  # the same initial weights, then each rank its own augmentation and drops
        torch.manual_seed(here.seed(seed))

    epochs = cfg.total_epochs
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    total_steps = epochs * steps_per_epoch
    optimizer = make_optimizer(cfg, backbone)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    generator = torch.Generator().manual_seed(seed)
    start_epoch, run_name = 0, f"backbone__{cfg.dataset}__{cfg.arch}__{seed}__{int(time.time())}"
    if state is not None:
        backbone.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["rank_rngs"][here.rank] if here.distributed else state["torch_rng"])
        start_epoch, run_name = state["epoch"], state["run_name"]
        log.info("resuming %s from epoch %d", path, start_epoch)

    with synced_batchnorm(backbone, device, here, cfg.batch_size):
        _train_epochs(cfg, backbone, (train_data, val_data, test_data), here, device, start_epoch, run_name,
                      (optimizer, scheduler, generator), expected["data_fingerprint"])  # fmt: skip
    here.share(backbone)  # every rank hands on rank 0's network, the one written
    here.barrier()  # rank 0 has written the last checkpoint
    backbone.eval()
    meta = safe_load(path)["metadata"]
    log.info("trained %s on %s: test accuracy %.4f (%s)", cfg.arch, cfg.dataset, meta.get("test_accuracy", -1), path)
    return backbone, meta


def _train_epochs(
    cfg: TrainConfig,
    backbone: Backbone,
    splits: tuple[Dataset, Dataset, Dataset],
    here: Ranks,
    device: torch.device,
    start_epoch: int,
    run_name: str,
    state: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.Generator],
    data_fingerprint: str,
) -> None:
    """The epochs of :func:`train` from ``start_epoch``, a checkpoint after each (rank 0 writes)."""
    from torch.utils.tensorboard import SummaryWriter

    train_data, val_data, test_data = splits
    optimizer, scheduler, generator = state
    path, config_dict, epochs = cfg.checkpoint_path, dataclasses.asdict(cfg), cfg.total_epochs
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    autocast = training_dtype(cfg.precision, device)
    config_dict["precision"] = precision_name(autocast)  # what "auto" resolved to on this device
    net = here.wrap(backbone, device)
    writer = SummaryWriter(str(Path(cfg.log_dir) / run_name)) if here.main else None
    if writer is not None:
        writer.add_text("hyperparameters", "\n".join(f"|{k}|{v}|" for k, v in config_dict.items()))
    bar = progress_bar(
        epochs * steps_per_epoch,
        f"train {cfg.arch} on {cfg.dataset}",
        cfg.progress and here.main,
        initial=start_epoch * steps_per_epoch,
    )
    val_acc = 0.0
    backbone.train()
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        sizes = global_batch_sizes(train_data, cfg.batch_size, here)
        for (x, y), total in zip(
            batches(
                train_data,
                cfg.batch_size,
                device,
                train=True,
                shift=cfg.shift,
                num_workers=cfg.num_workers,
                generator=generator,
                ranks=here,
            ),
            sizes,
            strict=True,
        ):
            try:
                loss = train_step(net, x, y, optimizer, scheduler, here, total, cfg.accumulate, autocast)
            except FloatingPointError as err:
                raise FloatingPointError(
                    f"{err} at epoch {epoch}: lower --lr; the last good checkpoint ({path}) is kept"
                ) from None
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val_acc:.3f}")
        val_acc = full_accuracy(backbone, val_data, device, ranks=here)
        step = (epoch + 1) * steps_per_epoch
        log.info(
            "backbone %s epoch %d/%d: loss %.4f, validation accuracy %.4f (%.1f s)",
            cfg.arch,
            epoch + 1,
            epochs,
            loss.item(),
            val_acc,
            time.perf_counter() - t0,
        )
        scalars = {
            "losses/train_loss": loss.item(),
            "charts/val_accuracy": val_acc,
            "charts/learning_rate": scheduler.get_last_lr()[0],
            "charts/epoch_seconds": time.perf_counter() - t0,
        }
        done = epoch + 1 == epochs
        extra: dict[str, Any] = {
            "complete": done,
            "val_accuracy": val_acc,
            "train_config": config_dict,
            "data_fingerprint": data_fingerprint,
        }
        if here.distributed:  # how it was trained: the ranks, and whose BatchNorm statistics
            extra["data_parallel"] = {"ranks": here.world, "sync_bn": syncs_batchnorm(here, cfg.batch_size)}
        if done:
            extra["test_accuracy"] = scalars["charts/test_accuracy"] = full_accuracy(
                backbone, test_data, device, ranks=here
            )
        rank_rngs = here.gather(torch.get_rng_state())  # every rank's augmentation stream, for an exact resume
        if writer is None:
            continue
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
        atomic_save(
            {
                "metadata": backbone_metadata(backbone, cfg.dataset, **extra),
                "model": backbone.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                **({"world": here.world, "rank_rngs": rank_rngs} if here.distributed else {}),
                "epoch": epoch + 1,
                "run_name": run_name,
            },
            path,
        )
    bar.close()
    if writer is not None:
        writer.close()
