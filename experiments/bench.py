"""Benchmarks of the environment and of real sparse execution, measured side by side in one run.

    python experiments/bench.py                      # both parts, CIFAR ResNet-110, batch 256
    python experiments/bench.py --device cuda
    python experiments/bench.py --backbone cifar_resnet38 --width 0.5 --in-channels 1 --image-size 16

1. Throughput in image-blocks per second: the batched vector env (torch and numpy outputs) vs
   SB3's DummyVecEnv over the same number of single-image envs vs the plain backbone forward on
   the same batches (the limit).
2. Real savings: wall-clock of the routed forward at policies that execute 25/50/75% of the block
   FLOPs, vs the full forward and vs the masked forward of the original SkipNet code.

Weights are random (speed does not depend on them) and images synthetic, so this runs offline.
Timings are medians over interleaved rounds (every variant once per round), so that a noisy,
shared machine slows all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import backbones  # noqa: E402
from backbones.data import ImageTensors  # noqa: E402
from backbones.device import resolve_device  # noqa: E402
from skipnet_env.env import SkipNetEnv  # noqa: E402
from skipnet_env.routing import masked_forward, routed_forward  # noqa: E402
from skipnet_env.vector_env import SkipNetVectorEnv  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function, every function timed once per round."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)  # no variant always runs first (or after the same neighbour)
        for name in order:
            fn = fns[name]
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def synthetic(n: int, input_size: tuple[int, int, int], num_classes: int, seed: int = 0) -> ImageTensors:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *input_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return ImageTensors(images, labels, num_classes, (0.5,) * input_size[0], (0.25,) * input_size[0], "synthetic")


def bench_throughput(net, data, batch: int, device: torch.device, rounds: int, dummy: bool) -> dict[str, float]:
    from stable_baselines3.common.vec_env import DummyVecEnv

    data_dev = data.to(device)
    blocks = net.num_blocks
    vec_t = SkipNetVectorEnv(batch, net, data, device=device, return_tensors=True)
    vec_n = SkipNetVectorEnv(batch, net, data, device=device)
    vec_t.reset(seed=0)
    vec_n.reset(seed=0)
    ones_t = torch.ones(batch, dtype=torch.long, device=device)
    ones_n = np.ones(batch, dtype=np.int64)
    gates = vec_t.num_gates
    order = torch.randperm(len(data), device=device)
    pos = {"i": 0}

    @torch.no_grad()
    def plain() -> None:  # the same work: draw a batch, normalise, full forward
        i = pos["i"] = (pos["i"] + batch) % (len(data) - batch)
        x, _ = data_dev.batch(order[i : i + batch])
        net(x).argmax(1)

    def episode(env, ones) -> Callable[[], None]:
        def run() -> None:  # one full episode per env (the autoreset draws the next batch)
            for _ in range(gates):
                env.step(ones)

        return run

    fns = {
        "plain backbone forward": plain,
        "vector env, torch tensors": episode(vec_t, ones_t),
        "vector env, numpy arrays": episode(vec_n, ones_n),
    }
    medians = interleaved(fns, rounds, device)
    if dummy:
        singles = DummyVecEnv([lambda: SkipNetEnv(net, data, device=device)] * batch)
        singles.reset()
        ones_d = np.ones(batch, dtype=np.int64)
        medians.update(
            interleaved(
                {f"SB3 DummyVecEnv of {batch} single envs": episode(singles, ones_d)}, max(1, rounds // 3), device
            )
        )
    return {name: batch * blocks / t for name, t in medians.items()}  # image-blocks per second


def bench_savings(net, batch: int, device: torch.device, rounds: int, rates: list[float]) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, *net.input_size, generator=g).to(device)
    f = net.flops
    exec_f = torch.tensor(f.block_executed, dtype=torch.float64)
    skip_f = torch.tensor(f.block_skipped, dtype=torch.float64)
    masks = {}
    for rate in rates:
        m = torch.rand(batch, net.num_blocks, generator=g) < rate
        m[:, 0] = True  # SkipNet always runs the first block
        masks[rate] = m
    fns: dict[str, Callable[[], None]] = {}
    ones = torch.ones(batch, net.num_blocks, dtype=torch.bool, device=device)
    with torch.no_grad():
        fns["full"] = lambda: net(x)
        for rate, m in masks.items():
            md = m.to(device)
            fns[f"routed {rate}"] = lambda md=md: routed_forward(net, x, md)
            fns[f"masked {rate}"] = lambda md=md: masked_forward(net, x, md)
        fns["routed all"] = lambda: routed_forward(net, x, ones)
        medians = interleaved(fns, rounds, device)
    rows = []
    for rate, m in masks.items():
        e = m.double()
        block_fraction = float((e @ exec_f + (1 - e) @ skip_f).mean() / exec_f.sum())
        total_fraction = float(((e @ exec_f + (1 - e) @ skip_f).mean() + f.stem + f.head) / f.full)
        rows.append(
            {
                "execute_rate": rate,
                "block_flops_fraction": block_fraction,
                "network_flops_fraction": total_fraction,
                "routed_time_fraction": medians[f"routed {rate}"] / medians["full"],
                "masked_time_fraction": medians[f"masked {rate}"] / medians["full"],
                "routed_ms": 1e3 * medians[f"routed {rate}"],
                "masked_ms": 1e3 * medians[f"masked {rate}"],
            }
        )
    rows.append(
        {
            "execute_rate": 1.0,
            "full_ms": 1e3 * medians["full"],
            "routed_all_time_fraction": medians["routed all"] / medians["full"],
        }
    )
    return rows


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


# glibc hands large freed buffers back to the OS, so on the CPU every forward page-faults its
# activations in again (we saw the per-image cost of a block triple at batch 256 from this alone,
# with high system time). Keeping freed memory in the heap removes that noise for every variant.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def reexec_with_malloc_settings() -> None:
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()) and sys.platform.startswith("linux"):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="cifar_resnet110", help="registry name")
    p.add_argument("--width", type=float, default=1.0, help="CIFAR ResNet width multiplier")
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=256, help="images per batch (B)")
    p.add_argument("--device", default="auto")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--parts", nargs="+", default=["throughput", "savings"], choices=["throughput", "savings"])
    p.add_argument("--no-dummy", action="store_true", help="skip the (slow) DummyVecEnv measurement")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    wanted = {"image_size": args.image_size, "width": args.width, "in_channels": args.in_channels}
    kwargs = {k: v for k, v in wanted.items() if k in backbones.registry.options(args.backbone)}
    net = backbones.create(args.backbone, num_classes=10, **kwargs).to(device).eval()
    result: dict = {
        "machine": machine(device),
        "backbone": args.backbone,
        "width": args.width,
        "input_size": list(net.input_size),
        "batch": args.batch,
        "blocks": net.num_blocks,
    }
    print(
        f"# {args.backbone} (width {args.width}, input {tuple(net.input_size)}), batch {args.batch}, "
        f"on {result['machine']}\n"
    )
    if "throughput" in args.parts:
        data = synthetic(8 * args.batch, net.input_size, 10)
        ips = bench_throughput(net, data, args.batch, device, args.rounds, not args.no_dummy)
        result["throughput"] = ips
        limit = ips["plain backbone forward"]
        print("| runner | image-blocks/s | slowdown vs plain forward |\n|---|---:|---:|")
        for name, v in ips.items():
            print(f"| {name} | {v:,.0f} | {limit / v:.2f}x |")
        dummy = next((v for k, v in ips.items() if k.startswith("SB3")), None)
        if dummy:
            print(f"\nvector env (torch) vs DummyVecEnv: {ips['vector env, torch tensors'] / dummy:.1f}x faster\n")
    if "savings" in args.parts:
        rows = bench_savings(net, args.batch, device, args.rounds, [0.25, 0.5, 0.75])
        result["savings"] = rows
        full = rows[-1]
        print(
            f"full forward: {full['full_ms']:.1f} ms; routed forward with every block executed: "
            f"{full['routed_all_time_fraction']:.3f} of it\n"
        )
        print("| execute rate | block FLOPs fraction | routed time fraction | time/FLOPs | masked time fraction |")
        print("|---:|---:|---:|---:|---:|")
        for r in rows[:-1]:
            print(
                f"| {r['execute_rate']:.2f} | {r['block_flops_fraction']:.3f} | {r['routed_time_fraction']:.3f} | "
                f"{r['routed_time_fraction'] / r['block_flops_fraction']:.2f} | {r['masked_time_fraction']:.3f} |"
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    reexec_with_malloc_settings()
    main()
