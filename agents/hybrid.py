"""SkipNet's hybrid algorithm on the SkipNet-Gym environment, read top to bottom.

Stage 1, supervised pre-training (SP): hard gates in the forward pass, ``g = 1[p >= 0.5]``, with
the straight-through gradient ``g = stopgrad(1[p >= 0.5] - p) + p``; loss = cross-entropy of the
routed network's prediction plus ``sp_alpha`` times the FLOPs the executed blocks cost (a share of
the full network's). Every block runs on every image here (the gradient of a skipped block's gate
needs the block's output), so SP is masked, not sparse.

The compute term is ours. The paper's SP is cross-entropy alone (``--sp-alpha 0``), which works
when the backbone trains with the gates; on a frozen backbone every block only helps, so SP
without cost teaches the gates nothing but "execute". With it, SP is where the gates learn to
route per image: the straight-through gradient of the cross-entropy with respect to gate ``k`` is
a first-order estimate of how much running block ``k`` helps *this* image, against the block's
price. ``sp_sample`` makes each gate a sample (logistic noise before the threshold).

Stage 2, hybrid RL (HRL): the gates act in the batched environment, sampling ``a ~ Bernoulli(p)``
at each block; the environment's reward is SkipNet's: a per-block compute cost (``alpha`` times the
block's share of the network's FLOPs) and the negative cross-entropy at the end. REINFORCE on the
returns ``R_i = r_i + gamma R_{i+1}`` minus a baseline: the self-critical one (the return of the
greedy route on the same image), the mean return of the batch at each gate, or none (the
reference code); an optional entropy bonus; plus, when the backbone is fine-tuned, the
cross-entropy of the routed prediction (the "supervised term").

BatchNorm: the backbone stays in eval mode in both stages, so its running statistics are the base
network's and sampled routes cannot shift them (the reference code's known accuracy drop); when
fine-tuning, the convolutions and BatchNorm affine parameters still train.

On several ranks (``torchrun``), ``DistributedDataParallel`` averages the ranks' gradients. SP splits
each global batch over the ranks, as the base trainer does. In HRL every rank plays ``num_envs``
episodes of its own per iteration (its images and routes drawn from its own streams,
``Ranks.seed``), so an iteration learns from ``world x num_envs`` episodes: the update is the mean
of the ranks' own REINFORCE gradients. A fine-tuned backbone's blocks that no route on a rank ran
get no gradient there: DDP looks for such parameters (``find_unused_parameters``) in that case.
"""

from __future__ import annotations

import logging
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Unpack

from agents.compute_price import BUDGET_STEP_HRL, ComputePrice, SpendingMeter
from agents.gates import GatePolicy
from agents.trainer import RunValues, Trainer
from backbones.base import Backbone, skip
from backbones.batching import batches, global_batch_sizes
from backbones.data import Dataset
from backbones.options import (
    COUNT,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    UNIT,
    Rule,
    build,
    check_options,
    nested,
    option,
)
from backbones.progress import progress_bar
from skipnet_env.core import SKIPNET_REWARD, BatchedRouting
from skipnet_env.engine import freeze
from skipnet_env.vector_env import SkipNetVectorEnv

log = logging.getLogger(__name__)


EXPLORE = Rule(lambda v: isinstance(v, (int, float)) and 0 < v < 0.5, "a probability in (0, 0.5)")
Baseline = Literal["self_critical", "batch_mean", "none"]
BASELINES: tuple[str, ...] = typing.get_args(Baseline)
SP_EPOCHS = 10
"""SP epochs on a frozen backbone, where no other default applies"""
HRL_ITERATIONS = 500
"""HRL iterations on the base recipe"""


