"""BlockDrop (Wu et al., CVPR 2018) on ``SkipNetOneShot-v0``: a small policy network looks at the
image once and outputs N Bernoulli probabilities, the whole execute mask; trained with REINFORCE
and a self-critical baseline (the greedy mask's reward on the same images).

Differences from the paper, said plainly: the reward is the environment's (the negative
cross-entropy minus ``alpha`` times the FLOPs fraction, as SkipNet's; ``accuracy_reward="correct"``
gives 1/0) instead of BlockDrop's ``1 - (blocks used / N)^2`` or ``-gamma``; its bounded
exploration (``explore``, 0.8 in the paper) is off by default; no curriculum over the number of
blocks; the policy is a three-layer CNN instead of a ResNet-8; the backbone stays frozen (no joint
fine-tuning). With the 1/0 reward the masks collapsed to one fixed subset that lost to ``static``;
with the cross-entropy they tie it (BENCHMARKS.md, section 8).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from agents.policies import RoutingPolicy
from agents.registry import AgentContext, AgentSpec, register_agent
from agents.trainer import RunValues, Trainer
from backbones.base import FIRST_GATED, Backbone
from backbones.data import Dataset
from backbones.options import COUNT, POSITIVE, POSITIVE_INT, Rule, check_options, option
from backbones.progress import progress_bar
from skipnet_env.core import AccuracyReward
from skipnet_env.oneshot import SkipNetOneShotVectorEnv, run_mask


class BlockDropNet(nn.Module):
    """Image ``(B, C, H, W)`` -> execute logits ``(B, N)``: three conv-BN-ReLU layers of stride 2
    (BlockDrop, too, looks at a downsampled image), global average pool, a linear layer; starts by
    executing every block. At width 16 it costs about 3% of the default backbone's FLOPs (counted
    in every evaluation)."""

    def __init__(self, in_channels: int, num_gates: int, width: int = 16, init_execute: float = 2.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(True)]
            c = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.logits = nn.Linear(c, num_gates)
        nn.init.zeros_(self.logits.weight)
        nn.init.constant_(self.logits.bias, init_execute)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(self.features(x.float()))


class OneShotPolicy(RoutingPolicy):
    """A mask-at-once network at evaluation: execute where ``p(execute) >= 0.5``, decided from the
    images when the episode begins."""

    def __init__(self, net: BlockDropNet, name: str = "blockdrop") -> None:
        self.net, self.name = net.eval(), name
        self._mask: Tensor | None = None

    @torch.no_grad()
    def begin(self, images: Tensor) -> None:
        self._mask = self.net(images) >= 0.0  # (B, N)

    def act(self, obs: Tensor, activation: Tensor, k: int) -> Tensor:
        if self._mask is None:
            raise RuntimeError("a one-shot policy decides from the images: call begin(images) first")
        return self._mask[:, k]


@dataclass
class BlockDropConfig:
    """BlockDrop (--agent blockdrop): a policy network decides the whole mask from the image.

    The run's compute price, seed, precision and batch are not here: they are the run's, given to
    :class:`BlockDropTrainer` as they are."""

    flag_prefix: ClassVar[str] = "blockdrop_"

    iterations: int = option(1000, COUNT)
    """blockdrop: REINFORCE iterations (one batch of num_envs images each)"""
    lr: float = option(1e-3, POSITIVE, resumable=True)
    """blockdrop: Adam learning rate of the policy network"""
    width: int = option(16, POSITIVE_INT)
    """blockdrop: channels of the policy network's first layer (then 2x, 4x)"""
    reward: AccuracyReward = "neg_ce"
    """blockdrop: the accuracy term of the reward: neg_ce (negative cross-entropy) or correct (1/0)"""
    explore: float = option(1.0, Rule(lambda v: 0.5 < v <= 1.0, "in (0.5, 1]"))
    """blockdrop: masks sampled from explore * p + (1 - explore) * (1 - p) (BlockDrop's paper: 0.8; 1: off)"""

    def __post_init__(self) -> None:
        check_options(self)


