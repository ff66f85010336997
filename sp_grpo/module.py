"""``SelfPacedGRPO``: group-relative policy optimisation of a video generator, as a LightningModule.

One ``training_step`` is one GRPO iteration and reads top to bottom:
rollout -> rewards -> advantages -> K clipped policy updates -> logs. The update's maths lives in
:mod:`sp_grpo.functional.ppo`, FSDP sharding in :mod:`sp_grpo.fsdp`, the cross-rank gathers in
:mod:`sp_grpo.distributed`; this class holds the settings and the order of the steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from sp_grpo.distributed import all_gather_uneven, min_over_ranks, mix_seed, world_size
from sp_grpo.fsdp import clip_grad_norm, shard_policy
from sp_grpo.functional.advantages import AdvantageScale, AggregationMode, aggregate_advantages, clip_advantages
from sp_grpo.functional.ppo import (
    accumulate_gradients,
    check_minibatches,
    check_update_settings,
    pair_loss,
    ppo_update,
    rollout_graph_update,
)
from sp_grpo.functional.sde import check_sigma_schedule
from sp_grpo.micro_batch import MicroBatchSizer, check_micro_batch_settings
from sp_grpo.policies import VideoPolicy
from sp_grpo.rewards.mixture import RewardOutput, RewardSet
from sp_grpo.rollout import DenoisingConfig, Rollout, ValDenoisingConfig, sample_ode, sample_rollout

#: Where a checkpoint keeps :attr:`SelfPacedGRPO.iteration`.
ITERATION_KEY = "sp_grpo_iteration"


class SelfPacedGRPO(L.LightningModule):
    """Self-Paced GRPO for a text-to-video flow-matching generator.

    The reward is a weighted sum over aspects (``fidelity``, ``temporal``, ``semantic``) whose
    weights, :attr:`reward_weights`, a curriculum callback rewrites between batches
    (:class:`~sp_grpo.callbacks.SelfPacedCurriculum`, or :class:`~sp_grpo.callbacks.StaticWeights`
    as the fixed-weight baseline). ``training_step`` returns the per-aspect rewards so the callback
    can read them.

    Each batch is ``P`` unique prompts; every prompt is sampled ``group_size`` times. Optimizer
    steps per batch: ``num_inner_epochs * num_minibatches`` (Lightning's ``global_step`` counts them).

    Args:
        policy: The generator (a :class:`~sp_grpo.policies.VideoPolicy`, e.g. ``WanPolicy``).
        rewards: The reward models, evaluated together.
        group_size: Samples per prompt (``G``); advantages compare samples within a group.
        sampler: Rollout settings: steps, guidance, SDE kind and noise, video size, trained steps.
        num_inner_epochs: Passes of clipped updates over each rollout (``K``).
        num_minibatches: Optimizer steps per inner epoch; the rollout's samples are split evenly.
        micro_batch_size: (sample, step) pairs per forward/backward; gradients accumulate over a minibatch,
            so this changes memory and speed, not the result. ``"auto"``: the whole minibatch, or the largest
            part of it that fits ``micro_batch_memory_gib``, measured once (:mod:`sp_grpo.micro_batch`).
        micro_batch_memory_gib: The budget of ``micro_batch_size: auto``: on a CPU the activations saved for
            backward (``null``: 0.25 GiB); on a GPU the peak memory of a forward and backward pass (``null``: free).
        clip_range: PPO clip range of the probability ratio. Log-probs are per-element means, so
            ratios stay near 1 and small ranges (1e-4 to 1e-2) are usual.
        advantage_scale: Divide centred rewards by the std of their ``"group"``, of the whole
            ``"batch"``, or ``"none"``.
        aggregation: ``"normalize_then_sum"`` normalizes each aspect within groups, then weighs;
            ``"sum_then_normalize"`` weighs the raw rewards, then normalizes the sum.
        advantage_eps: Added to the std before dividing.
        advantage_clip: Clip advantages to ``[-advantage_clip, advantage_clip]``; ``null`` for no clip.
        kl_coef: Weight of the KL to the reference model (the network with LoRA disabled).
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_warmup_steps: Optimizer steps of linear learning-rate warm-up (0 for none).
        max_grad_norm: Clip the gradient norm before each optimizer step; ``null`` for no clip.
        reward_weights: Initial aspect weights; ``null`` weighs the aspects of ``rewards`` equally.
            A curriculum callback overwrites them.
        val_sampler: Sampler settings of the validation loop (its own steps and video size); ``null``
            uses ``sampler``. Validation samples with the ODE (no sampler noise) from fixed seeds.
        rollout_inference_mode: Sample rollouts under ``torch.inference_mode`` rather than ``no_grad``.
        reuse_rollout_forward: Backpropagate the update through the rollout's own forward passes
            instead of running the network again on every trained pair
            (:func:`~sp_grpo.functional.ppo.rollout_graph_update`): one forward pass per trained pair
            instead of two, the same gradient. Needs an on-policy update (``num_inner_epochs`` 1,
            ``num_minibatches`` 1); applies in one process without FSDP (elsewhere the update
            recomputes, with a warning), and keeps the activations of every trained step
            from sampling to the update (``micro_batch_size`` does not apply). Faster where the
            network is compute-bound (the shapes model: 0.75-0.91 of the time of recomputing); slower
            where each call costs the same whatever its size (the tiny random Wan: 1.09-1.25x, as its
            recomputed update is one pass), so it is off unless set (``benchmarks/hot_path.py``).
        seed: Seed of the rollout noise; iteration ``i`` on rank ``r`` uses a generator seeded from
            ``(seed, i, r)``, so a resumed run samples exactly what an uninterrupted one would.
    """

    def __init__(
        self,
        policy: nn.Module,
        rewards: RewardSet,
        *,
        group_size: int = 4,
        sampler: DenoisingConfig = DenoisingConfig(),  # noqa: B008 - frozen dataclass, safe to share
        num_inner_epochs: int = 1,
        num_minibatches: int = 1,
        micro_batch_size: int | Literal["auto"] = "auto",
        micro_batch_memory_gib: float | None = None,
        clip_range: float = 1e-3,
        advantage_scale: AdvantageScale = "group",
        aggregation: AggregationMode = "normalize_then_sum",
        advantage_eps: float = 1e-4,
        advantage_clip: float | None = 5.0,
        kl_coef: float = 0.0,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        lr_warmup_steps: int = 0,
        max_grad_norm: float | None = 1.0,
        reward_weights: dict[str, float] | None = None,
        val_sampler: ValDenoisingConfig | None = None,
        rollout_inference_mode: bool = True,
        reuse_rollout_forward: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(policy, VideoPolicy):
            raise TypeError(
                f"`model.policy` ({type(policy).__name__}) does not implement sp_grpo.policies.VideoPolicy: use"
                " e.g. sp_grpo.policies.WanPolicy or sp_grpo.policies.TinyWanPolicy."
            )
        aspects = list(rewards.aspects)
        check_update_settings(
            group_size=group_size, num_inner_epochs=num_inner_epochs, num_minibatches=num_minibatches,
            clip_range=clip_range, advantage_scale=advantage_scale, aggregation=aggregation,
            advantage_clip=advantage_clip, kl_coef=kl_coef, has_reference=policy.has_reference,
            learning_rate=learning_rate, lr_warmup_steps=lr_warmup_steps, max_grad_norm=max_grad_norm,
            reward_weights=reward_weights, aspects=aspects, trainable=bool(policy.trainable_parameters()),
        )
        check_micro_batch_settings(micro_batch_size, micro_batch_memory_gib)
        _check_reuse_rollout_forward(reuse_rollout_forward, num_inner_epochs, num_minibatches)
        self.policy, self.rewards, self.group_size, self.seed = policy, rewards, group_size, seed
        self.sampler, self.val_sampler = sampler, (val_sampler if val_sampler is not None else sampler)
        self.num_inner_epochs, self.num_minibatches = num_inner_epochs, num_minibatches
        self.micro_batch_size, self.micro_batch_sizer = micro_batch_size, MicroBatchSizer(micro_batch_memory_gib)
        self.clip_range, self.kl_coef, self.max_grad_norm = clip_range, kl_coef, max_grad_norm
        self.advantage_scale, self.aggregation = advantage_scale, aggregation
        self.advantage_eps, self.advantage_clip = advantage_eps, advantage_clip
        self.learning_rate, self.weight_decay, self.lr_warmup_steps = learning_rate, weight_decay, lr_warmup_steps
        self.rollout_inference_mode, self.reuse_rollout_forward = rollout_inference_mode, reuse_rollout_forward
        #: Aspect -> weight of its advantage, read at the start of every training step; curriculum
        #: callbacks write it between batches. Equal weights by default.
        self.reward_weights = dict(reward_weights if reward_weights is not None else dict.fromkeys(aspects, 1 / len(aspects)))
        #: Per-group weighting, or None: ``group_weighting(aspect_rewards, group_size)`` maps this rank's
        #: ``(P*G,)`` rewards per aspect to aspect -> ``(P,)`` weights that replace :attr:`reward_weights`
        #: for the batch. Set by :class:`~sp_grpo.callbacks.GroupRewardWeighting`.
        self.group_weighting: Callable[[dict[str, Tensor], int], dict[str, Tensor]] | None = None
        #: GRPO iterations done: training steps, not optimizer steps (a minibatch without trained
        #: pairs takes none). Iteration ``i`` samples with ``rollout_generator(i)``; kept in checkpoints.
        self.iteration = 0
        self.automatic_optimization = False
        # Samplers are stored as plain dicts so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["policy", "rewards", "sampler", "val_sampler"])
        self.hparams.update(sampler=dataclasses.asdict(self.sampler), val_sampler=dataclasses.asdict(self.val_sampler))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        warmup = self.lr_warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    @property
    def updates_per_iteration(self) -> int:
        """Optimizer steps per training batch when no minibatch is skipped."""
        return self.num_inner_epochs * self.num_minibatches

    def rollout_generator(self, iteration: int) -> torch.Generator:
        """The generator of iteration ``iteration`` on this rank: a pure function of (seed, iteration, rank)."""
        return torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, iteration, self.global_rank))

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and isinstance(getattr(datamodule, "batch_size", None), int):
            check_minibatches(datamodule.batch_size, self.group_size, self.num_minibatches)  # before any rollout
        if stage == "fit" and self.trainer.global_step == 0:
            self.iteration = 0  # a new fit starts over, as global_step does; a resumed one loads it afterwards
        if isinstance(self.trainer.strategy, FSDPStrategy):
            shard_policy(self, self.trainer.strategy)  # each large network its own FSDP root: sp_grpo.fsdp

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[ITERATION_KEY] = self.iteration

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint from before iterations were counted: the count of a run that skipped no minibatch.
        self.iteration = int(checkpoint.get(ITERATION_KEY, checkpoint["global_step"] // self.updates_per_iteration))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        prompts = _check_prompts(batch)
        check_minibatches(len(prompts), self.group_size, self.num_minibatches)
        seconds: dict[str, float] = {}
        # 1. Rollout: G samples per prompt with the stochastic sampler, keeping log-probs.
        with _timed(seconds, "rollout"):
            rollout = sample_rollout(
                self.policy, prompts, self.group_size, self.sampler, generator=self.rollout_generator(self.iteration),
                iteration=self.iteration, device=self.device, inference_mode=self.rollout_inference_mode,
                keep_graph=self.reuses_rollout_forward,
            )
        # 2. Rewards, one score per sample and reward, aggregated per aspect.
        with _timed(seconds, "reward"), torch.no_grad():
            scores = self.rewards(rollout.videos, rollout.prompts, group_size=self.group_size)
        # 3. Group-relative advantages, weighted over aspects by the curriculum's current weights (one
        #    number per aspect, or one per aspect and group); groups dropped by the rewards get zero.
        weights = self.aspect_weights(scores.per_aspect)
        advantages = self.compute_advantages(scores.per_aspect, weights)
        advantages = torch.where(scores.keep, advantages, torch.zeros_like(advantages))
        if world_size(self._strategy) == 1:  # several ranks must all run as many (collective) passes
            rollout.train_mask &= scores.keep.unsqueeze(1)
        # 4. K inner epochs of clipped policy-gradient updates over the trained (sample, step) pairs.
        with _timed(seconds, "update"):
            stats = self.policy_updates(rollout, advantages)
        self.iteration += 1
        # 5. Logs.
        logs = _training_logs(scores, weights, advantages, stats, seconds, self.group_size)
        self.log_dict(logs, batch_size=len(prompts))
        self.log("reward", logs["train/reward_weighted"], prog_bar=True, batch_size=len(prompts), logger=False)
        aspect_rewards = {aspect: value.detach() for aspect, value in scores.per_aspect.items()}
        return {"loss": stats["loss"], "advantages": advantages.detach(), "aspect_rewards": aspect_rewards,
                "group_size": self.group_size, "prompts": rollout.prompts}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Deterministic evaluation: ODE sampling from fixed noise, each reward's mean over ranks under ``val/``.

        ``val/reward_weighted`` weighs the aspects with the curriculum's current weights: the reward the
        generator is being trained on at this point; ``val/aspect/*`` are unweighted."""
        prompts = _check_prompts(batch)
        generator = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, batch_idx, 1 << 21))
        videos = sample_ode(self.policy, prompts, self.val_sampler, generator=generator, device=self.device)
        scores = self.rewards(videos, prompts)
        logs = {f"val/reward/{name}": value.mean() for name, value in scores.per_reward.items()}
        logs.update({f"val/aspect/{aspect}": value.mean() for aspect, value in scores.per_aspect.items()})
        logs["val/reward_weighted"] = sum(self.reward_weights.get(a, 0.0) * v.mean() for a, v in scores.per_aspect.items())
        self.log_dict(logs, batch_size=len(prompts), sync_dist=True)

    def aspect_weights(self, aspect_rewards: dict[str, Tensor]) -> dict[str, float | Tensor]:
        """Aspect -> weight for this batch: :attr:`reward_weights`, or under a :attr:`group_weighting` the
        ``(P,)`` weights of this rank's groups, from their own rewards (groups never span ranks)."""
        if self.group_weighting is not None:
            return dict(self.group_weighting(aspect_rewards, self.group_size))
        return {aspect: float(self.reward_weights.get(aspect, 0.0)) for aspect in aspect_rewards}

    def compute_advantages(self, aspect_rewards: dict[str, Tensor], weights: dict[str, float | Tensor]) -> Tensor:
        """Clipped group-relative advantages ``(N,)`` of this rank's samples, with statistics over all ranks.

        Every rank gathers all ranks' rewards (and ``(N / G,)`` per-group weights; ranks may hold different
        numbers of groups), computes the global batch's advantages and keeps its slice, as one process would.
        """
        gather = functools.partial(all_gather_uneven, self._strategy)
        parts = gather(torch.stack(list(aspect_rewards.values())))  # (K, N_r) per rank
        rewards = dict(zip(aspect_rewards, torch.cat(parts, dim=-1)))
        weights = {a: torch.cat(gather(w)) if isinstance(w, Tensor) else w for a, w in weights.items()}
        advantages = aggregate_advantages(
            rewards, weights, self.group_size, mode=self.aggregation, scale=self.advantage_scale, eps=self.advantage_eps
        )
        start = sum(part.shape[-1] for part in parts[: self.global_rank])
        return clip_advantages(advantages[start : start + parts[self.global_rank].shape[-1]], self.advantage_clip)

    @property
    def reuses_rollout_forward(self) -> bool:
        """Whether this iteration's update runs through the rollout's forward passes (``reuse_rollout_forward``)."""
        if not self.reuse_rollout_forward:
            return False
        if world_size(self._strategy) > 1 or isinstance(self._strategy, FSDPStrategy):
            rank_zero_warn(
                "`model.reuse_rollout_forward: true` applies in one process without FSDP only (there the update's"
                " gradients are synchronised or sharded per forward pass); this run recomputes the update's forward"
                " passes instead, which gives the same gradient. Set it to false to silence this."
            )
            return False
        return True

    def policy_updates(self, rollout: Rollout, advantages: Tensor) -> dict[str, Tensor]:
        """``num_inner_epochs`` passes of clipped updates over the rollout (:func:`.functional.ppo.ppo_update`),
        or, for a rollout that kept its graph, the on-policy update through it (:func:`.functional.ppo.rollout_graph_update`)."""
        check_sigma_schedule(rollout.sigmas)  # once, on its CPU copy; then moved to the device once
        if rollout.graph is not None:
            settings = dict(sampler=self.sampler, clip_range=self.clip_range, kl_coef=self.kl_coef)
            return rollout_graph_update(self.policy, rollout, advantages, self._optimizer_step, backward=self._backward, **settings)
        rollout = dataclasses.replace(rollout, sigmas=rollout.sigmas.to(self.device))
        # Seeded with the optimizer step that this iteration starts at when no minibatch is skipped.
        order = torch.Generator().manual_seed(mix_seed(self.seed, self.iteration * self.updates_per_iteration, 1 << 20))
        accumulate = functools.partial(self.accumulate_gradients, rollout, advantages)
        return ppo_update(
            rollout.train_mask, accumulate, self._optimizer_step,
            num_inner_epochs=self.num_inner_epochs, num_minibatches=self.num_minibatches, generator=order,
        )

    def accumulate_gradients(self, rollout: Rollout, advantages: Tensor, pairs: Tensor) -> dict[str, Tensor]:
        """Backpropagate the mean loss over ``pairs`` ``(M, 2)``, ``micro_batch_size`` pairs at a time."""
        loss = functools.partial(self.pair_loss, rollout, advantages)
        sizes = self.micro_batch_sizer.split(
            len(pairs), self.micro_batch_size, self.device, probe=lambda count: loss(pairs[:count]),
            pending_bytes=lambda: _unallocated_adamw_bytes(self),
            agree=functools.partial(min_over_ranks, self._strategy, device=self.device),
        )
        return accumulate_gradients(loss, pairs, sizes, self._backward)

    def pair_loss(self, rollout: Rollout, advantages: Tensor, pairs: Tensor) -> dict[str, Tensor]:
        """:func:`~sp_grpo.functional.ppo.pair_loss` with this module's policy and settings, on ``pairs`` ``(M, 2)``."""
        settings = dict(sampler=self.sampler, clip_range=self.clip_range, kl_coef=self.kl_coef)
        return pair_loss(self.policy, rollout, advantages, pairs, **settings)

    def _optimizer_step(self) -> None:
        optimizer = self.optimizers()
        clip_grad_norm(self, optimizer, self.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()

    @property
    def _backward(self) -> Callable[[Tensor], None]:
        """``manual_backward`` under a Trainer; ``Tensor.backward`` without one (notebook, test)."""
        return self.manual_backward if self._trainer is not None else Tensor.backward

    @property
    def _strategy(self) -> Strategy | None:
        return self._trainer.strategy if self._trainer is not None else None


def _unallocated_adamw_bytes(module: SelfPacedGRPO) -> int:
    """AdamW's two states per trainable weight, until its first step has allocated them."""
    if module._trainer is None or not module.optimizers(use_pl_optimizer=False).state:
        return 2 * sum(p.numel() * p.element_size() for p in module.policy.trainable_parameters())
    return 0


def _training_logs(
    scores: RewardOutput,
    weights: dict[str, float | Tensor],
    advantages: Tensor,
    stats: dict[str, Tensor],
    seconds: dict[str, float],
    group_size: int,
) -> dict[str, Tensor]:
    """The ``train/*`` metrics of one iteration: rewards, weighted reward, advantages, update statistics, timings."""
    logs = {f"train/reward/{name}": value.mean() for name, value in scores.per_reward.items()}
    logs.update({f"train/aspect/{aspect}": value.mean() for aspect, value in scores.per_aspect.items()})
    weighted = sum(_per_sample(weights[a], group_size) * scores.per_aspect[a].float() for a in weights)
    logs["train/reward_weighted"] = weighted.mean()
    logs.update({"train/advantage_abs_mean": advantages.abs().mean(), "train/advantage_max": advantages.max()})
    logs.update({f"train/{name}_seconds": torch.tensor(value) for name, value in seconds.items()})
    logs.update({f"train/{key}": value for key, value in stats.items()})
    return logs


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Store the wall-clock seconds of the block in ``seconds[name]``."""
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start


def _check_reuse_rollout_forward(setting: Any, num_inner_epochs: int, num_minibatches: int) -> None:
    if not isinstance(setting, bool):
        raise ValueError(f"`model.reuse_rollout_forward` ({setting!r}) must be true or false.")
    if setting is True and (num_inner_epochs != 1 or num_minibatches != 1):
        raise ValueError(
            f"`model.reuse_rollout_forward: true` needs an on-policy update (`model.num_inner_epochs` 1 and"
            f" `model.num_minibatches` 1, here {num_inner_epochs} and {num_minibatches}): later updates see changed"
            " weights, so their forward passes must run again. Set it to false."
        )


def _per_sample(weight: float | Tensor, group_size: int) -> float | Tensor:
    """A per-group weight ``(P,)`` repeated for each sample of its group; a float as it is."""
    return weight.float().repeat_interleave(group_size) if isinstance(weight, Tensor) else weight


def _check_prompts(batch: Any) -> list[str]:
    prompts = batch.get("prompts") if isinstance(batch, dict) else None
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(
            "A training batch must be a dict with `prompts`, a non-empty list of strings (what"
            f" sp_grpo.data.PromptDataModule yields); got {type(batch).__name__}."
        )
    return list(prompts)


__all__ = ["ITERATION_KEY", "SelfPacedGRPO"]
