r"""Group-relative advantages (GRPO) and their combination over several rewards.

Rewards arrive flat, ``(P * G,)``, prompt-major: the ``G`` samples of prompt 0, then the ``G`` samples
of prompt 1, and so on. A sample's advantage is its reward relative to the other samples drawn for
the same prompt, so no value network is needed.

Standard deviations here are *population* standard deviations (``unbiased=False``, divide by ``n``),
as in Flow-GRPO's per-prompt statistics; with ``G = 2`` the sample std would be :math:`\sqrt2` times
larger.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = ["AdvantageScale", "AggregationMode", "aggregate_advantages", "clip_advantages", "group_advantages"]

AdvantageScale = Literal["group", "batch", "none"]
AggregationMode = Literal["normalize_then_sum", "sum_then_normalize"]


def group_advantages(rewards: Tensor, group_size: int, scale: AdvantageScale = "group", eps: float = 1e-4) -> Tensor:
    r"""Group-relative advantages: each reward minus its group's mean, optionally divided by a std.

    For sample :math:`i` of group :math:`g` with rewards :math:`r_{g,1..G}`:

    .. math:: A_{g,i} = \frac{r_{g,i} - \bar r_g}{\mathrm{std} + \varepsilon}

    where :math:`\mathrm{std}` is the population std of group :math:`g` (``"group"``), of all
    ``P * G`` rewards (``"batch"``, the "global std" of Flow-GRPO), or the denominator is 1 (``"none"``:
    :math:`A_{g,i} = r_{g,i} - \bar r_g`). ``"batch"`` uses the rewards passed in; in multi-process
    training, gather them across ranks first so every rank uses the same std.

    Args:
        rewards: ``(P * G,)`` rewards, prompt-major.
        group_size: ``G``, samples per prompt, at least 2.
        scale: ``"group"``, ``"batch"`` or ``"none"``.
        eps: Added to the std so a group of equal rewards gets advantages 0, not NaN.

    Returns:
        ``(P * G,)`` fp32 advantages, in the same order as ``rewards``.

    Raises:
        ValueError: If ``rewards`` is not 1-D, its length is not a multiple of ``group_size``,
            ``group_size < 2``, ``scale`` is unknown, or any reward is NaN or infinite.

    Example:
        >>> group_advantages(torch.tensor([1.0, 3.0, 10.0, 10.0]), group_size=2, scale="none")
        tensor([-1.,  1.,  0.,  0.])
    """
    _check_scale(scale)
    _check_rewards(rewards, group_size, "rewards")
    # fp32: rewards may come from a bf16 reward model; the group differences are small.
    grouped = rewards.float().reshape(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    return (centered / _DENOMINATORS[scale](grouped, eps)).reshape(-1)


# Each maps the (P, G) fp32 rewards to what the centred rewards are divided by (broadcastable).
_DENOMINATORS = {
    "group": lambda grouped, eps: grouped.std(dim=1, unbiased=False, keepdim=True) + eps,
    "batch": lambda grouped, eps: grouped.std(unbiased=False) + eps,
    "none": lambda grouped, eps: grouped.new_ones(()),
}


def aggregate_advantages(
    rewards: Mapping[str, Tensor],
    weights: Mapping[str, float | Tensor],
    group_size: int,
    *,
    mode: AggregationMode = "normalize_then_sum",
    scale: AdvantageScale = "group",
    eps: float = 1e-4,
) -> Tensor:
    r"""Advantages from several named rewards (aspects), weighted.

    .. math:: \text{normalize\_then\_sum:}\quad A = \sum_k w_k\, \mathrm{GA}(r_k)
    .. math:: \text{sum\_then\_normalize:}\quad A = \mathrm{GA}\Big(\sum_k w_k\, r_k\Big)

    where :math:`\mathrm{GA}` is :func:`group_advantages`. Normalising each reward first makes the
    weights, not the rewards' raw scales, decide each aspect's share; summing first lets a reward with
    a larger spread dominate. A reward with weight 0 contributes nothing.

    A weight is one number for the whole batch, or a ``(P,)`` tensor with one weight per prompt's
    group (:math:`w_{k,g}`, e.g. from
    :func:`~sp_grpo.functional.reward_weighting.group_reward_weights`); every sample of group
    :math:`g` then uses :math:`w_{k,g}`. ``sum_then_normalize`` with per-group weights is the
    paper's v4 aggregation: :math:`\tilde r_i = \sum_k w_{k,g(i)} r_{k,i}`, standardised within the group.

    Args:
        rewards: Aspect name to ``(P * G,)`` rewards, all the same length, prompt-major.
        weights: Aspect name to a non-negative weight, a float or a ``(P,)`` tensor of per-group
            weights; exactly the names of ``rewards``.
        group_size: ``G``, samples per prompt, at least 2.
        mode: ``"normalize_then_sum"`` or ``"sum_then_normalize"``.
        scale: Passed to :func:`group_advantages`.
        eps: Passed to :func:`group_advantages`.

    Returns:
        ``(P * G,)`` fp32 advantages.

    Raises:
        ValueError: If ``rewards`` is empty, the names of ``rewards`` and ``weights`` differ, a weight is
            negative or not finite, ``mode`` or ``scale`` is unknown, or a reward fails the checks of
            :func:`group_advantages` or differs in length from the others.

    Example:
        >>> r = {"fidelity": torch.tensor([0.0, 1.0]), "temporal": torch.tensor([5.0, 3.0])}
        >>> aggregate_advantages(r, {"fidelity": 1.0, "temporal": 0.25}, group_size=2, scale="none")
        tensor([-0.2500,  0.2500])
        >>> per_group = {"fidelity": torch.tensor([1.0]), "temporal": torch.tensor([0.25])}
        >>> aggregate_advantages(r, per_group, group_size=2, mode="sum_then_normalize", scale="none")
        tensor([-0.2500,  0.2500])
    """
    if mode not in _AGGREGATORS:
        raise ValueError(
            f"`mode` ({mode!r}) is not a known aggregation; choose one of {list(get_args(AggregationMode))}."
        )
    _check_scale(scale)
    _check_weights(rewards, weights)
    lengths = {name: tuple(r.shape) for name, r in rewards.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"all rewards must have the same shape (P * G,), got {lengths}; "
            "score every sample of the batch with every reward."
        )
    for name, r in rewards.items():
        _check_rewards(r, group_size, f"rewards[{name!r}]")
    num_groups = next(iter(rewards.values())).numel() // group_size
    per_sample = {name: _per_sample(weights[name], group_size, num_groups, name) for name in rewards}
    return _AGGREGATORS[mode](rewards, per_sample, group_size, scale, eps)


def _per_sample(weight: float | Tensor, group_size: int, num_groups: int, name: str) -> float | Tensor:
    """A float stays a float; a ``(P,)`` per-group tensor becomes ``(P * G,)`` fp32, one entry per sample."""
    if not isinstance(weight, Tensor):
        return float(weight)
    if tuple(weight.shape) != (num_groups,):
        raise ValueError(
            f"the per-group weight of {name!r} has shape {tuple(weight.shape)} but the rewards hold {num_groups} "
            f"groups of {group_size}: pass one weight per group, shape ({num_groups},), or a single float."
        )
    return weight.float().repeat_interleave(group_size)


# Each takes the weights per sample: a float, or a (P * G,) fp32 tensor.
def _normalize_then_sum(
    rewards: Mapping[str, Tensor], weights: Mapping[str, float | Tensor], group_size: int, scale: str, eps: float
) -> Tensor:
    terms = [weights[k] * group_advantages(r, group_size, scale, eps) for k, r in rewards.items()]
    return torch.stack(terms).sum(dim=0)


def _sum_then_normalize(
    rewards: Mapping[str, Tensor], weights: Mapping[str, float | Tensor], group_size: int, scale: str, eps: float
) -> Tensor:
    # fp32 before weighting so a bf16 reward is not rounded again by the sum.
    total = torch.stack([weights[k] * r.float() for k, r in rewards.items()]).sum(dim=0)
    return group_advantages(total, group_size, scale, eps)


_AGGREGATORS = {"normalize_then_sum": _normalize_then_sum, "sum_then_normalize": _sum_then_normalize}


def clip_advantages(advantages: Tensor, max_abs: float | None) -> Tensor:
    r"""Clamp advantages to :math:`[-m, m]`, or return them unchanged when ``max_abs`` is None.

    .. math:: A' = \min(\max(A, -m), m)

    Args:
        advantages: Any shape.
        max_abs: :math:`m > 0`, or None for no clipping.

    Returns:
        Same shape and dtype as ``advantages`` (the input itself when ``max_abs`` is None).

    Raises:
        ValueError: If ``max_abs`` is not positive.

    Example:
        >>> clip_advantages(torch.tensor([-7.0, 0.5, 9.0]), 5.0)
        tensor([-5.0000,  0.5000,  5.0000])
    """
    if max_abs is None:
        return advantages
    if not max_abs > 0:  # also rejects NaN
        raise ValueError(
            f"`max_abs` ({max_abs}) must be positive: advantages are clamped to [-max_abs, max_abs]; "
            "set it to a positive value such as 5.0, or None to disable clipping."
        )
    return advantages.clamp(-max_abs, max_abs)


# --- validation ----------------------------------------------------------------------------------
def _check_scale(scale: str) -> None:
    if scale not in get_args(AdvantageScale):
        raise ValueError(
            f"`scale` ({scale!r}) is not a known advantage scale; choose one of {list(get_args(AdvantageScale))}: "
            "divide by the group's std, the whole batch's std, or not at all."
        )


def _check_rewards(rewards: Tensor, group_size: int, name: str) -> None:
    """Raise a ValueError unless ``rewards`` is a finite 1-D tensor of whole groups of size >= 2."""
    if group_size < 2:
        raise ValueError(
            f"`group_size` ({group_size}) must be at least 2: GRPO compares samples within a group; "
            "set `model.group_size` to 2 or more."
        )
    if rewards.ndim != 1:
        raise ValueError(
            f"`{name}` must be 1-D (P * G,), got shape {tuple(rewards.shape)}; "
            "flatten it prompt-major, one reward per sample."
        )
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"`{name}` length ({rewards.numel()}) must be a multiple of `group_size` ({group_size}): "
            "each prompt contributes a whole group; pass P * group_size rewards."
        )
    bad = ~torch.isfinite(rewards)
    if bad.any():
        indices = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"`{name}` has non-finite entries at indices {indices} (values {rewards[bad].tolist()}); "
            "a reward must be a finite number for every sample, so fix or filter the reward model's output."
        )


def _check_weights(rewards: Mapping[str, Tensor], weights: Mapping[str, float | Tensor]) -> None:
    if not rewards:
        raise ValueError("`rewards` is empty: pass at least one named reward, e.g. {'fidelity': scores}.")
    missing = sorted(set(rewards) - set(weights))
    if missing:
        raise ValueError(
            f"rewards {missing} have no weight: `weights` has {sorted(weights)}; "
            "give every reward a weight (0 to ignore it)."
        )
    extra = sorted(set(weights) - set(rewards))
    if extra:
        raise ValueError(
            f"weights {extra} name no reward: `rewards` has {sorted(rewards)}; "
            "remove those weights or compute those rewards."
        )
    invalid = {name: w.tolist() if isinstance(w, Tensor) else float(w) for name, w in weights.items() if not _valid_weight(w)}
    if invalid:
        raise ValueError(
            f"weights must be finite and non-negative, got {invalid}; a negative weight would reward the "
            "opposite of the aspect. Use 0 to switch a reward off."
        )


def _valid_weight(weight: float | Tensor) -> bool:
    if isinstance(weight, Tensor):
        return bool(torch.isfinite(weight).all() and (weight >= 0).all())
    return 0 <= float(weight) < float("inf")  # also rejects NaN