class BlockDropTrainer(Trainer):
    """REINFORCE with a self-critical baseline on the batched one-shot env; checkpoints atomically
    every ``checkpoint_every`` iterations and resumes exactly (the sampler, the action generator
    and the optimizer are saved with the network: :class:`agents.trainer.Trainer`). On several
    ranks (``torchrun``) each rank plays ``num_envs`` images of its own (its own streams of images
    and masks) and DDP averages the ranks' gradients."""

    def __init__(
        self,
        backbone: Backbone,
        net: BlockDropNet,
        data: Dataset,
        cfg: BlockDropConfig,
        device: torch.device,
        checkpoint: Path,
        metadata: dict[str, Any],
        writer: Any = None,
        progress: bool = True,
        **run: Unpack[RunValues],
    ) -> None:
        super().__init__(cfg, device, checkpoint, metadata, writer, progress, **run)
        self.net = net.to(device)
        here = self.ranks
        here.check_same("the training images' fingerprint", data.fingerprint)
        self.policy = here.wrap(self.net, device)  # DDP on ranks: one forward and one backward per step
        self.env = SkipNetOneShotVectorEnv(
            self.num_envs,
            backbone,
            data,
            return_tensors=True,
            alpha=self.alpha,
            accuracy_reward=cfg.reward,
            device=device,
            precision=self.precision,
        )
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        self.generator = torch.Generator(device=device).manual_seed(here.seed(self.seed + 1))
        self.env.reset(seed=here.seed(self.seed))

    def trained_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self.net.named_parameters())

    def training_state(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "optimizer": self.opt.state_dict(), **self.rank_state()}

    def rank_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "sampler": self.env.sampler.state_before_last_draw()}

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"].cpu())
        self.env.sampler.restore(state["sampler"])
        self.env.reset()  # the batch the interrupted run was about to play

    def step(self) -> dict[str, Tensor]:
        """One REINFORCE update on the current batch; returns detached statistics."""
        env, core = self.env, self.env.core
        x, y = env.batch
        logits = self.policy(x)  # (B, N)
        p = torch.sigmoid(logits)
        p = self.cfg.explore * p + (1.0 - self.cfg.explore) * (1.0 - p)  # BlockDrop keeps sampling both ways
        sampled = torch.rand(p.shape, device=p.device, generator=self.generator) < p.detach()
        greedy = logits.detach() >= 0.0
        with torch.no_grad():  # the self-critical baseline: the greedy mask on the same images
            counts = greedy.sum(0).tolist()  # one sync for the replay's shapes
            _, greedy_reward, _ = run_mask(core, x, y, greedy, counts)
        _, reward, _, _, info = env.step(sampled)  # runs the sample, then draws the next batch
        if self.cfg.explore < 1.0:
            dist = torch.distributions.Bernoulli(probs=p, validate_args=False)
        else:  # from the logits: exact where p saturates
            dist = torch.distributions.Bernoulli(logits=logits, validate_args=False)
        log_prob = dist.log_prob(sampled.float()).sum(1)  # (B,)
        entropy = dist.entropy().sum(1).mean()
        advantage = reward - greedy_reward
        loss = -(advantage * log_prob).mean() - self.entropy_coef * entropy
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        final = info["final_info"]
        return {
            "losses/total": loss.detach(),
            "charts/episodic_return": reward.mean(),
            "charts/train_accuracy": final["correct"].float().mean(),
            "charts/flops_fraction": final["flops_fraction"].mean(),
        }

    def train(self) -> OneShotPolicy:
        bar = progress_bar(self.cfg.iterations, "BlockDrop (REINFORCE)", self.progress, initial=self.done_units)
        while self.done_units < self.cfg.iterations:
            self.record(self.step())
            self.done_units += 1
            bar.update(1)
            if self.done_units % self.checkpoint_every == 0 or self.done_units == self.cfg.iterations:
                means = self.flush(self.done_units, "losses/total", "BlockDrop")
                bar.set_postfix(
                    acc=f"{means['charts/train_accuracy']:.3f}", flops=f"{means['charts/flops_fraction']:.3f}"
                )
                self.stage = "done" if self.done_units == self.cfg.iterations else "train"
                self.save()
        bar.close()
        if self.cfg.iterations == 0:
            self.stage = "done"
            self.save()
        self.ranks.share(self.net)  # rank 0's, the one written (the ranks' are equal: one averaged gradient)
        return OneShotPolicy(self.net)


# -- the agent ----------------------------------------------------------------------------------------


def _blockdrop_net(ctx: AgentContext, width: int | None = None) -> BlockDropNet:
    num_gates = ctx.backbone.num_blocks - FIRST_GATED
    return BlockDropNet(ctx.backbone.input_size[0], num_gates, width or ctx.options.width).to(ctx.device)


def _train_blockdrop(ctx: AgentContext, state: dict | None) -> RoutingPolicy:
    c = ctx.cfg
    trainer = BlockDropTrainer(
        ctx.backbone, _blockdrop_net(ctx), ctx.train_data, ctx.options, ctx.device, ctx.checkpoint, ctx.metadata,
        ctx.writer, c.progress, **c.run_values(),
    )  # fmt: skip
    if state is not None:
        trainer.resume(state)
    return trainer.train()


def _load_blockdrop(ctx: AgentContext, state: dict) -> RoutingPolicy:
    net = _blockdrop_net(ctx, width=state["net"]["features.0.weight"].shape[0])  # the width it was trained with
    net.load_state_dict(state["net"])
    return OneShotPolicy(net)


register_agent(
    "blockdrop",
    AgentSpec(
        _train_blockdrop, _load_blockdrop, env="SkipNetOneShot-v0", options=BlockDropConfig, data_parallel=True,
        smoke=("--blockdrop-iterations", "4", "--blockdrop-width", "4", "--num-envs", "32", "--checkpoint-every", "2"),
    ),
)  # fmt: skip