@dataclass
class SPConfig:
    """hybrid_rnn, hybrid_ff, hybrid_ff2: supervised pre-training (SP) of the gates on the frozen backbone."""

    flag_prefix: ClassVar[str] = "sp_"

    epochs: int | None = option(None, COUNT)
    """SP epochs on the frozen backbone (default: 10, except hybrid_rnn on a skip-ready backbone: 0, its gates as
    joint SP trained them for --joint-budget or --budget, or 3 when --alpha asks for another compute)"""
    batch: int = option(128, POSITIVE_INT)
    """images per SP step, on every device (SP's learning rate and steps are tuned for it; --num-envs sizes the
    environment's batch)"""
    lr: float = option(3e-3, POSITIVE, resumable=True)
    """Adam learning rate of the gates in supervised pre-training"""
    alpha: float | None = option(None, NON_NEGATIVE)
    """weight of compute in SP's loss (default: --alpha; 0 is the paper's SP, cross-entropy alone)"""
    sample: bool = True
    """SP gates are samples (logistic noise before the threshold, straight-through), not thresholds"""
    alpha_warmup: int = option(3, COUNT)
    """SP epochs over which the compute weight ramps up linearly from 0 (0: full weight at once)"""

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class HRLConfig:
    """hybrid_rnn, hybrid_ff, hybrid_ff2: hybrid RL of the gates (REINFORCE in the environment, after SP)."""

    flag_prefix: ClassVar[str] = "hrl_"

    iterations: int | None = option(None, COUNT)
    """REINFORCE iterations, one batch of num_envs episodes each (default: 500 on the base recipe; 0 on a skip-ready
    backbone, where the recipe's own HRL trained the gates and the network: --recipe-hrl-iterations)"""
    lr: float = option(1e-4, POSITIVE, resumable=True)
    """Adam learning rate of the gates in hybrid RL"""
    explore: float | None = option(None, EXPLORE)
    """HRL samples each decision from sigmoid(s x logit), the scale s set once at HRL's start so that a sampled
    decision differs from the greedy one (p >= 0.5) with this probability, on average over the first batch's greedy
    routes. Gates trained with hard thresholds (joint SP's) have logits near 0: sampled as they are, their routes are
    close to coin flips. Default: s = 1, the gates' own probabilities"""
    gamma: float = option(1.0, UNIT, was=("gamma",))
    """discount of the per-gate returns"""
    baseline: Baseline = option("self_critical", was=("baseline",))
    """REINFORCE baseline: self_critical (the greedy route's return on the same image), batch_mean, none"""
    rl_weight: float = option(0.01, NON_NEGATIVE, was=("rl_weight",))
    """weight of the REINFORCE term beside the cross-entropy (paper: 0.01)"""
    finetune_backbone: bool | None = option(None, was=("finetune_backbone",))
    """HRL trains the backbone too, by cross-entropy through the executed blocks (what the recipe's HRL does;
    BatchNorm statistics stay frozen; the fine-tuned backbone travels in the agent's checkpoint)"""
    ce_route: Literal["sampled", "greedy"] = option("sampled", was=("ce_route",))
    """with --hrl-finetune-backbone: the route HRL's cross-entropy trains the backbone through: sampled (the paper's:
    the routes REINFORCE samples) or greedy (the routes the evaluation takes: p >= 0.5)"""
    finetune_lr: float = option(1e-4, POSITIVE, resumable=True, was=("finetune_lr", "backbone_lr"))
    """with --hrl-finetune-backbone: learning rate of the backbone (the base network's trainer has its own)"""
    log_every: int = option(50, POSITIVE_INT, resumable=True, was=("log_every",))
    """log (and sync with the device) every this many HRL iterations; with a budget, the reward's price of compute
    moves as often (50: what the recipe's HRL was measured with, BENCHMARKS.md section 12)"""

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class HybridConfig:
    """SkipNet's hybrid trainer (hybrid_rnn, hybrid_ff, hybrid_ff2): supervised pre-training (SP), then hybrid RL.

    The run's compute price (``alpha``, ``budget``), seed, precision and batch are not here: they are
    the run's, given to :class:`HybridTrainer` as they are. ``HybridConfig.flat(sp_epochs=2, hrl_lr=1e-3)``
    makes one from the flags' names."""

    sp: SPConfig = nested(SPConfig)
    hrl: HRLConfig = nested(HRLConfig)

    @classmethod
    def flat(cls, **values: Any) -> HybridConfig:
        """The configuration with options ``values`` by their flat names (``sp_epochs``, ``hrl_gamma``)."""
        return build(cls, values)

    def finetunes(self) -> bool:
        """Whether the backbone trains (``hrl.finetune_backbone``, off where unset)."""
        return bool(self.hrl.finetune_backbone)

    def stages(self) -> tuple[int, int]:
        """``(sp epochs, hrl iterations)``, the defaults where unset."""
        return (
            SP_EPOCHS if self.sp.epochs is None else self.sp.epochs,
            HRL_ITERATIONS if self.hrl.iterations is None else self.hrl.iterations,
        )


