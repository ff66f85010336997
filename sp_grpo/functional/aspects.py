"""Reward aspects: their order, and how several rewards' scores become one score per aspect.

Every reward judges one aspect of a video (:data:`ASPECTS`, in curriculum order). A
:class:`~sp_grpo.rewards.RewardSet` scores a batch with each reward and hands the scores to
:func:`aspect_means`, which combines the rewards of each aspect into one score per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = ["ASPECTS", "Aspect", "aspect_means", "standardize"]

Aspect = Literal["fidelity", "temporal", "semantic"]
#: The reward aspects in curriculum order: coarse visual fidelity, then temporal coherence, then
#: text-video alignment.
ASPECTS: tuple[str, ...] = get_args(Aspect)


def aspect_means(
    scores: Tensor,
    weights: Sequence[float],
    higher_is_better: Sequence[bool],
    reward_aspects: Sequence[str],
    aspects: Sequence[str],
) -> Tensor:
    """Weighted mean of each aspect's rewards, with lower-is-better rewards negated.

    For aspect :math:`k` with rewards :math:`i \\in k`, weights :math:`w_i` and scores
    :math:`r_{i,b}`:

    .. math:: a_{k,b} = \\frac{\\sum_{i \\in k} w_i\\, \\sigma_i\\, r_{i,b}}{\\sum_{i \\in k} w_i},\\qquad
        \\sigma_i = \\begin{cases}+1 & \\text{higher is better}\\\\ -1 & \\text{otherwise}\\end{cases}

    so that a larger aspect score is always better.

    Args:
        scores: ``(R, B)`` scores of ``R`` rewards on ``B`` samples (raw or standardized).
        weights: ``R`` non-negative weights; each aspect's weights must have a positive sum.
        higher_is_better: ``R`` flags, ``False`` for rewards where smaller is better.
        reward_aspects: ``R`` aspect names, the aspect each reward judges.
        aspects: ``K`` aspects to return, in that order.

    Returns:
        ``(K, B)`` aspect scores, same dtype as ``scores``.

    Example:
        >>> scores = torch.tensor([[1.0, 2.0], [3.0, 5.0], [0.5, 0.0]])
        >>> aspect_means(scores, [3.0, 1.0, 1.0], [True, False, True], ["fidelity", "fidelity", "semantic"],
        ...              ["fidelity", "semantic"])
        tensor([[0.0000, 0.2500],
                [0.5000, 0.0000]])
    """
    signs = scores.new_tensor([1.0 if higher else -1.0 for higher in higher_is_better])
    weights = scores.new_tensor(list(weights))
    per_aspect = []
    for aspect in aspects:
        mask = scores.new_tensor([1.0 if a == aspect else 0.0 for a in reward_aspects])
        w = weights * mask
        per_aspect.append((w[:, None] * signs[:, None] * scores).sum(0) / w.sum())
    return torch.stack(per_aspect)


def standardize(scores: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """Standardize each reward's scores with its (running) mean and variance.

    .. math:: \\tilde r_{i,b} = \\frac{r_{i,b} - \\mu_i}{\\sqrt{v_i + \\epsilon}}

    Args:
        scores: ``(R, B)`` scores.
        mean: ``(R,)`` means :math:`\\mu_i`.
        var: ``(R,)`` variances :math:`v_i`.
        eps: :math:`\\epsilon`, added to the variance.

    Returns:
        ``(R, B)`` standardized scores.

    Example:
        >>> standardize(torch.tensor([[1.0, 3.0]]), torch.tensor([2.0]), torch.tensor([1.0]), eps=0.0)
        tensor([[-1.,  1.]])
    """
    return (scores - mean[:, None]) / torch.sqrt(var[:, None] + eps)
