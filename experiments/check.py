"""Check the execution engine on this machine: is the fast routed forward right, and how fast is it?

    python -m experiments.check --device cuda              # a user with a GPU: CIFAR ResNet-110
    python -m experiments.check --checkpoint backbone.pt   # a trained backbone of one's own
    python -m experiments.check --device cpu --no-speed    # the same logic, bucketed but eager

Correctness: images are routed through the frozen backbone twice, block by block, by the engine's
fast path (on CUDA: bucketed row counts replayed from CUDA graphs) and by its eager exact path,
each path deciding its own routes from its own activations (a gate that runs a block on the images
whose activation is above the batch's median there). Reported: the share of routing decisions
that agree, the largest logit difference and the top-1 agreement on the images routed the same.
Speed (on by default): the issue-7 figures, the routed forward at 25/50/75% of the block FLOPs
over the best full forward and the vector env's throughput, each beside its target. Exit status 1
when the fast path is wrong.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import backbones
from backbones.base import FIRST_GATED, Backbone, randomize_batchnorm
from backbones.device import resolve_device
from experiments.bench import bench_savings, bench_throughput, registry_backbone, synthetic
from experiments.cli import one_line_errors
from skipnet_env.engine import BlockExecutor, freeze

# issue 7's targets (one H100 or H200): routed forward time over the best full forward, by
# (execute rate, batch); the vector env's share of the best plain forward's throughput, by batch
ROUTED_TARGETS = {(0.5, 2048): 0.65, (0.5, 256): 0.85, (0.25, 2048): 0.45}
THROUGHPUT_TARGETS = {2048: 0.8, 256: 0.6}


@dataclass
class Agreement:
    """How the fast routed forward compares with the eager one on the same images."""

    batch: int
    decisions_agree: float
    """share of (image, block) routing decisions the two paths made alike"""
    images_same_route: float
    """share of images routed alike through every block"""
    max_logit_difference: float
    """largest |logit difference| over the images routed alike, relative to 1 + the largest |logit|"""
    top1_agree: float
    """share of the images routed alike whose predicted class is the same"""

    def ok(self, tolerance: float) -> bool:
        return self.decisions_agree >= 0.99 and self.max_logit_difference <= tolerance and self.top1_agree >= 0.99


def median_gate(h: Tensor, block: int) -> Tensor:
    """A data-dependent route: run ``block`` on the images whose mean activation in channel
    ``block mod C`` is above the batch's median ``(B,)`` bool, about half of them."""
    score = h[:, block % h.shape[1]].float().mean((1, 2))
    return score > score.median()


