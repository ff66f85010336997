"""``SelfPacedGRPO``: group-relative policy optimisation of a video generator, as a LightningModule.

One ``training_step`` is one GRPO iteration and reads top to bottom:
rollout -> rewards -> advantages -> K clipped policy updates -> logs.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from sp_grpo.functional.advantages import AdvantageScale, AggregationMode, aggregate_advantages, clip_advantages
from sp_grpo.functional.losses import clipped_surrogate, gaussian_kl
from sp_grpo.functional.sde import check_sigma_schedule, sde_step
from sp_grpo.micro_batch import MicroBatchSizer, check_micro_batch_settings
from sp_grpo.policies.base import VideoPolicy
from sp_grpo.rewards.mixture import RewardSet
from sp_grpo.rollout import Rollout, SamplerConfig, sample_ode, sample_rollout

# Two Lightning warnings that are expected here and would only confuse: the frozen VAE and text
# encoder are deliberately kept in eval mode, and with manual optimization a checkpoint holds the
# weights after the iteration's updates, which is what resuming needs.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")

_SCALES = ("group", "batch", "none")
_MODES = ("normalize_then_sum", "sum_then_normalize")


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
        micro_batch_size: (sample, step) pairs per forward/backward; gradients accumulate over a
            minibatch, so this changes memory and speed, not the result. ``"auto"``: the whole
            minibatch, or where it does not fit ``micro_batch_memory_gib`` the largest part that
            does, measured on the first update (:mod:`sp_grpo.micro_batch`). A number wins.
        micro_batch_memory_gib: The budget of ``micro_batch_size: auto``: on a CPU the activations one
            micro-batch saves for backward (``null``: 0.25 GiB, what ran fastest); on a GPU the peak
            memory of its forward and backward pass (``null``: what the GPU has free).
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
        seed: Seed of the rollout noise; iteration ``i`` on rank ``r`` uses a generator seeded from
            ``(seed, i, r)``, so a resumed run samples exactly what an uninterrupted one would.
    """

    def __init__(
        self,
        policy: nn.Module,
        rewards: RewardSet,
        *,
        group_size: int = 4,
        sampler: SamplerConfig = SamplerConfig(),  # noqa: B008 - frozen dataclass, safe to share
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
        val_sampler: SamplerConfig | None = None,
        rollout_inference_mode: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(policy, VideoPolicy):
            raise TypeError(
                f"`model.policy` ({type(policy).__name__}) does not implement sp_grpo.policies.VideoPolicy: use"
                " e.g. sp_grpo.policies.WanPolicy or sp_grpo.policies.TinyWanPolicy."
            )
        if group_size < 2:
            raise ValueError(
                f"`group_size` ({group_size}) must be at least 2: GRPO compares samples within a group; set"
                " `model.group_size` to 2 or more."
            )
        for name, value in (("num_inner_epochs", num_inner_epochs), ("num_minibatches", num_minibatches)):
            if value < 1:
                raise ValueError(f"`model.{name}` ({value}) must be at least 1.")
        check_micro_batch_settings(micro_batch_size, micro_batch_memory_gib)
        if clip_range <= 0:
            raise ValueError(f"`model.clip_range` ({clip_range}) must be positive, e.g. 1e-3.")
        if advantage_scale not in _SCALES:
            raise ValueError(f"`model.advantage_scale` ({advantage_scale!r}) must be one of {list(_SCALES)}.")
        if aggregation not in _MODES:
            raise ValueError(f"`model.aggregation` ({aggregation!r}) must be one of {list(_MODES)}.")
        if advantage_clip is not None and advantage_clip <= 0:
            raise ValueError(f"`model.advantage_clip` ({advantage_clip}) must be positive, or null for no clipping.")
        if kl_coef < 0:
            raise ValueError(f"`model.kl_coef` ({kl_coef}) must be non-negative.")
        if kl_coef > 0 and not policy.has_reference:
            raise ValueError(
                f"`model.kl_coef` ({kl_coef}) needs a reference model, and this policy has none (full fine-tuning"
                " without a copy): use LoRA, set the policy's `reference_copy: true`, or set `model.kl_coef: 0`."
            )
        if learning_rate <= 0:
            raise ValueError(f"`model.learning_rate` ({learning_rate}) must be positive.")
        if lr_warmup_steps < 0:
            raise ValueError(f"`model.lr_warmup_steps` ({lr_warmup_steps}) must be non-negative.")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"`model.max_grad_norm` ({max_grad_norm}) must be positive, or null for no clipping.")
        if not policy.trainable_parameters():
            raise ValueError("`model.policy` has no trainable parameters: set a `lora_rank`, or null for full fine-tuning.")

        self.policy = policy
        self.rewards = rewards
        self.group_size = group_size
        self.sampler = sampler
        self.val_sampler = val_sampler if val_sampler is not None else sampler
        self.num_inner_epochs = num_inner_epochs
        self.num_minibatches = num_minibatches
        self.micro_batch_size = micro_batch_size
        self.micro_batch_sizer = MicroBatchSizer(micro_batch_memory_gib)
        self.clip_range = clip_range
        self.advantage_scale = advantage_scale
        self.aggregation = aggregation
        self.advantage_eps = advantage_eps
        self.advantage_clip = advantage_clip
        self.kl_coef = kl_coef
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.lr_warmup_steps = lr_warmup_steps
        self.max_grad_norm = max_grad_norm
        self.rollout_inference_mode = rollout_inference_mode
        self.seed = seed
        aspects = list(rewards.aspects)
        if reward_weights is None:
            reward_weights = {aspect: 1.0 / len(aspects) for aspect in aspects}
        unknown = sorted(set(reward_weights) - set(aspects))
        if unknown:
            raise ValueError(
                f"`model.reward_weights` names aspects {unknown} that no reward in `model.rewards` has; the rewards"
                f" cover {aspects}."
            )
        #: Aspect -> weight of its advantage; read at the start of every training step. Curriculum
        #: callbacks write it between batches.
        self.reward_weights: dict[str, float] = dict(reward_weights)
        #: Per-group weighting, or None: called as ``group_weighting(aspect_rewards, group_size)``
        #: with this rank's ``(P*G,)`` rewards per aspect, it returns aspect -> ``(P,)`` weights
        #: that replace :attr:`reward_weights` for the batch. Set by
        #: :class:`~sp_grpo.callbacks.GroupRewardWeighting`.
        self.group_weighting: Callable[[dict[str, Tensor], int], dict[str, Tensor]] | None = None
        self.automatic_optimization = False
        # Samplers are stored as plain dicts so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["policy", "rewards", "sampler", "val_sampler"])
        self.hparams["sampler"] = dataclasses.asdict(self.sampler)
        self.hparams["val_sampler"] = dataclasses.asdict(self.val_sampler)

    # -- optimisation setup ---------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        warmup = self.lr_warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    @property
    def updates_per_iteration(self) -> int:
        """Optimizer steps per training batch."""
        return self.num_inner_epochs * self.num_minibatches

    def rollout_generator(self, iteration: int) -> torch.Generator:
        """The generator of iteration ``iteration`` on this rank: a pure function of (seed, iteration, rank)."""
        rank = self.global_rank if self._trainer is not None else 0
        generator = torch.Generator(device=self.device)
        generator.manual_seed(_mix_seed(self.seed, iteration, rank))
        return generator

    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            self._shard_for_fsdp(self.trainer.strategy)

    def _shard_for_fsdp(self, strategy) -> None:
        """Under ``FSDPStrategy``, shard the policy's large networks, each as its own FSDP root.

        Lightning would otherwise wrap this whole module in one FSDP root; ``training_step`` (which
        runs inside that root's forward) steps the optimizer after each backward pass, which FSDP
        does not allow. Here each network's forward and backward complete on their own: see
        :meth:`~sp_grpo.policies.common.DiffusersVideoPolicy.shard`. The strategy's
        ``auto_wrap_policy``, ``sharding_strategy``, precision and CPU offload apply to each root.
        Lightning then finds the module already wrapped and leaves it as it is. (This runs in
        ``setup`` rather than ``configure_model``: Lightning's ``WeightAveraging`` warns about any
        module that overrides ``configure_model``, under DDP too.)
        """
        from lightning.pytorch.callbacks import WeightAveraging
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(callback, WeightAveraging) for callback in self.trainer.callbacks):
            raise ValueError(
                "`trainer.callbacks` has a WeightAveraging callback (e.g. EMAWeightAveraging), which keeps an unsharded"
                " copy of the module and cannot average sharded weights: remove it, or use `strategy: ddp`."
            )
        if self._fsdp_root is not None:
            rank_zero_warn("The policy was sharded by an earlier fit; this strategy's FSDP settings are not applied to it.")
            return
        shard = getattr(self.policy, "shard", None)
        if shard is None:
            raise TypeError(
                f"`trainer.strategy` is FSDP, but {type(self.policy).__name__} has no `shard(wrap, device)` method to"
                " say which of its networks to shard. Add one (see DiffusersVideoPolicy.shard) or use `strategy: ddp`."
            )
        if getattr(strategy, "_state_dict_type", None) == "full":
            rank_zero_warn(
                "FSDP with `state_dict_type: full` gathers every weight, frozen ones included, in rank 0's CPU memory"
                " at each checkpoint (the frozen ones are dropped only afterwards); for large models use `sharded`."
            )
        # Frozen (base weights under LoRA) and trainable parameters share units, which FSDP only
        # flattens together when it keeps the original parameters.
        strategy.kwargs.setdefault("use_orig_params", True)
        settings = dict(
            cpu_offload=strategy.cpu_offload,
            mixed_precision=strategy.mixed_precision_config,
            sharding_strategy=strategy.sharding_strategy,
            device_id=self.device,
            **strategy.kwargs,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                shard(lambda network: FullyShardedDataParallel(network, **settings), self.device)
            except ValueError as error:
                if "uniform dtype" not in str(error):
                    raise
                raise ValueError(
                    "FSDP flattens each unit into one tensor of one dtype, but a unit mixes dtypes (bf16 base weights"
                    " with fp32 LoRA weights, or modules diffusers keeps in fp32). Load the model in fp32 with"
                    " `model.policy.init_args.torch_dtype: float32`; `trainer.precision: bf16-mixed` still computes"
                    " in bf16."
                ) from error
        mixed = [w for w in caught if "has both parameters with requires_grad=True and False" in str(w.message)]
        for w in caught:
            if w not in mixed:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if mixed:
            # FSDP warns once per unit with every parameter name; under LoRA that is every block.
            rank_zero_warn(
                f"{len(mixed)} FSDP units mix frozen and trained weights (LoRA): FSDP keeps a gradient buffer the size"
                " of each whole unit (sharded over the ranks), not only of the adapters."
            )
        for child in self.children():
            if child is not self.policy:
                child.to(self.device)
        # Applied above; left in place, Lightning would warn that it ignores it.
        strategy.kwargs.pop("auto_wrap_policy", None)
        roots = FullyShardedDataParallel.fsdp_modules(self, root_only=True)
        roots = [root for root in roots if any(p.requires_grad for p in root.parameters())]
        loose = {id(p) for p in self.policy.trainable_parameters()} - {id(p) for root in roots for p in root.parameters()}
        if len(roots) != 1 or loose:
            raise ValueError(
                f"Under FSDP every trainable weight must sit in one sharded network (found {len(roots)} sharded networks"
                f" with trainable weights and {len(loose)} trainable tensors outside them): {type(self.policy).__name__}"
                ".shard must wrap the network that `trainable_parameters()` comes from."
            )
        # Kept out of the module tree (a plain attribute would register it a second time).
        self.__dict__["_fsdp_root"] = roots[0]

    _fsdp_root: nn.Module | None = None

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and isinstance(getattr(datamodule, "batch_size", None), int):
            self._check_batch_size(datamodule.batch_size)

    def _check_batch_size(self, num_prompts: int) -> None:
        samples = num_prompts * self.group_size
        if samples % self.num_minibatches:
            raise ValueError(
                f"A batch of {num_prompts} prompts x `model.group_size` ({self.group_size}) = {samples} samples does"
                f" not split into `model.num_minibatches` ({self.num_minibatches}) equal minibatches: set"
                " `data.batch_size` or `model.num_minibatches` so that batch_size * group_size is a multiple of"
                " num_minibatches."
            )

    # -- one GRPO iteration ---------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        prompts = _check_prompts(batch)
        self._check_batch_size(len(prompts))
        iteration = self.global_step // self.updates_per_iteration

        # 1. Rollout: G samples per prompt with the stochastic sampler, keeping log-probs.
        start = time.perf_counter()
        rollout = sample_rollout(
            self.policy,
            prompts,
            self.group_size,
            self.sampler,
            generator=self.rollout_generator(iteration),
            iteration=iteration,
            device=self.device,
            inference_mode=self.rollout_inference_mode,
        )
        rollout_seconds = time.perf_counter() - start

        # 2. Rewards, one score per sample and reward, aggregated per aspect.
        start = time.perf_counter()
        with torch.no_grad():
            scores = self.rewards(rollout.videos, rollout.prompts, group_size=self.group_size)
        reward_seconds = time.perf_counter() - start

        # 3. Group-relative advantages, weighted over aspects by the curriculum's current weights
        #    (one number per aspect, or one per aspect and group under a per-group weighting).
        weights = self.aspect_weights(scores.per_aspect)
        advantages = self.advantages(scores.per_aspect, weights)
        keep = getattr(scores, "keep", None)
        if keep is not None:
            advantages = torch.where(keep, advantages, torch.zeros_like(advantages))
            # With several processes every rank must run the same number of forward and backward
            # passes (each is a collective under DDP and FSDP), so dropped groups stay in the update
            # with zero advantage there; a single process skips them.
            if (self.trainer.world_size if self._trainer is not None else 1) == 1:
                rollout.train_mask &= keep.unsqueeze(1)

        # 4. K inner epochs of clipped policy-gradient updates over the trained (sample, step) pairs.
        start = time.perf_counter()
        stats = self.policy_updates(rollout, advantages)
        update_seconds = time.perf_counter() - start

        # 5. Logs.
        logs = {f"train/reward/{name}": value.mean() for name, value in scores.per_reward.items()}
        logs.update({f"train/aspect/{aspect}": value.mean() for aspect, value in scores.per_aspect.items()})
        logs["train/reward_weighted"] = sum(
            _per_sample(weights[a], self.group_size) * scores.per_aspect[a].float() for a in weights
        ).mean()
        logs.update(
            {
                "train/advantage_abs_mean": advantages.abs().mean(),
                "train/advantage_max": advantages.max(),
                "train/rollout_seconds": torch.tensor(rollout_seconds),
                "train/reward_seconds": torch.tensor(reward_seconds),
                "train/update_seconds": torch.tensor(update_seconds),
            }
        )
        logs.update({f"train/{key}": value for key, value in stats.items()})
        self.log_dict(logs, batch_size=len(prompts))
        self.log("reward", logs["train/reward_weighted"], prog_bar=True, batch_size=len(prompts), logger=False)
        return {
            "loss": stats["loss"],
            "advantages": advantages.detach(),
            "aspect_rewards": {aspect: value.detach() for aspect, value in scores.per_aspect.items()},
            "group_size": self.group_size,
            "prompts": rollout.prompts,
        }

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Deterministic evaluation: ODE sampling from fixed noise, every reward logged under ``val/``.

        ``val/reward_weighted`` weighs the aspects with the curriculum's current weights, so it is
        the reward the generator is being trained on at this point; ``val/aspect/*`` are unweighted.
        """
        prompts = _check_prompts(batch)
        generator = torch.Generator(device=self.device).manual_seed(_mix_seed(self.seed, batch_idx, 1 << 21))
        videos = sample_ode(self.policy, prompts, self.val_sampler, generator=generator, device=self.device)
        scores = self.rewards(videos, prompts)
        logs = {f"val/reward/{name}": value.mean() for name, value in scores.per_reward.items()}
        logs.update({f"val/aspect/{aspect}": value.mean() for aspect, value in scores.per_aspect.items()})
        logs["val/reward_weighted"] = sum(self.reward_weights.get(a, 0.0) * v.mean() for a, v in scores.per_aspect.items())
        self.log_dict(logs, batch_size=len(prompts))

    def aspect_weights(self, aspect_rewards: dict[str, Tensor]) -> dict[str, float | Tensor]:
        """The weight of each aspect for this batch.

        :attr:`reward_weights` (one number per aspect), or, when a per-group weighting is set
        (:attr:`group_weighting`, e.g. by :class:`~sp_grpo.callbacks.GroupRewardWeighting`), one
        weight per aspect and prompt group computed from the groups' own rewards: ``(P,)`` tensors
        for this rank's ``P`` groups. Groups never span ranks, so each rank weighs its own.
        """
        if self.group_weighting is not None:
            return dict(self.group_weighting(aspect_rewards, self.group_size))
        return {aspect: float(self.reward_weights.get(aspect, 0.0)) for aspect in aspect_rewards}

    def advantages(self, aspect_rewards: dict[str, Tensor], weights: dict[str, float | Tensor]) -> Tensor:
        """Group-relative advantages of this rank's samples, with statistics over all ranks.

        Groups never span ranks, but batch-scope statistics must be global: every rank gathers all
        ranks' rewards (and per-group weights), computes the advantages of the whole global batch,
        and keeps its own slice, so the result equals a single process holding every sample.

        Args:
            aspect_rewards: aspect -> ``(N,)`` rewards of this rank.
            weights: aspect -> weight, a float or a ``(N / G,)`` tensor of per-group weights.

        Returns:
            ``(N,)`` clipped advantages.
        """
        world_size = self.trainer.world_size if self._trainer is not None else 1
        if world_size > 1:
            gathered = {aspect: self.all_gather(value).reshape(-1) for aspect, value in aspect_rewards.items()}
            weights = {a: self.all_gather(w).reshape(-1) if isinstance(w, Tensor) else w for a, w in weights.items()}
        else:
            gathered = aspect_rewards
        advantages = aggregate_advantages(
            gathered, weights, self.group_size, mode=self.aggregation, scale=self.advantage_scale, eps=self.advantage_eps
        )
        if world_size > 1:
            advantages = advantages.view(world_size, -1)[self.global_rank]
        return clip_advantages(advantages, self.advantage_clip)

    def policy_updates(self, rollout: Rollout, advantages: Tensor) -> dict[str, Tensor]:
        """Run ``num_inner_epochs`` passes of clipped updates over the rollout.

        Samples are shuffled each epoch and split into ``num_minibatches`` minibatches, one optimizer
        step each; within a minibatch the (sample, step) pairs are processed ``micro_batch_size`` at a
        time with gradient accumulation, each micro-batch's loss weighted by its share of the
        minibatch's pairs, so the gradient is the minibatch mean whatever the micro-batch size.

        Returns:
            Mean statistics over all updates (``loss``, ``clip_frac``, ``approx_kl``, ``kl_ref``,
            ``ratio_mean``) and ``first_log_ratio_abs_max``: the largest ``|log_ratio|`` of the first
            update, 0 up to numerical noise when the update is on-policy.
        """
        optimizer = self.optimizers()
        schedule = self.lr_schedulers()
        # The schedule is checked once on its CPU copy and moved to the device once, not per micro-batch.
        check_sigma_schedule(rollout.sigmas)
        rollout = dataclasses.replace(rollout, sigmas=rollout.sigmas.to(self.device))
        order_gen = torch.Generator().manual_seed(_mix_seed(self.seed, self.global_step, 1 << 20))
        totals: dict[str, list[Tensor]] = {"loss": [], "clip_frac": [], "approx_kl": [], "kl_ref": [], "ratio_mean": []}
        first_log_ratio = None
        for _ in range(self.num_inner_epochs):
            samples = torch.randperm(rollout.num_samples, generator=order_gen)
            for minibatch in samples.tensor_split(self.num_minibatches):
                pairs = rollout.train_mask[minibatch.to(rollout.train_mask.device)].nonzero()
                if pairs.numel() == 0:
                    continue
                pairs[:, 0] = minibatch.to(pairs.device)[pairs[:, 0]]
                for key, value in self.accumulate_gradients(rollout, advantages, pairs).items():
                    if key == "log_ratio":
                        first_log_ratio = value.abs().max() if first_log_ratio is None else first_log_ratio
                    else:
                        totals[key].append(value)
                if self.max_grad_norm is not None:
                    self._clip_grad_norm(optimizer)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
        stats = {key: torch.stack(values).mean() if values else torch.zeros((), device=self.device) for key, values in totals.items()}
        stats["first_log_ratio_abs_max"] = first_log_ratio if first_log_ratio is not None else torch.zeros((), device=self.device)
        stats["trained_pairs"] = rollout.train_mask.sum().float()
        return stats

    def _clip_grad_norm(self, optimizer) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if not isinstance(self.trainer.strategy, FSDPStrategy):
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
            return
        # Lightning does not clip by norm under FSDP; the sharded network's own clip_grad_norm_ takes the
        # norm over every rank's shard (_shard_for_fsdp checked that it holds every trainable weight).
        self._fsdp_root.clip_grad_norm_(self.max_grad_norm)

    def accumulate_gradients(self, rollout: Rollout, advantages: Tensor, pairs: Tensor) -> dict[str, Tensor]:
        """Backpropagate the mean loss over ``pairs``, ``micro_batch_size`` pairs at a time (see ``"auto"``).

        Each micro-batch's mean loss is weighted by its share of ``pairs``, so the accumulated
        gradient is that of the mean over all pairs, whatever the micro-batch size.

        Args:
            rollout: The rollout.
            advantages: ``(N,)`` advantages.
            pairs: ``(M, 2)`` rows of (sample index, step index).

        Returns:
            The pair-weighted means of ``loss``, ``clip_frac``, ``approx_kl``, ``kl_ref`` and
            ``ratio_mean``, and ``log_ratio`` ``(M,)``, all detached.
        """
        sums: dict[str, Tensor] = {}
        log_ratios = []
        start = 0
        sizes = self.micro_batch_sizer.split(
            len(pairs),
            self.micro_batch_size,
            self.device,
            probe=lambda count: self.pair_loss(rollout, advantages, pairs[:count]),
            pending_bytes=self._pending_optimizer_bytes,
            agree=self._min_over_ranks,
        )
        for size in sizes:
            micro = pairs[start : start + size]
            start += size
            out = self.pair_loss(rollout, advantages, micro)
            share = len(micro) / len(pairs)
            if self._trainer is not None:
                self.manual_backward(out["loss"] * share)
            else:  # used outside a Trainer (notebooks, tests)
                (out["loss"] * share).backward()
            log_ratios.append(out.pop("log_ratio").detach())
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + value.detach() * share
        return {**sums, "log_ratio": torch.cat(log_ratios)}

    def _pending_optimizer_bytes(self) -> int:
        """AdamW's two states per trainable weight, until its first step has allocated them."""
        if self._trainer is None or not self.optimizers(use_pl_optimizer=False).state:
            return 2 * sum(p.numel() * p.element_size() for p in self.policy.trainable_parameters())
        return 0

    def _min_over_ranks(self, value: int) -> int:
        """The smallest ``value`` over all processes (each must run as many backward passes)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return int(self.all_gather(torch.tensor(value, device=self.device)).min())

    def pair_loss(self, rollout: Rollout, advantages: Tensor, pairs: Tensor) -> dict[str, Tensor]:
        """Clipped surrogate (+ KL to the reference) on a micro-batch of ``(sample, step)`` pairs.

        Args:
            rollout: The rollout.
            advantages: ``(N,)`` advantages.
            pairs: ``(M, 2)`` rows of (sample index, step index).

        Returns:
            ``loss`` (mean over the pairs), ``log_ratio`` ``(M,)`` and the surrogate's statistics.
        """
        sample, step = pairs[:, 0], pairs[:, 1]
        sigmas = rollout.sigmas.to(self.device)  # already there when called from policy_updates
        x, x_next = rollout.latents[sample, step], rollout.latents[sample, step + 1]
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        embeds = rollout.embeds.index(sample)
        guidance = self.sampler.guidance_scale
        # The schedule was checked once (policy_updates); a check here would sync with the GPU per micro-batch.
        sde_args = dict(kind=self.sampler.sde_kind, noise_level=self.sampler.noise_level, prev_sample=x_next, check_sigmas=False)
        ref = None
        if self.kl_coef > 0:
            # Before the policy's forward: under FSDP a no-grad forward of the same network between a
            # forward and its backward would replace the tensors that the backward's recomputation uses.
            with torch.no_grad(), self.policy.reference():
                ref = sde_step(self.policy.velocity(x, sigma, embeds, guidance), x, sigma, sigma_next, **sde_args)
        step_out = sde_step(self.policy.velocity(x, sigma, embeds, guidance), x, sigma, sigma_next, **sde_args)
        log_ratio = step_out.log_prob - rollout.log_probs[sample, step]
        surrogate = clipped_surrogate(log_ratio, advantages[sample], self.clip_range)
        loss = surrogate.loss
        kl_ref = torch.zeros((), device=self.device)
        if ref is not None:
            kl_ref = gaussian_kl(step_out.prev_mean, ref.prev_mean, step_out.std).mean()
            loss = loss + self.kl_coef * kl_ref
        return {
            "loss": loss,
            "log_ratio": log_ratio,
            "clip_frac": surrogate.clip_frac,
            "approx_kl": surrogate.approx_kl,
            "ratio_mean": surrogate.ratio_mean,
            "kl_ref": kl_ref.detach(),
        }


def _per_sample(weight: float | Tensor, group_size: int) -> float | Tensor:
    """A per-group weight ``(P,)`` repeated for each sample of its group; a float as it is."""
    return weight.float().repeat_interleave(group_size) if isinstance(weight, Tensor) else weight


def _mix_seed(*values: int) -> int:
    """A 63-bit seed from integers, the same in every process (unlike ``hash`` of a tuple with strings)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _check_prompts(batch: Any) -> list[str]:
    prompts = batch.get("prompts") if isinstance(batch, dict) else None
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(
            "A training batch must be a dict with `prompts`, a non-empty list of strings (what"
            f" sp_grpo.data.PromptDataModule yields); got {type(batch).__name__}."
        )
    return list(prompts)


__all__ = ["SelfPacedGRPO"]

