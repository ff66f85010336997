"""Self-paced curriculum maths: competence from per-aspect rewards, and weights from competence.

The curriculum moves the reward's emphasis through the aspects in order
``fidelity -> temporal -> semantic`` as the generator becomes competent at each. It has three
replaceable parts, each a pure function here:

1. :func:`~sp_grpo.functional.competence.update_competence` folds one batch of per-aspect rewards
   into a :class:`~sp_grpo.functional.competence.CompetenceState`, and
   :func:`~sp_grpo.functional.competence.competence` reads a competence in ``[0, 1]`` per aspect off
   it: a gain that clears its own noise, a level, or saturation (see
   :mod:`sp_grpo.functional.competence`; re-exported here).
2. :func:`unlock_progress` maps competence to how far each aspect is unlocked, through a smooth
   gate (:data:`GATES`).
3. :func:`stage_weights` maps unlock progress to reward weights: non-negative, summing to 1, with a
   floor that keeps earlier aspects from being forgotten.

Rewards are stacked per aspect, shape ``(K, P*G)``: ``K`` aspects in curriculum order, each row the
flat prompt-major rewards of a batch of ``P`` prompts with ``G`` samples each.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from sp_grpo.functional.aspects import ASPECTS  # noqa: F401  (re-exported: the aspects in curriculum order)
from sp_grpo.functional.competence import CompetenceState, competence, reset_aspects, update_competence  # noqa: F401

GateName = Literal["sigmoid", "smoothstep"]


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """Reshape flat prompt-major rewards ``(..., P*G)`` to ``(..., P, G)``, in fp32."""
    if group_size < 2:
        raise ValueError(
            f"`group_size` ({group_size}) must be at least 2: a group's spread needs two samples; "
            "set `group_size` to 2 or more."
        )
    n = rewards.shape[-1]
    if n % group_size != 0:
        raise ValueError(
            f"The number of rewards ({n}) must be a multiple of `group_size` ({group_size}): rewards "
            "are prompt-major groups `[p0]*G + [p1]*G + ...`; pass whole groups."
        )
    # Statistics in fp32: bf16 rewards lose the small within-group differences that matter here.
    return rewards.float().reshape(*rewards.shape[:-1], n // group_size, group_size)


def group_means(rewards: Tensor, group_size: int) -> Tensor:
    """Mean reward of each group.

    .. math:: \\bar r_p = \\tfrac{1}{G} \\textstyle\\sum_g r_{p,g}

    Args:
        rewards: Flat prompt-major rewards, shape ``(..., P*G)``.
        group_size: Samples per prompt ``G`` (at least 2).

    Returns:
        Per-group mean, shape ``(..., P)``, fp32.

    Raises:
        ValueError: If ``group_size < 2`` or the last dimension is not a multiple of it.
    """
    return _grouped(rewards, group_size).mean(dim=-1)


def group_spread(rewards: Tensor, group_size: int) -> Tensor:
    """Population standard deviation of each group.

    .. math:: s_p = \\sqrt{\\tfrac{1}{G} \\textstyle\\sum_g (r_{p,g} - \\bar r_p)^2}

    Args:
        rewards: Flat prompt-major rewards, shape ``(..., P*G)``.
        group_size: Samples per prompt ``G`` (at least 2).

    Returns:
        Per-group spread, shape ``(..., P)``, fp32.

    Raises:
        ValueError: If ``group_size < 2`` or the last dimension is not a multiple of it.
    """
    return _grouped(rewards, group_size).std(dim=-1, correction=0)


def zero_spread_groups(
    rewards: Tensor, group_size: int, weights: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """Which groups teach nothing: every weighted aspect has (near) zero spread in the group.

    Group-relative advantages of a group whose rewards are all equal are zero, so its samples give
    no policy gradient. With several aspects, a group is uninformative when each aspect that has a
    positive weight is flat in it.

    .. math:: z_p = \\textstyle\\prod_{k: w_k > 0} [\\, s_{k,p} \\le \\epsilon \\,]

    Args:
        rewards: Per-aspect rewards, shape ``(K, P*G)``.
        group_size: Samples per prompt ``G``.
        weights: Aspect weights, shape ``(K,)``; aspects with weight 0 are ignored. ``None`` counts
            every aspect.
        eps: Spread at or below which a group counts as flat.

    Returns:
        Boolean mask, shape ``(P,)``.

    Raises:
        ValueError: If ``rewards`` is not 2-D or ``weights`` does not have ``K`` entries.
    """
    if rewards.dim() != 2:
        raise ValueError(f"`rewards` must have shape (K, P*G), got {tuple(rewards.shape)}; stack the aspects.")
    flat = group_spread(rewards, group_size) <= eps  # (K, P)
    if weights is not None:
        if weights.shape != (rewards.shape[0],):
            raise ValueError(
                f"`weights` has shape {tuple(weights.shape)} but `rewards` has {rewards.shape[0]} aspects; "
                "pass one weight per aspect."
            )
        flat = flat | (weights <= 0).unsqueeze(-1).to(flat.device)
    return flat.all(dim=0)


def group_informativeness(rewards: Tensor, group_size: int, eps: float = 1e-8) -> Tensor:
    """How much each group teaches, relative to the batch: its spread over the pooled spread.

    Scale free, so it works for any reward: 0 for a flat group (mastered or hopeless prompt),
    1 for a group at least as spread as the batch's typical group.

    .. math:: i_p = \\min\\!\\Big(1, \\frac{s_p}{\\sqrt{\\tfrac{1}{P}\\sum_q s_q^2} + \\epsilon}\\Big)

    Args:
        rewards: Flat prompt-major rewards, shape ``(P*G,)``.
        group_size: Samples per prompt ``G``.
        eps: Guards the division for an entirely flat batch (all groups then score 0).

    Returns:
        Informativeness per group in ``[0, 1]``, shape ``(P,)``, fp32.
    """
    spread = group_spread(rewards, group_size)
    pooled = spread.pow(2).mean().sqrt()
    return (spread / (pooled + eps)).clamp(max=1.0)


def sigmoid_gate(competence: Tensor, threshold: float = 0.7, width: float = 0.2) -> Tensor:
    """Logistic gate: 0.5 at ``threshold``, 5 % to 95 % across ``width``.

    .. math:: g(c) = \\sigma\\big(6 (c - \\theta) / w\\big)

    Args:
        competence: Competence, any shape.
        threshold: Competence :math:`\\theta` at which the gate is half open.
        width: Competence range :math:`w` over which it opens (> 0).

    Returns:
        Gate values in ``(0, 1)``, same shape.
    """
    # 6 / w puts sigma(-3) ~ 0.05 and sigma(3) ~ 0.95 at the ends of the width.
    return torch.sigmoid(6.0 * (competence.float() - threshold) / width)


def smoothstep_gate(competence: Tensor, threshold: float = 0.7, width: float = 0.2) -> Tensor:
    """Cubic smoothstep gate: exactly 0 below and 1 above the width, smooth in between.

    .. math:: x = \\mathrm{clip}\\big((c - \\theta) / w + \\tfrac12, 0, 1\\big), \\quad g(c) = 3x^2 - 2x^3

    Args:
        competence: Competence, any shape.
        threshold: Competence :math:`\\theta` at which the gate is half open.
        width: Competence range :math:`w` over which it opens (> 0).

    Returns:
        Gate values in ``[0, 1]``, same shape.
    """
    x = ((competence.float() - threshold) / width + 0.5).clamp(0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


#: Gate functions by name; any ``f(competence, threshold, width) -> Tensor`` in [0, 1] fits.
GATES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "sigmoid": sigmoid_gate,
    "smoothstep": smoothstep_gate,
}


def check_unlock_settings(gate: str, threshold: float, width: float) -> None:
    """Check the settings of :func:`unlock_progress` (callbacks call it at construction).

    Raises:
        ValueError: If ``gate`` is unknown or ``threshold``/``width`` are out of range.
    """
    if gate not in GATES:
        raise ValueError(f"`gate` ({gate!r}) must be one of {sorted(GATES)}.")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"`threshold` ({threshold}) must be in (0, 1): competence lives in [0, 1].")
    if width <= 0:
        raise ValueError(f"`width` ({width}) must be positive: it is the competence range over which a gate opens.")


def check_floor(floor: float, num_aspects: int) -> None:
    """Check the ``floor`` of :func:`stage_weights` for ``num_aspects`` aspects.

    Raises:
        ValueError: If ``floor`` is outside ``[0, 1/K)``.
    """
    if not 0.0 <= floor < 1.0 / num_aspects:
        raise ValueError(
            f"`floor` ({floor}) must be in [0, 1/{num_aspects}) for {num_aspects} aspects: the current aspect must "
            f"keep more weight than each earlier one; set `floor` below {1.0 / num_aspects:.3f}."
        )


def unlock_progress(
    competence: Tensor,
    gate: GateName = "sigmoid",
    threshold: float = 0.7,
    width: float = 0.2,
) -> Tensor:
    """How far each aspect is unlocked: aspect ``k`` opens as every earlier aspect becomes competent.

    .. math:: U_0 = 1, \\quad U_k = \\textstyle\\prod_{j<k} g(c_j)

    ``U`` is non-increasing in ``k``, so the aspects unlock in order.

    Args:
        competence: Competence per aspect in curriculum order, shape ``(K,)``.
        gate: Name of the gate in :data:`GATES`.
        threshold: Competence at which a gate is half open, in ``(0, 1)``.
        width: Competence range over which a gate opens, > 0.

    Returns:
        Unlock progress in ``[0, 1]``, shape ``(K,)``, fp32.

    Raises:
        ValueError: If ``gate`` is unknown or ``threshold``/``width`` are out of range.
    """
    check_unlock_settings(gate, threshold, width)
    opened = GATES[gate](competence, threshold, width)[:-1]
    return torch.cat([opened.new_ones(1), torch.cumprod(opened, dim=0)])


def stage_weights(progress: Tensor, floor: float = 0.15) -> Tensor:
    """Reward weights from unlock progress: focus on the newest unlocked aspect, floor for the passed.

    With :math:`U_K = 0`, the focus on aspect ``k`` is how far it is unlocked but not yet passed,
    and :math:`N` counts (softly) the passed aspects; :math:`\\rho` = ``floor``:

    .. math:: f_k = U_k - U_{k+1}, \\quad N = \\textstyle\\sum_{k<K-1} U_{k+1}

    .. math:: w_k = (1 - \\rho N) f_k + \\rho U_{k+1}

    The focus terms sum to :math:`U_0 - U_K = 1`, so :math:`\\sum_k w_k = 1`; every passed aspect
    keeps weight :math:`\\rho` and the current one gets the rest, at least :math:`1 - (K-1)\\rho`.

    Args:
        progress: Unlock progress from :func:`unlock_progress`, non-increasing, shape ``(K,)``.
        floor: Weight kept by each passed aspect, in ``[0, 1/K)``.

    Returns:
        Weights, non-negative, summing to 1, shape ``(K,)``, fp32.

    Raises:
        ValueError: If ``floor`` is out of range.
    """
    check_floor(floor, progress.shape[0])
    progress = progress.float()
    passed = torch.cat([progress[1:], progress.new_zeros(1)])  # U_{k+1}
    focus = progress - passed
    weights = (1.0 - floor * passed.sum()) * focus + floor * passed
    # Clamp only rounding noise; the formula is non-negative for non-increasing progress.
    weights = weights.clamp(min=0.0)
    return weights / weights.sum()


def stage_index(progress: Tensor) -> int:
    """The current stage: how many later aspects are more than half unlocked.

    .. math:: \\text{stage} = \\textstyle\\sum_{k \\ge 1} [U_k \\ge 1/2]

    Args:
        progress: Unlock progress, shape ``(K,)``.

    Returns:
        Stage in ``0 .. K-1``; ``0`` is the first aspect (fidelity).
    """
    return int((progress[1:] >= 0.5).sum().item())


def ratchet(previous: Tensor, current: Tensor) -> Tensor:
    """Progress that never goes back: the running maximum.

    .. math:: U_t = \\max(U_{t-1}, U^{\\text{raw}}_t)

    The maximum of two non-increasing sequences is non-increasing, so order is kept.

    Args:
        previous: Progress so far, shape ``(K,)``.
        current: Progress from the latest competence, shape ``(K,)``.

    Returns:
        Elementwise maximum, shape ``(K,)``.
    """
    return torch.maximum(previous.float(), current.float())



def tighten_strictness(
    strictness: Tensor, progress: Tensor, competence: Tensor, threshold: float, step: float
) -> tuple[Tensor, Tensor]:
    """Raise the strictness of graded aspects that are unlocked and competent.

    .. math:: s_k \\leftarrow \\min(1, s_k + \\Delta) \\quad\\text{if}\\quad U_k \\ge \\tfrac12,\\ c_k \\ge \\theta,\\ s_k < 1

    Args:
        strictness: ``(K,)`` strictness in ``[0, 1]``, NaN for aspects without a graded reward.
        progress: ``(K,)`` unlock progress :math:`U_k`.
        competence: ``(K,)`` competence :math:`c_k`.
        threshold: Competence :math:`\\theta` that counts as competent.
        step: Rise :math:`\\Delta` in ``(0, 1]``.

    Returns:
        The new ``(K,)`` strictness, and the ``(K,)`` bool mask of the aspects raised.

    Example:
        >>> tighten_strictness(torch.tensor([0.0, 0.5, float("nan")]), torch.ones(3), torch.tensor([0.9, 0.1, 0.9]), 0.7, 0.5)
        (tensor([0.5000, 0.5000,    nan]), tensor([ True, False, False]))
    """
    graded = ~torch.isnan(strictness)
    raised = graded & (progress >= 0.5) & (competence >= threshold) & (strictness < 1.0)
    if raised.any():
        strictness = torch.where(raised, (strictness + step).clamp(max=1.0), strictness)
    return strictness, raised