@torch.no_grad()
def routed(frozen: Backbone, executor: BlockExecutor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Logits ``(B, classes)`` and routes ``(B, gated blocks)`` of ``x`` through ``executor``, deciding
    each gated block's rows by :func:`median_gate`."""
    h = executor.begin(frozen.enter(x, FIRST_GATED))
    routes = []
    for i in range(FIRST_GATED, frozen.num_blocks):
        execute = median_gate(h, i)
        routes.append(execute)
        h = executor.route(i, h, execute, int(execute.sum()))
    return frozen.head(h).float(), torch.stack(routes, 1)


def compare(frozen: Backbone, fast: BlockExecutor, x: Tensor) -> Agreement:
    """The fast path against the eager exact one (``BlockExecutor(buckets=0)``) on images ``x``."""
    logits_f, routes_f = routed(frozen, fast, x)
    logits_e, routes_e = routed(frozen, BlockExecutor(frozen, buckets=0), x)
    same = (routes_f == routes_e).all(1)
    scale = 1.0 + float(logits_e.abs().max())
    diff = float((logits_f - logits_e)[same].abs().max()) / scale if bool(same.any()) else float("nan")
    top1 = float((logits_f.argmax(1) == logits_e.argmax(1))[same].float().mean()) if bool(same.any()) else 0.0
    return Agreement(x.shape[0], float((routes_f == routes_e).float().mean()), float(same.float().mean()), diff, top1)


def load_network(args: argparse.Namespace) -> Backbone:
    if args.checkpoint:
        net, _ = backbones.load_backbone(args.checkpoint)
        return net
    torch.manual_seed(0)
    net = registry_backbone(args.backbone, args.width, args.in_channels, args.image_size)
    randomize_batchnorm(net)  # no block is the identity it starts as
    return net


def speed(net: Backbone, frozen: Backbone, batch: int, device: torch.device, rounds: int) -> list[dict[str, Any]]:
    """The issue-7 figures at ``batch``: each with its target and whether it is met."""
    rows = []
    _, *savings = bench_savings(net, frozen, batch, device, rounds, [0.25, 0.5, 0.75])
    for r in savings:
        target = ROUTED_TARGETS.get((r["execute_rate"], batch))
        rows.append(
            {
                "figure": f"routed forward at {100 * r['execute_rate']:.0f}% of the blocks / best full forward",
                "batch": batch,
                "measured": r["engine_over_best_full"],
                "target": f"<= {target}" if target else "-",
                "met": None if target is None else r["engine_over_best_full"] <= target,
            }
        )
    ips = bench_throughput(net, synthetic(8 * batch, net.input_size, 10), batch, device, rounds, dummy=False)
    share = ips["vector env, torch tensors"] / max(v for k, v in ips.items() if k.startswith("plain"))
    target = THROUGHPUT_TARGETS.get(batch)
    rows.append(
        {
            "figure": "vector env (torch) throughput / best plain forward",
            "batch": batch,
            "measured": share,
            "target": f">= {target}" if target else "-",
            "met": None if target is None else share >= target,
        }
    )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--backbone", default="cifar_resnet110", help="registry name (random weights)")
    p.add_argument("--checkpoint", default=None, help="a trained backbone checkpoint instead of --backbone")
    p.add_argument("--width", type=float, default=1.0, help="CIFAR ResNet width multiplier")
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument(
        "--batch", type=int, nargs="+", default=None, help="batch sizes (default: 256 2048 on CUDA, 64 on CPU)"
    )
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA), fp32, bf16")
    p.add_argument("--rounds", type=int, default=5, help="speed: interleaved timing rounds")
    p.add_argument("--no-speed", action="store_true", help="check correctness only")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--debug", action="store_true", help="show the traceback of a bad-input error")
    args = p.parse_args(argv)
    with one_line_errors(["--debug"] if args.debug else []):  # bad input: one line
        device = resolve_device(args.device)
        net = load_network(args).to(device)
        frozen = freeze(net, device, precision=args.precision)
    batches = args.batch or ([256, 2048] if device.type == "cuda" else [64])
    graphs = device.type == "cuda"
    # bf16 rounds differently with the batch size (cuDNN picks kernels per shape): a looser bound there
    tolerance = 2e-2 if frozen.compute_dtype == torch.bfloat16 else 1e-4
    name = args.checkpoint or f"{args.backbone} (random weights)"
    print(f"# {name}, {net.num_blocks} blocks, {str(frozen.compute_dtype).removeprefix('torch.')}, on {device}")
    print(f"fast path: bucketed row counts, {'CUDA graphs' if graphs else 'eager (no CUDA here)'}\n")
    result: dict[str, Any] = {"device": str(device), "backbone": name, "checks": [], "speed": []}
    g = torch.Generator().manual_seed(1)
    for batch in batches:
        x = torch.randn(batch, *net.input_size, generator=g).to(device)
        fast = BlockExecutor(frozen, buckets=8, graphs=graphs)
        agreement = compare(frozen, fast, x)
        ok = agreement.ok(tolerance) and fast.graphs == graphs  # a capture that fell back is a failure here
        result["checks"].append({**asdict(agreement), "ok": ok, "graphs_captured": fast.graphs})
        print(
            f"B = {batch}: routing decisions agree {100 * agreement.decisions_agree:.2f}%, images routed alike "
            f"{100 * agreement.images_same_route:.1f}%; on those, max logit difference "
            f"{agreement.max_logit_difference:.2e} (bound {tolerance:.0e}), "
            f"top-1 agree {100 * agreement.top1_agree:.2f}%"
            f"{'' if fast.graphs == graphs else '; CUDA graph capture FAILED (fell back to eager)'}: "
            f"{'ok' if ok else 'WRONG'}"
        )
    if not args.no_speed:
        print("\n| figure | B | measured | target | met |\n|---|---:|---:|---|---|")
        for batch in batches:
            for r in speed(net, frozen, batch, device, args.rounds):
                result["speed"].append(r)
                met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
                print(f"| {r['figure']} | {r['batch']} | {r['measured']:.3f} | {r['target']} | {met} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if not all(c["ok"] for c in result["checks"]):
        print(
            "\nthe fast routed forward differs from the eager one: run with BlockExecutor(graphs=False) and report it"
        )
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