def explore_scale(logits: Tensor, explore: float, mean: Callable[[Tensor], Tensor] = torch.mean) -> float:
    """The scale ``s`` at which a decision sampled from ``sigmoid(s x logit)`` leaves the greedy one
    (``logit >= 0``) with probability ``explore``, on average over ``logits`` (``mean``: the mean
    to take, e.g. over every rank's); found by bisection on ``log s``; 1 where every logit is 0."""
    magnitudes = logits.detach().abs().flatten()
    if not bool(mean(magnitudes) > 0):
        return 1.0
    lo, hi = -12.0, 12.0  # log s
    for _ in range(40):
        mid = (lo + hi) / 2
        off_greedy = float(mean(torch.sigmoid(-math.exp(mid) * magnitudes)))
        lo, hi = (mid, hi) if off_greedy > explore else (lo, mid)
    return math.exp((lo + hi) / 2)


def straight_through(p: Tensor) -> Tensor:
    """Forward ``1[p >= 0.5]``, backward the identity to ``p``."""
    hard = (p >= 0.5).to(p.dtype)
    return (hard - p).detach() + p


def sp_forward(
    backbone: Backbone, gates: GatePolicy, x: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Routed logits ``(B, classes)`` with straight-through hard gates, the gates ``(B, N)``: 1.0
    where the block ran, with the straight-through gradient to ``p(execute)``, and the greedy
    decisions ``(B, N)`` bool (``p >= 0.5``: what the gates would decide at evaluation).

    With a ``generator``, each gate is a sample: logistic noise is added to its logit before the
    threshold (a hard Bernoulli(p) draw, the straight-through Gumbel-sigmoid of ConvNet-AIG), so
    the gates explore and the loss is the expected one over routes; without, ``1[p >= 0.5]``.
    """
    h = backbone.enter(x, gates.first_gated)
    state = gates.initial_state(x.shape[0], x.device)
    executed, greedy = [], []
    for k, block in enumerate(backbone.blocks[gates.first_gated :]):
        logit, state = gates(h, k, state)
        greedy.append(logit.detach() >= 0.0)
        if generator is not None:
            u = torch.rand(logit.shape, device=logit.device, generator=generator).clamp(1e-6, 1 - 1e-6)
            logit = logit + torch.log(u) - torch.log1p(-u)  # + Logistic(0, 1)
        g = straight_through(torch.sigmoid(logit))  # (B,)
        m = g.to(h.dtype)[:, None, None, None]  # in the backbone's precision (bf16 on the CUDA engine)
        h = m * block(h) + (1.0 - m) * skip(block, h)
        executed.append(g)
    return backbone.head(h).float(), torch.stack(executed, dim=1), torch.stack(greedy, dim=1)


class Episodes(nn.Module):
    """HRL's forward as one module: ``play(env)`` (the sampled episodes, and the greedy replay the
    loss needs) over the parameters it trains, ``gates`` and, when fine-tuned, ``backbone``. What
    ``DistributedDataParallel`` wraps: its forward is called once per iteration, so every gradient
    of the iteration's loss goes through one reduction."""

    def __init__(self, gates: GatePolicy, backbone: Backbone | None, play: Any) -> None:
        super().__init__()
        self.gates, self.backbone, self.play = gates, backbone, play

    def forward(self, env: SkipNetVectorEnv) -> dict[str, Tensor]:
        return self.play(env)


class SPNetwork(nn.Module):
    """A backbone and its gates as one module whose forward is :func:`sp_forward`: what SP trains
    and what ``DistributedDataParallel`` wraps to train it on several ranks."""

    def __init__(self, backbone: Any, gates: GatePolicy) -> None:
        super().__init__()
        self.backbone, self.gates = backbone, gates

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        return sp_forward(self.backbone, self.gates, x, generator)


