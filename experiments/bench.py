"""Benchmarks of the environment and of real sparse execution, measured side by side in one run.

    python experiments/bench.py                      # CIFAR ResNet-110; batch 256 (CPU) or 256 and 2048 (CUDA)
    python experiments/bench.py --device cuda        # every GPU target of BENCHMARKS.md in one command
    python experiments/bench.py --backbone cifar_resnet38 --width 0.5 --in-channels 1 --image-size 16
    python experiments/bench.py --parts recipe static --recipe-images 4096   # smaller on a CPU
    python experiments/bench.py --backbone timm:vit_tiny_patch16_224 --backbone-args depth=6 embed_dim=64 num_heads=2 \
        --in-channels 1 --image-size 24 --parts forward savings              # a ViT

Parts:

- ``forward``: the plain forward of the device, eager fp32 (the original network) and on the
  frozen execution engine (BN folded; bf16 + channels_last on CUDA; also captured whole in one
  CUDA graph there). The fastest is the *limit* every other figure is compared with.
- ``throughput``: image-blocks per second of the batched vector env (torch and numpy outputs) and
  of SB3's DummyVecEnv over single-image envs, against the plain forward on the same batches.
- ``savings``: wall-clock of the routed forward at policies that execute 25/50/75% of the block
  FLOPs, on the engine and on the reference gather/scatter path, over the limit.
- ``recipe``: one SP epoch and ``--recipe-hrl`` HRL iterations of the hybrid recipe on
  ``--recipe-images`` synthetic images at the device's default batch sizes.
- ``static``: the static baseline's elimination path over the device's default image count.
- ``data``: ``cluttered_digits`` through the built-in loader, and written out as a PNG folder and
  as an ``.npz`` (a user's own data): the backbone trained from each (``--data-epochs``), its test
  accuracy with the paired difference to the built-in one, and seconds per epoch.

Weights are random (speed does not depend on them) and images synthetic, so this runs offline
(``data`` trains on the embedded ``cluttered_digits``).
Timings are medians over interleaved rounds (every variant once per round), so that a noisy,
shared machine slows all of them alike.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import backbones
from backbones.base import Backbone
from backbones.data import ImageTensors
from backbones.device import resolve_device
from backbones.registry import options
from backbones.zoo import parse_model_args
from experiments.cli import one_line_errors
from skipnet_env.engine import BlockExecutor, capture, freeze
from skipnet_env.env import SkipNetEnv
from skipnet_env.routing import masked_forward, routed_forward
from skipnet_env.vector_env import SkipNetVectorEnv


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, device: torch.device) -> dict[str, float]:
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


def graphed(fn: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], Any]:
    """``fn(x)`` captured in one CUDA graph (the engine's :func:`capture`) with ``x`` its static input:
    write the next input into ``x``, then call the result to replay."""
    with torch.no_grad():
        return capture(lambda: fn(x), x.device, warmup_runs=3, keep=(x,))


def registry_backbone(
    name: str, width: float, in_channels: int, image_size: int, model_args: tuple[str, ...] = ()
) -> Backbone:
    """Registry backbone ``name`` (10 classes, random weights) built with the options it takes (a zoo
    model's own keyword arguments: ``model_args``, ``key=value``)."""
    wanted = {
        "image_size": image_size, "width": width, "in_channels": in_channels, "model_args": parse_model_args(model_args)
    }  # fmt: skip
    return backbones.create(name, num_classes=10, **{k: v for k, v in wanted.items() if k in options(name)})


def engine_label(frozen: Backbone) -> str:
    """How the engine's copy computes, e.g. ``engine (bfloat16, channels_last, BN folded)``."""
    fmt = ", channels_last" if frozen.memory_format == torch.channels_last else ""
    return f"engine ({str(frozen.compute_dtype).removeprefix('torch.')}{fmt}, BN folded)"


def forward_variants(net: Backbone, frozen: Backbone, x: Tensor) -> dict[str, Callable[[], Any]]:
    """The plain full forwards of the device: eager fp32, the engine, the engine in one CUDA graph."""
    xe = frozen.prepare(x)
    engine = engine_label(frozen)
    fns: dict[str, Callable[[], Any]] = {"eager fp32": lambda: net(x), engine: lambda: frozen(xe)}
    if x.device.type == "cuda":
        fns[f"{engine}, one CUDA graph"] = graphed(frozen, xe)
    return fns


def bench_forward(net: Backbone, frozen: Backbone, batch: int, device: torch.device, rounds: int) -> dict[str, float]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, *net.input_size, generator=g).to(device)
    with torch.no_grad():
        return interleaved(forward_variants(net, frozen, x), rounds, device)


def bench_throughput(net, data, batch: int, device: torch.device, rounds: int, dummy: bool) -> dict[str, float]:
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
    frozen = vec_t.core.net
    x0, _ = data_dev.batch(order[:batch])
    static_input = frozen.prepare(x0).clone()  # the graphed forward reads a static input
    graph_fn = graphed(frozen, static_input) if device.type == "cuda" else None

    def draw() -> Tensor:  # the same work as the env: draw a batch and normalise it
        i = pos["i"] = (pos["i"] + batch) % (len(data) - batch)
        return data_dev.batch(order[i : i + batch])[0]

    @torch.no_grad()
    def plain_fp32() -> None:
        net(draw()).argmax(1)

    @torch.no_grad()
    def plain_engine() -> None:
        frozen(frozen.prepare(draw())).argmax(1)

    @torch.no_grad()
    def plain_graphed() -> None:
        static_input.copy_(frozen.prepare(draw()))
        assert graph_fn is not None
        graph_fn()

    def episode(env, ones) -> Callable[[], Any]:
        def run() -> None:  # one full episode per env (the autoreset draws the next batch)
            for _ in range(gates):
                env.step(ones)

        return run

    fns = {
        "plain forward, eager fp32": plain_fp32,
        f"plain forward, {engine_label(frozen)}": plain_engine,
        "vector env, torch tensors": episode(vec_t, ones_t),
        "vector env, numpy arrays": episode(vec_n, ones_n),
    }
    if graph_fn is not None:
        fns[f"plain forward, {engine_label(frozen)}, one CUDA graph"] = plain_graphed
    medians = interleaved(fns, rounds, device)
    if dummy:
        from stable_baselines3.common.vec_env import DummyVecEnv

        singles = DummyVecEnv([lambda: SkipNetEnv(net, data, device=device)] * batch)
        singles.reset()
        ones_d = np.ones(batch, dtype=np.int64)
        medians.update(
            interleaved(
                {f"SB3 DummyVecEnv of {batch} single envs": episode(singles, ones_d)}, max(1, rounds // 3), device
            )
        )
    return {name: batch * blocks / t for name, t in medians.items()}  # image-blocks per second


def engine_routed(
    frozen: Backbone, executor: BlockExecutor, x: Tensor, mask: Tensor, counts: list[int]
) -> Callable[[], Any]:
    """The env's routed forward on the engine: executed counts known on the host, as the env's
    one sync per step provides them."""

    def run() -> None:
        h = executor.begin(frozen.stem(x))
        for i in range(frozen.num_blocks):
            h = executor.route(i, h, mask[:, i], counts[i])
        frozen.head(h)

    return run


def bench_savings(
    net, frozen, batch: int, device: torch.device, rounds: int, rates: list[float], gate_first_block: bool = False
) -> list[dict]:
    """The routed forward at each execute rate (every block run with probability ``rate``, the first
    always, as SkipNet runs it, unless ``gate_first_block``, the env's option of that name) against
    the full forwards, interleaved."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, *net.input_size, generator=g).to(device)
    xe = frozen.prepare(x)
    executor = BlockExecutor(frozen)
    f = net.flops
    exec_f = torch.tensor(f.block_executed, dtype=torch.float64)
    skip_f = torch.tensor(f.block_skipped, dtype=torch.float64)
    masks = {}
    for rate in [*rates, 1.0]:
        m = torch.rand(batch, net.num_blocks, generator=g) < rate
        m[:, 0] |= not gate_first_block  # SkipNet always runs the first block
        masks[rate] = m
    with torch.no_grad():
        plain = forward_variants(net, frozen, x)
        fns = dict(plain)
        for rate, m in masks.items():
            md, counts = m.to(device), m.sum(0).tolist()
            fns[f"engine {rate}"] = engine_routed(frozen, executor, xe, md, counts)
            fns[f"reference {rate}"] = functools.partial(routed_forward, net, x, md)
            if rate < 1.0:
                fns[f"masked {rate}"] = functools.partial(masked_forward, net, x, md)
        for fn in list(fns.values()):  # CUDA graphs of every bucket the masks reach, captured before timing
            fn()
        medians = interleaved(fns, rounds, device)
    full = {name: medians[name] for name in plain}
    best_name = min(full, key=lambda name: full[name])
    best = full[best_name]
    rows = []
    for rate, m in masks.items():
        e = m.double()
        spent = (e @ exec_f + (1 - e) @ skip_f).mean()
        row = {
            "execute_rate": rate,
            "block_flops_fraction": float(spent / exec_f.sum()),
            "network_flops_fraction": float((spent + f.stem + f.head) / f.full),
            "engine_ms": 1e3 * medians[f"engine {rate}"],
            "reference_ms": 1e3 * medians[f"reference {rate}"],
            "engine_over_best_full": medians[f"engine {rate}"] / best,
            "reference_over_eager_full": medians[f"reference {rate}"] / medians["eager fp32"],
        }
        if rate < 1.0:
            row["masked_over_eager_full"] = medians[f"masked {rate}"] / medians["eager fp32"]
        rows.append(row)
    return [{"full_ms": {k: 1e3 * v for k, v in full.items()}, "best_full": best_name}, *rows]


def bench_recipe(net: Backbone, device: torch.device, images: int, hrl_iterations: int) -> dict[str, Any]:
    """Seconds of one SP epoch over ``images`` synthetic images and of ``hrl_iterations`` HRL
    iterations, at the device's default batch size and the hybrid_rnn gates' defaults."""
    import tempfile

    from agents.gates import create_gates
    from agents.hybrid import HybridTrainer
    from backbones.options import replace
    from experiments.config import RunConfig

    cfg = replace(RunConfig(progress=False), sp_epochs=1, hrl_iterations=hrl_iterations).for_device(device, images)
    batch, _ = cfg.batch_sizes()
    data = synthetic(images, net.input_size, net.num_classes, seed=1)
    gates = create_gates("rnn", net, **cfg.gates.options()).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = HybridTrainer(
            net, gates, data, cfg.hybrid, device, Path(tmp) / "agent.pt", {}, progress=False, **cfg.run_values()
        )
        sync(device)
        t0 = time.perf_counter()
        trainer.train_sp()
        sync(device)
        t1 = time.perf_counter()
        trainer.train_hrl()
        sync(device)
        t2 = time.perf_counter()
    return {
        "batch": batch,
        "images": images,
        "sp_epoch_s": t1 - t0,
        "hrl_iterations": hrl_iterations,
        "hrl_s": t2 - t1,
        "hrl_episodes_per_s": hrl_iterations * batch / (t2 - t1),
    }


def bench_static(net: Backbone, device: torch.device) -> dict[str, float]:
    from agents.fixed import default_search_images, elimination_path

    images = default_search_images(device)
    data = synthetic(images, net.input_size, net.num_classes, seed=2)
    sync(device)
    t0 = time.perf_counter()
    path = elimination_path(net, data, device, progress=False)
    sync(device)
    return {"images": images, "seconds": time.perf_counter() - t0, "path_points": len(path)}


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


PARTS = ("forward", "throughput", "savings", "recipe", "static", "data", "ddp")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="cifar_resnet110", help="registry name, or timm:<model>, torchvision:<model>")
    p.add_argument("--backbone-args", nargs="+", default=[], help="a zoo model's keyword arguments, key=value")
    p.add_argument("--width", type=float, default=1.0, help="CIFAR ResNet width multiplier")
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes B (default: 256; 256 2048 on CUDA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument(
        "--parts", nargs="+", default=["forward", "throughput", "savings"], choices=PARTS, help="what to measure"
    )
    p.add_argument("--recipe-images", type=int, default=50_000, help="recipe: synthetic training images (SP epoch)")
    p.add_argument("--recipe-hrl", type=int, default=100, help="recipe: HRL iterations")
    p.add_argument("--no-dummy", action="store_true", help="skip the (slow) DummyVecEnv measurement")
    p.add_argument("--data-epochs", type=int, default=10, help="data: backbone training epochs per loader")
    p.add_argument("--ddp-steps", type=int, default=20, help="ddp: timed training steps per measurement")
    p.add_argument(
        "--gate-first-block", action="store_true", help="savings: the first block routed too (the env's option)"
    )
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--debug", action="store_true", help="show the traceback of a bad-input error")
    args = p.parse_args(argv)

    with one_line_errors(["--debug"] if args.debug else []):
        device = resolve_device(args.device)
        net = registry_backbone(args.backbone, args.width, args.in_channels, args.image_size, tuple(args.backbone_args))
        net = net.to(device).eval()
    batch_sizes = args.batch or ([256, 2048] if device.type == "cuda" else [256])
    frozen = freeze(net)
    result: dict = {
        "machine": machine(device),
        "backbone": args.backbone,
        "width": args.width,
        "input_size": list(net.input_size),
        "blocks": net.num_blocks,
        "batches": {},
    }
    print(f"# {args.backbone} (width {args.width}, input {tuple(net.input_size)}) on {result['machine']}\n")
    for batch in batch_sizes:
        out: dict = result["batches"].setdefault(str(batch), {})
        if "forward" in args.parts:
            ms = {k: 1e3 * v for k, v in bench_forward(net, frozen, batch, device, args.rounds).items()}
            out["forward_ms"] = ms
            print(f"## Plain forward, B = {batch}\n\n| forward | ms | vs eager fp32 |\n|---|---:|---:|")
            for name, v in ms.items():
                print(f"| {name} | {v:.2f} | {ms['eager fp32'] / v:.2f}x faster |")
            print()
        if "throughput" in args.parts:
            data = synthetic(8 * batch, net.input_size, 10)
            ips = bench_throughput(net, data, batch, device, args.rounds, not args.no_dummy)
            out["throughput"] = ips
            limit = max(v for k, v in ips.items() if k.startswith("plain"))
            print(f"## Throughput, B = {batch} (image-blocks/s)\n")
            print("| runner | image-blocks/s | share of the best plain forward |\n|---|---:|---:|")
            for name, v in ips.items():
                print(f"| {name} | {v:,.0f} | {v / limit:.2f} |")
            dummy = next((v for k, v in ips.items() if k.startswith("SB3")), None)
            if dummy:
                print(f"\nvector env (torch) vs DummyVecEnv: {ips['vector env, torch tensors'] / dummy:.1f}x faster")
            print()
        if "savings" in args.parts:
            head, *rows = bench_savings(
                net, frozen, batch, device, args.rounds, [0.25, 0.5, 0.75], args.gate_first_block
            )
            out["savings"] = [head, *rows]
            print(f"## Routed forward, B = {batch}: time over the best full forward ({head['best_full']})\n")
            print("| execute rate | block FLOPs | engine / best full | reference / eager full | masked / eager full |")
            print("|---:|---:|---:|---:|---:|")
            for r in rows:
                masked = f"{r['masked_over_eager_full']:.3f}" if "masked_over_eager_full" in r else "-"
                print(
                    f"| {r['execute_rate']:.2f} | {r['block_flops_fraction']:.3f} | {r['engine_over_best_full']:.3f} | "
                    f"{r['reference_over_eager_full']:.3f} | {masked} |"
                )
            print()
    if "recipe" in args.parts:
        r = result["recipe"] = bench_recipe(net, device, args.recipe_images, args.recipe_hrl)
        print(
            f"## Recipe (hybrid_rnn, B = {r['batch']}): one SP epoch over {r['images']:,} images "
            f"{r['sp_epoch_s']:.1f} s; "
            f"{r['hrl_iterations']} HRL iterations {r['hrl_s']:.1f} s ({r['hrl_episodes_per_s']:,.0f} episodes/s)\n"
        )
    if "static" in args.parts:
        r = result["static"] = bench_static(net, device)
        print(f"## Static search: elimination path over {r['images']:,} images in {r['seconds']:.1f} s\n")
    if "data" in args.parts:
        from experiments.data_formats import bench_data  # a training experiment of its own

        loaders = result["data"] = bench_data(device, args.data_epochs)
        print(f"## Your own data: cluttered_digits as a PNG folder and an .npz, {args.data_epochs} epochs each\n")
        print("| loader | test accuracy % | 95% interval | vs built-in (paired) | s / epoch | vs built-in |")
        print("|---|---:|---|---|---:|---:|")
        for label, r in loaders.items():
            d = r["vs_built_in"]
            print(
                f"| {label} | {100 * r['accuracy']:.2f} | [{100 * r['ci95'][0]:.2f}, {100 * r['ci95'][1]:.2f}] | "
                f"{100 * d['difference']:+.2f} [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}] | "
                f"{r['epoch_s']:.1f} | {r['epoch_over_built_in']:.2f}x |"
            )
        print()
    if "ddp" in args.parts:
        from experiments.data_parallel import bench_ddp  # torchrun jobs of their own

        shape = ["--backbone", args.backbone, "--width", str(args.width), "--in-channels", str(args.in_channels)]
        shape += ["--image-size", str(args.image_size), "--device", str(device), "--steps", str(args.ddp_steps)]
        r = result["ddp"] = bench_ddp(shape, args.rounds)
        print("## Data-parallel training (the base trainer's step, global batch 128, one thread per rank)\n")
        print(f"| ranks | images/s (median of {r['rounds']} interleaved rounds) | speed-up |\n|---|---:|---:|")
        for name, v in r["images_per_s"].items():
            print(f"| {name} | {v:.0f} | {r['speedup'][name]:.2f}x |")
        print()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    reexec_with_malloc_settings()
    main()
