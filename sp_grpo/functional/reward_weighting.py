r"""Per-group reward weights from reward levels and within-group separation (the paper's v4, TaRoS).

Version 4 of the Self-Paced GRPO paper (arXiv 2511.19356, "Rethinking Reward Signals in Video GRPO:
When Scores Become Targets", Sec. 4) weighs the reward components of each prompt's group by two
things: how far the group's mean score of a component is from a target level, and how well the
component still separates the group's samples. Separation is the Hoyer sparsity of the group's
scores; a group whose scores are all alike (compressed, "saturated") has sparsity 0.

Rewards arrive flat and prompt-major, as everywhere in sp_grpo: ``(P * G,)`` per component, or
``(K, P * G)`` for ``K`` components stacked in curriculum order (fidelity, temporal, semantic).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["group_reward_weights", "hoyer_sparsity"]


def hoyer_sparsity(rewards: Tensor, group_size: int) -> Tensor:
    r"""Hoyer sparsity of each group's rewards: 0 when all are alike, 1 when one sample holds it all.

    For a group :math:`r \in \mathbb{R}^G`:

    .. math:: S(r) = \frac{\sqrt{G} - \lVert r\rVert_1 / \lVert r\rVert_2}{\sqrt{G} - 1}

    Edge cases, defined here:

    * an all-zero group has :math:`0/0` in the ratio; it separates nothing, so :math:`S = 0`;
    * a constant group has :math:`\lVert r\rVert_1/\lVert r\rVert_2 = \sqrt G`, so :math:`S = 0`
      (up to rounding, which is clamped to :math:`[0, 1]`);
    * negative entries count by magnitude, as the norms define: :math:`S([-1, 1]) = 0` although the
      two samples differ. The measure is meant for non-negative scores (the paper's judges give
      scores in a known positive range); map a signed reward into :math:`[0, 1]` before using it.

    Args:
        rewards: ``(..., P * G)`` rewards, prompt-major along the last dimension.
        group_size: ``G``, samples per prompt, at least 2.

    Returns:
        ``(..., P)`` fp32 sparsities in :math:`[0, 1]`.

    Raises:
        ValueError: If ``group_size < 2``, the last dimension is not a multiple of ``group_size``, or
            a reward is NaN or infinite.

    Example:
        >>> hoyer_sparsity(torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 0.0, 0.0]), group_size=4)
        tensor([0., 1.])
    """
    _check_groups(rewards, group_size)
    # fp32: scores from a bf16 judge differ in the third digit, and the ratio amplifies rounding.
    grouped = rewards.float().reshape(*rewards.shape[:-1], -1, group_size)
    l1 = grouped.abs().sum(dim=-1)
    l2 = grouped.pow(2).sum(dim=-1).sqrt()
    root = math.sqrt(group_size)
    # An all-zero group has ratio 0/0: give it the ratio of a constant group, sqrt(G), so S = 0.
    ratio = torch.where(l2 > 0, l1 / l2.clamp_min(torch.finfo(l2.dtype).tiny), torch.full_like(l1, root))
    return ((root - ratio) / (root - 1.0)).clamp(0.0, 1.0)


def group_reward_weights(
    rewards: Tensor,
    group_size: int,
    thresholds: Tensor,
    beta: float = 0.3,
    slope: float = 1.0,
) -> Tensor:
    r"""Softmax weights of ``K`` reward components for each prompt's group (the paper's v4, Eq. 6-7).

    For group :math:`g` and component :math:`j = 1..K` (curriculum order), with group mean
    :math:`\bar r_j` and Hoyer sparsity :math:`S(r_j)` (:func:`hoyer_sparsity`):

    .. math:: u_j = h(\bar r_j - \tau_j) + \beta\,\big[S(r_j) - S(r_{j+1})\big],
              \qquad S(r_{K+1}) = 0, \qquad h(x) = \mathrm{sigmoid}(\text{slope}\cdot x)

    .. math:: w_{g} = \mathrm{softmax}_j(u_j)

    ``slope = 1`` is the paper's literal sigmoid. With scores in :math:`[0, 1]` it maps every level
    into about :math:`[0.3, 0.6]`, so the weights stay close to :math:`1/K`; a larger slope makes the
    level term decisive. With ``K = 1`` every weight is 1.

    Args:
        rewards: ``(K, P * G)`` rewards, one row per component, prompt-major.
        group_size: ``G``, samples per prompt, at least 2.
        thresholds: ``(K,)`` target levels :math:`\tau_j`.
        beta: Weight :math:`\beta \ge 0` of the separation term.
        slope: Slope :math:`> 0` of the sigmoid :math:`h`.

    Returns:
        ``(K, P)`` fp32 weights; each column sums to 1.

    Raises:
        ValueError: If ``rewards`` is not 2-D, ``thresholds`` is not ``(K,)``, ``beta`` is negative,
            ``slope`` is not positive, or the rewards fail the checks of :func:`hoyer_sparsity`.

    Example:
        >>> rewards = torch.tensor([[0.9, 0.9, 0.2, 0.4], [0.5, 0.5, 0.0, 1.0]])
        >>> group_reward_weights(rewards, 2, torch.tensor([0.75, 0.75]), beta=0.3)
        tensor([[0.5249, 0.3553],
                [0.4751, 0.6447]])
    """
    if rewards.ndim != 2:
        raise ValueError(
            f"`rewards` must be 2-D (K, P * G), one row per reward component, got shape {tuple(rewards.shape)}; "
            "stack the components with torch.stack([fidelity, temporal, semantic])."
        )
    num_components = rewards.shape[0]
    if tuple(thresholds.shape) != (num_components,):
        raise ValueError(
            f"`thresholds` must have shape ({num_components},), one target level per reward component, "
            f"got {tuple(thresholds.shape)}."
        )
    if not beta >= 0:  # also rejects NaN
        raise ValueError(f"`beta` ({beta}) must be non-negative; the paper uses 0.1 to 0.5 (0 drops the separation term).")
    if not slope > 0:
        raise ValueError(f"`slope` ({slope}) must be positive; 1.0 is the paper's literal sigmoid.")
    sparsity = hoyer_sparsity(rewards, group_size)  # (K, P); checks the groups
    means = rewards.float().reshape(num_components, -1, group_size).mean(dim=-1)
    level = torch.sigmoid(slope * (means - thresholds.float().to(means.device)[:, None]))
    # S(r_{K+1}) = 0: the last component's separation is compared with nothing.
    next_sparsity = torch.cat([sparsity[1:], torch.zeros_like(sparsity[:1])])
    utility = level + beta * (sparsity - next_sparsity)
    return torch.softmax(utility, dim=0)


def _check_groups(rewards: Tensor, group_size: int) -> None:
    if group_size < 2:
        raise ValueError(
            f"`group_size` ({group_size}) must be at least 2: sparsity compares samples within a group; "
            "set `model.group_size` to 2 or more."
        )
    if rewards.ndim == 0 or rewards.shape[-1] % group_size != 0:
        raise ValueError(
            f"the last dimension of `rewards` (shape {tuple(rewards.shape)}) must be a multiple of `group_size` "
            f"({group_size}): each prompt contributes a whole group, prompt-major."
        )
    if not torch.isfinite(rewards).all():
        raise ValueError(
            "`rewards` has NaN or infinite entries; every sample needs a finite score before groups can be weighed."
        )