class Distillation(NamedTuple):
    """Knowledge distillation in SP's loss: ``(1 - weight) x cross-entropy + weight x T^2 x
    KL(teacher's softened labels || the routed network's)`` at temperature ``T`` (Hinton et al. 2015)."""

    teacher: Backbone
    """the network whose soft labels the routed one learns (joint SP: the base network, frozen, every block run)"""
    weight: float
    temperature: float

    def loss(self, x: Tensor, logits: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            soft = F.log_softmax(self.teacher(self.teacher.prepare(x)).float() / self.temperature, dim=1)
        mine = F.log_softmax(logits / self.temperature, dim=1)
        kl = F.kl_div(mine, soft, reduction="batchmean", log_target=True) * self.temperature**2
        return (1.0 - self.weight) * F.cross_entropy(logits, y) + self.weight * kl


def sp_loss(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    noise: torch.Generator | None,
    meter: SpendingMeter,
    price: ComputePrice,
    ramp: float,
    distill: Distillation | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """SP's loss on one batch of :class:`SPNetwork` ``net`` (or its DDP wrapper), for the hybrid
    trainer's SP and joint SP alike: cross-entropy through hard gates (or, with ``distill``, mixed
    with a teacher's soft labels) plus the compute the executed blocks add, priced by ``price``
    (scaled by ``ramp``) from what the greedy gates spend; the straight-through gradient reaches the
    gates through both. Returns ``(loss, executed (B, N), spending (B,))``; the caller moves a
    budget's price by the step's spending (``price.update``), once a step."""
    logits, executed, greedy = net(x, noise)
    spending = meter.spent(greedy)  # (B,) what the gates would spend at evaluation
    cost = price.loss(executed @ meter.cost, spending, ramp)
    fit = F.cross_entropy(logits, y) if distill is None else distill.loss(x, logits, y)
    return fit + cost, executed, spending


def discounted_returns(rewards: Tensor, gamma: float) -> Tensor:
    """``R_i = r_i + gamma * R_{i+1}`` over the step axis of ``rewards`` ``(N, B)``."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for i in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[i] + gamma * running
        returns[i] = running
    return returns


def reinforce_loss(log_probs: Tensor, advantages: Tensor) -> Tensor:
    """``-mean_b sum_i log pi(a_i) * A_i``; ``log_probs`` and ``advantages`` are ``(N, B)``."""
    return -(log_probs * advantages.detach()).sum(dim=0).mean()


def advantages(returns: Tensor, baseline: str, greedy_returns: Tensor | None = None) -> Tensor:
    """``R_i - b_i`` ``(N, B)`` for the REINFORCE baselines:

    * ``self_critical``: the return-to-go of the greedy route on the *same image* (Rennie et al.
      2017, as BlockDrop uses it). It removes how hard the image is from the advantage, which
      otherwise swamps the per-image effect of a decision.
    * ``batch_mean``: the mean return of the batch at each gate.
    * ``none``: the reference code's plain REINFORCE.
    """
    if baseline == "self_critical":
        assert greedy_returns is not None
        return returns - greedy_returns
    if baseline == "batch_mean":
        return returns - returns.mean(dim=1, keepdim=True)
    return returns


class HybridTrainer(Trainer):
    """Trains ``gates`` on ``backbone`` with SP then HRL; checkpoints atomically and resumes
    (:class:`agents.trainer.Trainer`: the checkpoint, the divergence guard, the logged means).

    Args:
        backbone: the (frozen unless ``cfg.hrl.finetune_backbone``) residual network.
        gates: the gate policy to train.
        train_data: images the gates learn from.
        cfg: stage lengths, learning rates, reward.
        device: where everything runs.
        checkpoint: path of the agent checkpoint (written after each SP epoch and every
            ``checkpoint_every`` HRL iterations).
        metadata: written into every checkpoint (agent, backbone identity, ...).
        writer: a TensorBoard ``SummaryWriter`` (or ``None``).
        budget: a FLOPs fraction to meet: the compute weight becomes a multiplier, starting at ``alpha``
            (which otherwise prices compute, in HRL's reward and, unless ``cfg.sp.alpha``, in SP's loss).
        **run: the run's values (:class:`agents.trainer.RunValues`: ``num_envs``, ``alpha``, ``seed``, ...).
    """

    def __init__(
        self,
        backbone: Backbone,
        gates: GatePolicy,
        train_data: Dataset,
        cfg: HybridConfig,
        device: torch.device,
        checkpoint: Path,
        metadata: dict[str, Any],
        writer: Any = None,
        progress: bool = True,
        budget: float | None = None,
        **run: Unpack[RunValues],
    ) -> None:
        super().__init__(cfg, device, checkpoint, metadata, writer, progress, **run)
        self.backbone, self.gates, self.data = backbone.to(device).eval(), gates.to(device), train_data
        self.sp_epochs, self.hrl_iterations = cfg.stages()
        self.budget = budget
        self.finetune = cfg.finetunes()
        self.backbone.requires_grad_(self.finetune)
        self.sp_opt = torch.optim.Adam(self._param_groups(), lr=cfg.sp.lr)
        self.hrl_opt = torch.optim.Adam(self._param_groups(), lr=cfg.hrl.lr)
        here = self.ranks
        here.check_same("the training images' fingerprint", train_data.fingerprint)
        self.generator = torch.Generator().manual_seed(self.seed)  # SP's data order (every rank the same)
        # HRL's action sampling draws from its own generator (each rank's own), saved and restored with the run
        self.action_generator = torch.Generator(device=device).manual_seed(here.seed(self.seed + 1))
        self.stage = "sp"  # done_units: epochs in SP, iterations in HRL
        # SP's compute weight: sp_alpha, or with a budget the multiplier that meets it (HRL then prices
        # compute at the multiplier SP ended with)
        self.price = ComputePrice(self.sp_alpha, budget, device, ranks=here)
        self.env: SkipNetVectorEnv | None = None
        self.resume_sampler: dict[str, Any] | None = None
        self.resume_alpha: float | None = None  # the reward's price of compute where the run stopped
        self.sample_scale: float | None = None  # HRL's scale of the logits it samples from (hrl_explore), once set

    @property
    def hrl_alpha(self) -> float:
        """Weight of compute in HRL: ``alpha``, or with a budget the multiplier SP reached (below 0
        where the gates spend less than the budget: compute is rewarded, up to it)."""
        return self.alpha if self.budget is None else float(self.price.value)

    @property
    def sp_alpha(self) -> float:
        """Weight of compute in SP: ``cfg.sp.alpha``, or HRL's ``alpha`` when unset."""
        return self.alpha if self.cfg.sp.alpha is None else self.cfg.sp.alpha

    def _param_groups(self) -> list[dict[str, Any]]:
        """Fresh parameter groups for one optimizer (an optimizer writes its defaults into the
        group dicts it is given, so two optimizers must never share them)."""
        groups: list[dict[str, Any]] = [{"params": list(self.gates.parameters())}]
        if self.finetune:
            groups.append({"params": list(self.backbone.parameters()), "lr": self.cfg.hrl.finetune_lr})
        return groups

    # -- checkpoints (Trainer) -------------------------------------------------------------
    def trained_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        params = list(self.gates.named_parameters())
        if self.finetune:
            params += [(f"backbone.{n}", p) for n, p in self.backbone.named_parameters()]
        return params

    def training_state(self) -> dict[str, Any]:
        state = {
            "gates": self.gates.state_dict(),
            "sp_opt": self.sp_opt.state_dict(),
            "hrl_opt": self.hrl_opt.state_dict(),
            "generator": self.generator.get_state(),
            "price": self.price.state_dict(),
            **self.rank_state(),
        }
        if self.env is not None:  # the reward's price, for an exact resume
            state["reward_alpha"] = self.env.alpha
        if self.sample_scale is not None:
            state["sample_scale"] = self.sample_scale
        if self.finetune:
            state["backbone"] = self.backbone.state_dict()
        return state

    def rank_state(self) -> dict[str, Any]:
        """This rank's sampled routes' stream and where its environment's batches stand."""
        state: dict[str, Any] = {"action_generator": self.action_generator.get_state()}
        if self.env is not None:
            state["sampler"] = self.env.sampler.state_before_last_draw()
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Weights, optimizers, random generators and the environment's place in the data, so the
        run ends where an uninterrupted one would. The learning rates are this run's (``cfg``), not
        the checkpoint's: a diverged run can go on more gently."""
        self.gates.load_state_dict(state["gates"])
        for name, opt, lr in (("sp_opt", self.sp_opt, self.cfg.sp.lr), ("hrl_opt", self.hrl_opt, self.cfg.hrl.lr)):
            opt.load_state_dict(state[name])
            for group, group_lr in zip(opt.param_groups, (lr, self.cfg.hrl.finetune_lr)):
                group["lr"] = group["initial_lr"] = group_lr
        self.generator.set_state(state["generator"])
        self.action_generator.set_state(state["action_generator"].cpu())
        self.resume_sampler = state.get("sampler")
        self.resume_alpha = state.get("reward_alpha")
        self.sample_scale = state.get("sample_scale")
        if "price" in state:
            self.price.load_state_dict(state["price"])
        if "backbone" in state:
            self.backbone.load_state_dict(state["backbone"])

    # -- stage 1 ----------------------------------------------------------------------------
    def train_sp(self) -> None:
        cfg, here = self.cfg, self.ranks
        steps = math.ceil(len(self.data) / cfg.sp.batch)
        bar = progress_bar(
            self.sp_epochs * steps,
            "SP (straight-through)",
            self.progress,
            initial=self.done_units * steps,
        )
        # the compute cost of executing gated block k rather than skipping it, a share of the full network
        meter = SpendingMeter(self.backbone, self.gates, self.device)
        # a frozen backbone runs on the execution engine (BN folded; bf16, channels_last on CUDA):
        # the gradient reaches the gates through its activations, not its weights
        routed = self.backbone if self.finetune else freeze(self.backbone, precision=self.precision)
        sp_net = here.wrap(SPNetwork(routed, self.gates), self.device)
        for epoch in range(self.done_units, self.sp_epochs):
            ramp = self.price.warmup(epoch, cfg.sp.alpha_warmup)
            losses, spent = [], []
            sizes = global_batch_sizes(self.data, cfg.sp.batch, here)
            stream = batches(self.data, cfg.sp.batch, self.device, train=True, generator=self.generator, ranks=here)
            for (x, y), total in zip(stream, sizes, strict=True):
                noise = self.action_generator if cfg.sp.sample else None
                self.sp_opt.zero_grad(set_to_none=True)
                loss, [(executed, spending)] = here.backward(
                    sp_net, x, y, total, partial(sp_loss, sp_net, noise=noise, meter=meter, price=self.price, ramp=ramp)
                )
                self.price.update(spending)  # the loss above holds the price it was computed with
                self.sp_opt.step()
                spent.append(spending.mean())
                losses.append(loss)
                bar.update(1)
            self.check_losses(losses, "SP")  # once an epoch: no host sync per step
            self.done_units = epoch + 1
            flops, price = float(torch.stack(spent).mean()), float(self.price.value)
            log.info(
                "SP epoch %d/%d: loss %.4f, greedy gates spend %.1f%% of the FLOPs, compute weight %.3f",
                self.done_units,
                self.sp_epochs,
                float(torch.stack(losses).mean()),
                100 * flops,
                price,
            )
            if self.writer and here.main:
                self.writer.add_scalar("losses/sp_cross_entropy", loss.item(), epoch)
                self.writer.add_scalar("charts/sp_execute_rate", executed.mean().item(), epoch)
                self.writer.add_scalar("charts/sp_flops_fraction", flops, epoch)
                self.writer.add_scalar("charts/compute_weight", price, epoch)
            self.save()
        bar.close()
        self.stage, self.done_units = "hrl", 0
        self.save()

    # -- stage 2 ----------------------------------------------------------------------------
    def make_env(self) -> SkipNetVectorEnv:
        env = SkipNetVectorEnv(
            self.num_envs,
            self.backbone,
            self.data,
            alpha=max(self.hrl_alpha, 0.0),  # the option is a user's weight (>= 0); a budget's price is set below
            **SKIPNET_REWARD,
            device=self.device,
            precision=self.precision,
            return_tensors=True,
            differentiable=self.finetune,
            gate_first_block=self.gates.first_gated == 0,
        )
        env.alpha = self.hrl_alpha
        return env

    def rollout(self, env: SkipNetVectorEnv) -> dict[str, Tensor]:
        """One batch of episodes with sampled decisions.

        Returns ``log_prob``, ``entropy``, ``reward`` ``(N, B)``; ``start`` (the activation the
        episodes began from) and the final info's ``label``, ``logits``, ``correct``,
        ``flops_fraction``.
        """
        state = self.gates.initial_state(env.num_envs, self.device)
        start = env.activation.clone()  # the next step may write the activation in place
        log_probs, entropies, rewards = [], [], []
        info: dict[str, Any] = {}
        scale = 1.0 if self.sample_scale is None else self.sample_scale
        for k in range(env.num_gates):
            logit, state = self.gates(env.activation, k, state)
            logit = logit * scale  # the policy REINFORCE samples and trains (its greedy decisions: the gates')
            # no argument validation: non-finite logits flow into the loss, where they stop the run cleanly
            dist = torch.distributions.Bernoulli(logits=logit, validate_args=False)
            u = torch.rand(logit.shape, device=logit.device, generator=self.action_generator)
            action = u < torch.sigmoid(logit.detach())  # (B,) bool
            log_probs.append(dist.log_prob(action.to(logit.dtype)))
            entropies.append(dist.entropy())
            _, reward, _, _, info = env.step(action)
            rewards.append(reward)
        final = info["final_info"]
        return {
            "log_prob": torch.stack(log_probs),
            "entropy": torch.stack(entropies),
            "reward": torch.stack(rewards),
            "start": start,
            **{key: final[key] for key in ("label", "logits", "correct", "flops_fraction")},
        }

    def play(self, env: SkipNetVectorEnv) -> dict[str, Tensor]:
        """One iteration's episodes (:meth:`rollout`) and, where the loss needs it, the greedy route
        replayed on the same images (:meth:`greedy_route`): ``greedy_returns``, ``greedy_logits``."""
        ep = self.rollout(env)
        greedy_ce = self.finetune and self.cfg.hrl.ce_route == "greedy"
        if self.cfg.hrl.baseline == "self_critical" or greedy_ce:
            ep["greedy_returns"], ep["greedy_logits"] = self.greedy_route(ep["start"], ep["label"], grad=greedy_ce)
        return ep

    def greedy_route(self, start: Tensor, labels: Tensor, grad: bool = False) -> tuple[Tensor, Tensor]:
        """Returns-to-go ``(N, B)`` of the greedy route (execute where p >= 0.5) replayed on the
        same images, from the activation ``start`` they began at (the self-critical baseline), and
        its logits ``(B, classes)``: with ``grad``, differentiable in the backbone's weights (the
        cross-entropy of ``--hrl-ce-route greedy``)."""
        returns, logits, _ = self.replay_greedy(start, labels, grad)
        return returns, logits

    def replay_greedy(self, start: Tensor, labels: Tensor, grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`greedy_route`'s returns-to-go and logits, and the gates' logits ``(N, B)`` on the way."""
        core = self.replay
        with torch.set_grad_enabled(grad):
            core.begin(start if grad else start.detach(), labels)
            state = self.gates.initial_state(start.shape[0], self.device)
            rewards, gate_logits = [], []
            for k in range(core.num_gates):
                logit, state = self.gates(core.activation, k, state)
                _, reward, _ = core.advance(logit.detach() >= 0.0)
                rewards.append(reward.detach())
                gate_logits.append(logit.detach())
        assert core.logits is not None
        return discounted_returns(torch.stack(rewards), self.cfg.hrl.gamma), core.logits, torch.stack(gate_logits)

    def set_sample_scale(self, start: Tensor, labels: Tensor) -> None:
        """Set HRL's sampling scale from the gates' logits on the greedy routes of the first batch
        (activation ``start``, ``labels``) for ``hrl_explore``: the mean of ``sigmoid(-s |logit|)``,
        the chance that a sampled decision is not the greedy one, over every rank's routes, is
        ``hrl_explore`` (bisection on ``log s``; s = 1 where every logit is 0). Once per run: a
        resumed run keeps its scale."""
        target = self.cfg.hrl.explore
        if target is None or self.sample_scale is not None:
            return
        _, _, logits = self.replay_greedy(start, labels)
        self.sample_scale = explore_scale(logits, target, self.ranks.mean)
        log.info("HRL samples from sigmoid(%.3g x logit): a decision off the greedy route %.1f%% of the time",
                 self.sample_scale, 100 * target)  # fmt: skip

    def set_alpha(self, alpha: float) -> None:
        """Price compute at ``alpha`` in the environment's reward and the greedy replay's (a budget's
        price, as it moves)."""
        assert self.env is not None
        self.env.alpha = alpha
        self.replay.reward = self.env.reward

    def train_hrl(self) -> None:
        cfg, here = self.cfg, self.ranks
        if self.done_units >= self.hrl_iterations:  # nothing to do (--hrl-iterations 0): no environment to build
            self.stage = "done"
            self.save()
            return
        # DDP first: its start broadcasts rank 0's weights in place, which must come before the
        # environment's first activation is computed from them (with a graph, when fine-tuned)
        episodes = Episodes(self.gates, self.backbone if self.finetune else None, self.play)
        play = here.wrap(episodes, self.device, find_unused=self.finetune)
        env = self.env = self.make_env()
        if self.resume_sampler is not None:  # replay the batch the interrupted run was about to play
            env.sampler.restore(self.resume_sampler)
            _, info = env.reset()
        else:
            _, info = env.reset(seed=here.seed(self.seed))  # each rank its own images
        # a fine-tuned backbone changes every iteration: the replay runs on it (under no_grad), not on a frozen copy
        self.replay = BatchedRouting(
            self.backbone, env.reward, self.gates.first_gated == 0, self.finetune, self.precision
        )
        if self.resume_alpha is not None:  # a budget's price as it stood (it moves every log_every iterations)
            self.set_alpha(self.resume_alpha)
        self.set_sample_scale(env.activation.clone(), info["label"])
        gate_share = sum(self.gates.flops) / self.backbone.flops.full  # the gates' own FLOPs, a share of the network
        # linear decay to 0 over the stage: REINFORCE's noisy steps settle instead of wandering at the end
        start = self.done_units
        schedule = torch.optim.lr_scheduler.LambdaLR(
            self.hrl_opt, lambda it: 1.0 - (start + it) / max(self.hrl_iterations, 1)
        )
        bar = progress_bar(self.hrl_iterations, "HRL (REINFORCE)", self.progress, initial=self.done_units)
        if here.distributed:
            log.info("HRL on %d ranks: %d episodes per iteration", here.world, here.world * env.num_envs)
        last: dict[str, float] = {}
        for it in range(self.done_units, self.hrl_iterations):
            if self.finetune and it > 0:
                # the autoreset computed the next batch's first activation with the weights of before the
                # last update; start it again so the graph holds the current weights
                env.reset()
            ep = play(env)
            returns = discounted_returns(ep["reward"], cfg.hrl.gamma)
            greedy_ce = self.finetune and cfg.hrl.ce_route == "greedy"
            greedy, greedy_logits = ep.get("greedy_returns"), ep.get("greedy_logits")
            # what the gates spend: the greedy route's where it was replayed (the evaluation's decisions)
            spent = gate_share + (
                self.replay.spent_flops / self.replay.full_flops if greedy is not None else ep["flops_fraction"]
            )
            self.price.update(spent, BUDGET_STEP_HRL)
            rl = reinforce_loss(ep["log_prob"], advantages(returns, cfg.hrl.baseline, greedy))
            entropy = ep["entropy"].mean()
            loss = cfg.hrl.rl_weight * (rl - self.entropy_coef * entropy)
            if self.finetune:  # the supervised term: trains the backbone through executed blocks
                routed = greedy_logits if greedy_ce else ep["logits"]
                assert routed is not None
                loss = loss + F.cross_entropy(routed, ep["label"])
            self.hrl_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.hrl_opt.step()
            schedule.step()
            self.done_units = it + 1
            bar.update(1)
            self.record(
                {
                    "losses/total": loss,
                    "losses/reinforce": rl,
                    "losses/entropy": entropy,
                    "charts/episodic_return": returns[0].mean(),
                    "charts/train_accuracy": ep["correct"].float().mean(),
                    "charts/flops_fraction": ep["flops_fraction"].mean(),
                    "charts/greedy_flops_fraction": spent.float().mean(),
                }
            )
            if self.done_units % cfg.hrl.log_every == 0 or self.done_units == self.hrl_iterations:
                # means over log_every iterations: one host sync per log_every, not per iteration
                means = self.flush(self.done_units, "losses/total", "HRL")
                if self.budget is not None:  # the reward prices compute at the budget's price (one sync per log)
                    # the price's weight takes the mean over the ranks (on the device: NCCL reduces no host tensor)
                    spent_mean = torch.tensor([means["charts/greedy_flops_fraction"]], device=self.device)
                    self.set_alpha(float(self.price.weight(spent_mean)))
                    self.write({"charts/compute_weight": env.alpha}, self.done_units)
                last = means
                bar.set_postfix(
                    acc=f"{means['charts/train_accuracy']:.3f}", flops=f"{means['charts/flops_fraction']:.3f}"
                )
            if self.done_units % self.checkpoint_every == 0:
                self.save()
        bar.close()
        if last:
            log.info(
                "HRL: %d iterations; the last %d: train accuracy %.4f, greedy gates spend %.1f%% of the FLOPs, "
                "alpha %.3f",
                self.hrl_iterations,
                min(cfg.hrl.log_every, self.hrl_iterations),
                last["charts/train_accuracy"],
                100 * last["charts/greedy_flops_fraction"],
                env.alpha,
            )
        self.stage = "done"
        self.save()

    def train(self) -> GatePolicy:
        if self.stage == "sp":
            self.train_sp()
        if self.stage == "hrl":
            self.train_hrl()
        self.ranks.share(self.gates)  # rank 0's, the ones written (the ranks' are equal: one averaged gradient)
        if self.finetune:
            self.ranks.share(self.backbone)
        self.gates.eval()
        return self.gates
