"""Training images per second of the base trainer on N ranks: what ``bench.py --parts ddp`` measures.

Run by bench.py under ``torchrun --nproc-per-node N`` (one thread each on a CPU), it trains the
backbone with the base trainer's own step (:func:`backbones.train.train_step`: DDP, the global
batch split over the ranks, BatchNorm synchronised) on random images of the backbone's input size,
and rank 0 prints one JSON line per ``--sync-bn`` setting: ``{"ranks": N, "images_per_s": ...}``. The
global batch is the same on every N (``--batch``), so the figures compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from backbones.distributed import Ranks, end, start, stop, synced_batchnorm, syncs_batchnorm
from backbones.train import train_step


def measure(argv: list[str] | None = None) -> list[dict[str, float]]:
    """On every rank of the job, for each ``--sync-bn`` setting (one job: a job's start costs seconds):
    ``--warmup`` steps, then ``--steps`` timed; rank 0 prints the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="cifar_resnet38")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--image-size", type=int, default=24)
    p.add_argument("--batch", type=int, default=128, help="the global batch (split over the ranks)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sync-bn", nargs="+", default=["auto"], help="SKIPNET_SYNC_BN of each measurement")
    args = p.parse_args(argv)
    here, device = start(args.device)
    results = []
    for sync_bn in args.sync_bn:
        os.environ["SKIPNET_SYNC_BN"] = sync_bn
        results.append(_measure_once(args, here, torch.device(device)))
        if here.main:
            print(json.dumps(results[-1]), flush=True)
    stop()
    end(here)
    return results


def _measure_once(args: argparse.Namespace, here: Ranks, device: torch.device) -> dict[str, float]:
    from experiments.bench import registry_backbone, synthetic

    net = registry_backbone(args.backbone, args.width, args.in_channels, args.image_size, ()).to(device).train()
    data = synthetic(args.batch, net.input_size, 10)  # one global batch, reused: the step is what is timed
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    index = here.part(torch.arange(args.batch))
    x = data.normalize(data.images[index].to(device)).float()
    y = data.labels[index].to(device)
    with synced_batchnorm(net, device, here, args.batch):
        ddp = here.wrap(net, device)
        seconds = 0.0
        for step in range(args.warmup + args.steps):
            here.barrier()
            t0 = time.perf_counter()
            train_step(ddp, x, y, optimizer, scheduler, here, args.batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                seconds += time.perf_counter() - t0
        del ddp  # DDP's reducer goes before the process group does (else its threads abort the process)
    # the ranks' mean (the sum on the device: NCCL reduces no host tensor)
    seconds = float(here.sum(torch.tensor(seconds, device=device)).item()) / here.world
    here.barrier()  # every rank done before any leaves the group or measures again
    return {
        "ranks": here.world,
        "sync_bn": syncs_batchnorm(here, args.batch),
        "images_per_s": args.batch * args.steps / seconds,
        "step_s": seconds / args.steps,
    }


def throughput(ranks: int, args: list[str], sync_bn: list[str], timeout: float = 900) -> list[dict[str, float]]:
    """:func:`measure` under ``torchrun --nproc-per-node ranks`` (one thread per rank), from a new
    process, once per ``SKIPNET_SYNC_BN`` setting in ``sync_bn``."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    done = subprocess.run(
        [sys.executable, *launcher, "-m", "experiments.data_parallel", *args, "--sync-bn", *sync_bn],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the {ranks}-rank measurement failed:\n{done.stderr[-6000:]}")
    return [json.loads(line) for line in done.stdout.strip().splitlines()[-len(sync_bn) :]]


def bench_ddp(args: list[str], rounds: int, world: int = 2) -> dict[str, Any]:
    """Images/s on 1 rank, on ``world`` ranks (BatchNorm as by default) and on ``world`` ranks with
    BatchNorm synchronised, ``rounds`` interleaved rounds; the medians and their ratios to 1 rank."""
    jobs = {1: {"1 rank": "auto"}, world: {f"{world} ranks": "auto", f"{world} ranks, BatchNorm synced": "1"}}
    figures: dict[str, list[float]] = {name: [] for variants in jobs.values() for name in variants}
    for _ in range(rounds):
        for n, variants in jobs.items():  # the world's two settings in one job
            for name, r in zip(variants, throughput(n, args, list(variants.values()))):
                figures[name].append(r["images_per_s"])
    median = {name: statistics.median(v) for name, v in figures.items()}
    return {
        "images_per_s": median,
        "speedup": {name: v / median["1 rank"] for name, v in median.items()},
        "rounds": rounds,
        "all": figures,
    }


if __name__ == "__main__":
    measure()
