"""How much the REINFORCE baseline cuts the variance of the gates' policy gradient.

    python experiments/baseline_variance.py

Takes SkipNet's recurrent gates after supervised pre-training on the default backbone, rolls out
``--rollouts`` batches of the environment, and computes on the *same* samples the REINFORCE
gradient with no baseline (the reference code), the batch-mean baseline, and the self-critical
baseline (the greedy route's return on the same image). Prints the total variance of each
estimator across batches (sum over parameters) and its ratio to the reference code's.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from agents.gates import create_gates
from agents.hybrid import BASELINES, HybridConfig, HybridTrainer, advantages, discounted_returns, reinforce_loss
from backbones.data import load_dataset
from backbones.pretrained import get_trained
from experiments.cli import one_line_errors
from skipnet_env.core import DEFAULT_ALPHA, BatchedRouting


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rollouts", type=int, default=50)
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    p.add_argument("--num-envs", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="cluttered_digits")
    p.add_argument("--sp-epochs", type=int, default=1)
    p.add_argument("--debug", action="store_true", help="show the traceback of a bad-input error")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    with one_line_errors(["--debug"] if args.debug else []):
        train = load_dataset(args.dataset, "train")
        backbone, _ = get_trained("cifar_resnet38", args.dataset, progress=False, device="cpu")
    gates = create_gates("rnn", backbone)
    cfg = HybridConfig.flat(sp_epochs=args.sp_epochs)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = HybridTrainer(
            backbone, gates, train, cfg, device, Path(tmp) / "a.pt", {}, progress=False,
            num_envs=args.num_envs, alpha=args.alpha, seed=args.seed,
        )  # fmt: skip
        trainer.train_sp()
        env = trainer.make_env()
        env.reset(seed=args.seed)
        trainer.replay = BatchedRouting(backbone, env.core.reward)
        params = [q for q in gates.parameters() if q.requires_grad]
        grads: dict[str, list[torch.Tensor]] = {name: [] for name in BASELINES}
        for _ in range(args.rollouts):
            ep = trainer.rollout(env)
            returns = discounted_returns(ep["reward"], 1.0)
            greedy = trainer.greedy_route(ep["start"], ep["label"])[0]
            for name in grads:
                loss = reinforce_loss(ep["log_prob"], advantages(returns, name, greedy))
                g = torch.autograd.grad(loss, params, retain_graph=True)
                grads[name].append(torch.cat([x.flatten() for x in g]))
    var = {name: torch.stack(g).var(dim=0).sum().item() for name, g in grads.items()}
    print(f"total gradient variance over {args.rollouts} batches of {args.num_envs} ({args.dataset}):")
    for name in BASELINES:
        print(f"  {name:<14} {var[name]:.4g}  ({var['none'] / var[name]:.1f}x lower than none)")
    return var


if __name__ == "__main__":
    main()
