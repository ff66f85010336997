r"""The PPO update over one rollout, as plain functions: K epochs of clipped updates (CleanRL's loop).

:func:`ppo_update` shuffles the rollout's samples each epoch, splits them into minibatches and
runs one optimizer step per minibatch; :func:`accumulate_gradients` backpropagates a minibatch's
mean loss a micro-batch at a time; :func:`pair_loss` is that loss on a micro-batch of (sample,
step) pairs: the clipped surrogate of the step's log-ratio, plus the KL to the reference.
:func:`rollout_graph_update` is the same update for the on-policy case (one epoch, one minibatch)
computed through the rollout's own forward passes instead of running the network again.

.. math:: L = \mathrm{mean}_{(i, t)}\Big[\max\big(-A_i r_{i,t},\; -A_i\,\mathrm{clip}(r_{i,t}, 1 \pm \epsilon)\big)
    + \beta\,\mathrm{KL}\big(\pi_\theta(\cdot \mid x_{i,t}) \,\|\, \pi_{ref}(\cdot \mid x_{i,t})\big)\Big]

No state is kept here: the caller passes what touches the optimizer and the Trainer (backward,
optimizer step with clipping, micro-batch sizes) as callables, so the same functions run inside a
LightningModule, in a notebook or in a test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, get_args

import torch
from torch import Tensor

from sp_grpo.functional.advantages import AdvantageScale, AggregationMode
from sp_grpo.functional.losses import clipped_surrogate, gaussian_kl
from sp_grpo.functional.sde import sde_step

if TYPE_CHECKING:  # sp_grpo.rollout imports sp_grpo.functional
    from sp_grpo.policies import VideoPolicy
    from sp_grpo.rollout import DenoisingConfig, Rollout

__all__ = [
    "STATISTICS",
    "accumulate_gradients",
    "check_minibatches",
    "check_update_settings",
    "pair_loss",
    "ppo_update",
    "rollout_graph_update",
]

#: The per-update statistics :func:`ppo_update` averages, besides the log-ratio.
STATISTICS = ("loss", "clip_frac", "approx_kl", "kl_ref", "ratio_mean")


def check_update_settings(
    *,
    group_size: int,
    num_inner_epochs: int,
    num_minibatches: int,
    clip_range: float,
    advantage_scale: str,
    aggregation: str,
    advantage_clip: float | None,
    kl_coef: float,
    has_reference: bool,
    learning_rate: float,
    lr_warmup_steps: int,
    max_grad_norm: float | None,
    reward_weights: dict[str, float] | None,
    aspects: list[str],
    trainable: bool,
) -> None:
    """Check the settings of the GRPO update; each error names its ``model.*`` setting and how to fix it.

    ``aspects`` are those the rewards cover, which ``reward_weights`` may name; ``has_reference`` and
    ``trainable`` say whether the policy has a reference model and trainable weights.

    Raises:
        ValueError: If a setting is out of range, or ``kl_coef > 0`` without a reference model.
    """
    if group_size < 2:
        raise ValueError(
            f"`group_size` ({group_size}) must be at least 2: GRPO compares samples within a group; set"
            " `model.group_size` to 2 or more."
        )
    for name, value in (("num_inner_epochs", num_inner_epochs), ("num_minibatches", num_minibatches)):
        if value < 1:
            raise ValueError(f"`model.{name}` ({value}) must be at least 1.")
    if clip_range <= 0:
        raise ValueError(f"`model.clip_range` ({clip_range}) must be positive, e.g. 1e-3.")
    choices = (("advantage_scale", advantage_scale, AdvantageScale), ("aggregation", aggregation, AggregationMode))
    for name, value, kind in choices:
        if value not in get_args(kind):
            raise ValueError(f"`model.{name}` ({value!r}) must be one of {list(get_args(kind))}.")
    if advantage_clip is not None and advantage_clip <= 0:
        raise ValueError(f"`model.advantage_clip` ({advantage_clip}) must be positive, or null for no clipping.")
    if kl_coef < 0:
        raise ValueError(f"`model.kl_coef` ({kl_coef}) must be non-negative.")
    if kl_coef > 0 and not has_reference:
        raise ValueError(
            f"`model.kl_coef` ({kl_coef}) needs a reference model, and this policy has none (full fine-tuning"
            " without a copy): use LoRA, set the policy's `reference_copy: true`, or set `model.kl_coef: 0`."
        )
    if not trainable:
        raise ValueError("`model.policy` has no trainable parameters: set a `lora_rank`, or null for full fine-tuning.")
    if learning_rate <= 0:
        raise ValueError(f"`model.learning_rate` ({learning_rate}) must be positive.")
    if lr_warmup_steps < 0:
        raise ValueError(f"`model.lr_warmup_steps` ({lr_warmup_steps}) must be non-negative.")
    if max_grad_norm is not None and max_grad_norm <= 0:
        raise ValueError(f"`model.max_grad_norm` ({max_grad_norm}) must be positive, or null for no clipping.")
    unknown = sorted(set(reward_weights or {}) - set(aspects))
    if unknown:
        raise ValueError(
            f"`model.reward_weights` names aspects {unknown} that no reward in `model.rewards` has; the rewards"
            f" cover {aspects}."
        )


def check_minibatches(num_prompts: int, group_size: int, num_minibatches: int) -> None:
    """Check that a batch of ``num_prompts`` prompts splits into ``num_minibatches`` equal minibatches.

    Raises:
        ValueError: If ``num_prompts * group_size`` is not a multiple of ``num_minibatches``.
    """
    samples = num_prompts * group_size
    if samples % num_minibatches:
        raise ValueError(
            f"A batch of {num_prompts} prompts x `model.group_size` ({group_size}) = {samples} samples does"
            f" not split into `model.num_minibatches` ({num_minibatches}) equal minibatches: set"
            " `data.batch_size` or `model.num_minibatches` so that batch_size * group_size is a multiple of"
            " num_minibatches."
        )


def pair_loss(
    policy: VideoPolicy,
    rollout: Rollout,
    advantages: Tensor,
    pairs: Tensor,
    *,
    sampler: DenoisingConfig,
    clip_range: float,
    kl_coef: float,
) -> dict[str, Tensor]:
    """Clipped surrogate (+ ``kl_coef`` x KL to the reference) on a micro-batch of ``(sample, step)`` pairs.

    The rollout's sigma schedule must already be checked (``check_sigma_schedule``) and on the
    latents' device: a check here would sync with the GPU once per micro-batch.

    Args:
        policy: The generator; ``policy.reference()`` switches to the reference when ``kl_coef > 0``.
        rollout: The rollout the pairs index.
        advantages: ``(N,)`` advantages, one per sample.
        pairs: ``(M, 2)`` rows of (sample index, step index).
        sampler: The rollout's sampler settings (guidance, SDE kind and noise level).
        clip_range: PPO clip range of the probability ratio.
        kl_coef: Weight of the KL to the reference; 0 skips the reference's forward pass.

    Returns:
        ``loss`` (mean over the pairs, with the gradient), ``log_ratio`` ``(M,)``, and the detached
        statistics ``clip_frac``, ``approx_kl``, ``ratio_mean`` and ``kl_ref``.
    """
    sample, step = pairs[:, 0], pairs[:, 1]
    device = rollout.latents.device
    sigmas = rollout.sigmas.to(device)  # already there when called from ppo_update's caller
    x, x_next = rollout.latents[sample, step], rollout.latents[sample, step + 1]
    sigma, sigma_next = sigmas[step], sigmas[step + 1]
    embeds = rollout.embeds.index(sample)
    guidance = sampler.guidance_scale
    sde_args = dict(kind=sampler.sde_kind, noise_level=sampler.noise_level, prev_sample=x_next, check_sigmas=False)
    ref = None
    if kl_coef > 0:
        # Before the policy's forward: under FSDP a no-grad forward of the same network between a
        # forward and its backward would replace the tensors that the backward's recomputation uses.
        with torch.no_grad(), policy.reference():
            ref = sde_step(policy.velocity(x, sigma, embeds, guidance), x, sigma, sigma_next, **sde_args)
    step_out = sde_step(policy.velocity(x, sigma, embeds, guidance), x, sigma, sigma_next, **sde_args)
    log_ratio = step_out.log_prob - rollout.log_probs[sample, step]
    surrogate = clipped_surrogate(log_ratio, advantages[sample], clip_range)
    loss = surrogate.loss
    kl_ref = torch.zeros((), device=device)
    if ref is not None:
        kl_ref = gaussian_kl(step_out.prev_mean, ref.prev_mean, step_out.std).mean()
        loss = loss + kl_coef * kl_ref
    return {
        "loss": loss,
        "log_ratio": log_ratio,
        "clip_frac": surrogate.clip_frac,
        "approx_kl": surrogate.approx_kl,
        "ratio_mean": surrogate.ratio_mean,
        "kl_ref": kl_ref.detach(),
    }


def accumulate_gradients(
    loss_fn: Callable[[Tensor], dict[str, Tensor]],
    pairs: Tensor,
    sizes: Iterable[int],
    backward: Callable[[Tensor], None],
) -> dict[str, Tensor]:
    r"""Backpropagate the mean loss over ``pairs``, one micro-batch at a time.

    Each micro-batch's mean loss is weighted by its share of the pairs, so the accumulated gradient
    is that of the mean over all pairs, whatever the micro-batch sizes:

    .. math:: \nabla \frac{1}{M} \sum_{j=1}^{M} \ell_j = \sum_{b} \frac{|b|}{M}\, \nabla \frac{1}{|b|} \sum_{j \in b} \ell_j

    Args:
        loss_fn: ``pairs (m, 2) -> dict`` with ``loss`` (mean over the pairs), ``log_ratio`` ``(m,)``
            and statistics, e.g. :func:`pair_loss` with its settings bound.
        pairs: ``(M, 2)`` rows of (sample index, step index).
        sizes: Micro-batch sizes summing to ``M``, read one at a time (``MicroBatchSizer.split`` measures
            memory on the first ones).
        backward: Backpropagates a loss (``LightningModule.manual_backward``, or ``Tensor.backward``).

    Returns:
        The pair-weighted means of every statistic of ``loss_fn`` (``loss`` included), and
        ``log_ratio`` ``(M,)``; all detached.
    """
    sums: dict[str, Tensor] = {}
    log_ratios = []
    start = 0
    for size in sizes:
        micro = pairs[start : start + size]
        start += size
        out = loss_fn(micro)
        share = len(micro) / len(pairs)
        backward(out["loss"] * share)
        log_ratios.append(out.pop("log_ratio").detach())
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + value.detach() * share
    return {**sums, "log_ratio": torch.cat(log_ratios)}


def ppo_update(
    train_mask: Tensor,
    accumulate: Callable[[Tensor], dict[str, Tensor]],
    optimizer_step: Callable[[], None],
    *,
    num_inner_epochs: int,
    num_minibatches: int,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """``num_inner_epochs`` passes of clipped updates over a rollout, one optimizer step per minibatch.

    Each epoch shuffles the samples (``generator``, on the CPU) and splits them into
    ``num_minibatches`` minibatches; a minibatch's trained (sample, step) pairs go to ``accumulate``,
    then ``optimizer_step`` runs. A minibatch without trained pairs is skipped: no optimizer step.

    Args:
        train_mask: ``(N, S)`` bool, the (sample, step) pairs that are trained.
        accumulate: ``pairs (M, 2) -> statistics``: backpropagates the minibatch's mean loss, e.g.
            :func:`accumulate_gradients`; returns :data:`STATISTICS` and ``log_ratio`` ``(M,)``.
        optimizer_step: Clips the gradients, steps the optimizer and the learning-rate schedule, and
            zeroes the gradients.
        num_inner_epochs: Passes over the rollout (``K``).
        num_minibatches: Optimizer steps per pass.
        generator: The CPU generator of the sample order.

    Returns:
        The mean of each of :data:`STATISTICS` over the updates (0 without any),
        ``first_log_ratio_abs_max`` (the largest ``|log_ratio|`` of the first update: 0 up to numerical
        noise, as that update is on-policy) and ``trained_pairs``.
    """
    totals: dict[str, list[Tensor]] = {key: [] for key in STATISTICS}
    first_log_ratio = None
    for _ in range(num_inner_epochs):
        samples = torch.randperm(train_mask.shape[0], generator=generator)
        for minibatch in samples.tensor_split(num_minibatches):
            pairs = train_mask[minibatch.to(train_mask.device)].nonzero()
            if pairs.numel() == 0:
                continue
            pairs[:, 0] = minibatch.to(pairs.device)[pairs[:, 0]]
            for key, value in accumulate(pairs).items():
                if key == "log_ratio":
                    first_log_ratio = value.abs().max() if first_log_ratio is None else first_log_ratio
                else:
                    totals[key].append(value)
            optimizer_step()
    zero = torch.zeros((), device=train_mask.device)
    stats = {key: torch.stack(values).mean() if values else zero for key, values in totals.items()}
    stats["first_log_ratio_abs_max"] = first_log_ratio if first_log_ratio is not None else zero
    stats["trained_pairs"] = train_mask.sum().float()
    return stats


def rollout_graph_update(
    policy: VideoPolicy,
    rollout: Rollout,
    advantages: Tensor,
    optimizer_step: Callable[[], None],
    *,
    sampler: DenoisingConfig,
    clip_range: float,
    kl_coef: float,
    backward: Callable[[Tensor], None],
) -> dict[str, Tensor]:
    r"""One on-policy update backpropagated through the rollout's forward passes (:attr:`Rollout.graph`).

    With one inner epoch and one minibatch the weights are the sampling weights when the update
    runs, so recomputing each trained pair's forward pass (what :func:`ppo_update` does) yields the
    very log-probabilities the rollout recorded. Here the rollout kept them with their graphs
    (``sample_rollout(..., keep_graph=True)``) and the loss of :func:`pair_loss` over all trained
    pairs is formed from them directly:

    .. math:: \log r_{i,t} = \log\pi_\theta(x_{i,t+1} \mid x_{i,t}) - \mathrm{sg}\big[\log\pi_\theta(x_{i,t+1} \mid x_{i,t})\big] = 0,
        \qquad \nabla \log r_{i,t} = \nabla \log\pi_\theta(x_{i,t+1} \mid x_{i,t})

    so the gradient is that of :func:`ppo_update` (up to floating-point order) at one forward pass
    per trained pair instead of two. The KL term still runs the reference once per trained step.
    The graph is freed by the backward pass.

    Args:
        policy: The generator; ``policy.reference()`` switches to the reference when ``kl_coef > 0``.
        rollout: Sampled with ``keep_graph=True``; its ``train_mask`` may have been narrowed since
            (e.g. groups dropped by the rewards), and only pairs still in it are trained.
        advantages: ``(N,)`` advantages, one per sample.
        optimizer_step: Clips the gradients, steps the optimizer and the schedule, zeroes the gradients.
        sampler: The rollout's sampler settings (guidance, SDE kind and noise level).
        clip_range: PPO clip range of the probability ratio.
        kl_coef: Weight of the KL to the reference; 0 skips the reference's forward passes.
        backward: Backpropagates the loss (``LightningModule.manual_backward``, or ``Tensor.backward``).

    Returns:
        What :func:`ppo_update` returns: :data:`STATISTICS`, ``first_log_ratio_abs_max`` and
        ``trained_pairs``. Without a trained pair no optimizer step is taken and the statistics are 0.
    """
    if rollout.graph is None:
        raise ValueError("`rollout.graph` is None: sample the rollout with `keep_graph=True` to update through it.")
    device = rollout.latents.device
    zero = torch.zeros((), device=device)
    log_ratios, samples, kls = [], [], []
    sigma_values = rollout.sigmas.tolist()
    for step, part in sorted(rollout.graph.items()):
        keep = rollout.train_mask[part.rows, step]
        rows = part.rows[keep]
        log_prob = part.log_prob[keep]
        log_ratios.append(log_prob - log_prob.detach())
        samples.append(rows)
        if kl_coef > 0 and len(rows):
            x, x_next = rollout.latents[rows, step], rollout.latents[rows, step + 1]
            sigma = torch.full((len(rows),), sigma_values[step], device=device)
            args = dict(kind=sampler.sde_kind, noise_level=sampler.noise_level, prev_sample=x_next, check_sigmas=False)
            with torch.no_grad(), policy.reference():
                velocity = policy.velocity(x, sigma, rollout.embeds.index(rows), sampler.guidance_scale)
                ref = sde_step(velocity, x, sigma_values[step], sigma_values[step + 1], **args)
            kls.append(gaussian_kl(part.prev_mean[keep], ref.prev_mean, part.std[keep]))
    rollout.graph = None  # the backward below frees the activations; nothing may use them again
    stats = {key: zero for key in STATISTICS} | {"first_log_ratio_abs_max": zero, "trained_pairs": rollout.train_mask.sum().float()}
    log_ratio = torch.cat(log_ratios) if log_ratios else zero.new_zeros(0)
    if log_ratio.numel() == 0:
        return stats
    surrogate = clipped_surrogate(log_ratio, advantages[torch.cat(samples)], clip_range)
    loss, kl_ref = surrogate.loss, zero
    if kls:
        kl_ref = torch.cat(kls).mean()
        loss = loss + kl_coef * kl_ref
    backward(loss)
    optimizer_step()
    stats.update(
        loss=loss.detach(), clip_frac=surrogate.clip_frac.detach(), approx_kl=surrogate.approx_kl.detach(),
        ratio_mean=surrogate.ratio_mean.detach(), kl_ref=kl_ref.detach(), first_log_ratio_abs_max=log_ratio.detach().abs().max(),
    )
    return stats
