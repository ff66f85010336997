r"""Competence at each reward aspect: a change that clears its own noise, a level, and learnability.

A curriculum should move on from an aspect when the generator has really got better at it, not when
one batch happened to draw easy prompts. Competence therefore has three parts, each a pure function
of a :class:`CompetenceState` and each in :math:`[0, 1]`:

1. **Progress** (:func:`progress_competence`): the mean gain of the groups over their prompts' own
   first scores, counted only once it is several standard errors above zero. The standard error
   comes from the groups' own statistics (within-group variance over ``G``), so the prompt mix of
   a batch is not mistaken for progress.
2. **Level** (:func:`level_competence`): the estimated level has reached a declared target (a reward
   level that counts as good). Off unless targets are given.
3. **Saturation** (:func:`saturation_competence`): the groups no longer separate their samples
   (the Hoyer sparsity of the groups, as in the paper's v4, fell clearly below its starting value)
   and the level no longer rises: staying on the aspect teaches little.

:func:`competence` is their maximum. Rewards are stacked per aspect, shape ``(K, P*G)``: ``K``
aspects in curriculum order, each row the flat prompt-major rewards of ``P`` prompts with ``G``
samples each.

The statistics themselves (the paired gain and its standard error) are kept by
:func:`~sp_grpo.functional.competence_stats.update_competence`; see
:mod:`sp_grpo.functional.competence_stats` for how the gain is estimated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sp_grpo.functional.competence_stats import CompetenceState, reset_aspects, update_competence

__all__ = [
    "CompetenceState",
    "check_competence_settings",
    "check_persistence",
    "competence",
    "gain_zscore",
    "level_competence",
    "persistent_competence",
    "progress_competence",
    "reset_aspects",
    "saturation_competence",
    "smoothstep",
    "update_competence",
]

_TINY = 1e-12


def smoothstep(x: Tensor, low: float | Tensor, high: float | Tensor) -> Tensor:
    """Cubic ramp from 0 at ``low`` to 1 at ``high``, flat outside.

    .. math:: u = \\mathrm{clip}((x - a) / (b - a), 0, 1), \\quad f(x) = 3u^2 - 2u^3

    Args:
        x: Values, any shape.
        low: :math:`a`.
        high: :math:`b > a`.

    Returns:
        Values in ``[0, 1]``, same shape, fp32.

    Example:
        >>> smoothstep(torch.tensor([0.0, 0.5, 1.0, 2.0]), 0.0, 1.0)
        tensor([0.0000, 0.5000, 1.0000, 1.0000])
    """
    u = ((x.float() - low) / (high - low)).clamp(0.0, 1.0)
    return u * u * (3.0 - 2.0 * u)


def gain_zscore(state: CompetenceState, decay: float = 0.9) -> Tensor:
    """How many standard errors the gain :math:`L` lies above zero.

    .. math:: z = L / \\sqrt{\\bar F \\tfrac{1 - \\beta}{1 + \\beta} + \\bar R}

    A gain without noise (constant rewards that changed) is infinitely significant; no gain and no
    noise gives 0.

    Args:
        state: Statistics from :func:`update_competence`.
        decay: The same :math:`\\beta` given to :func:`update_competence`.

    Returns:
        ``z``, shape ``(K,)``.
    """
    se = (state.fresh_var * (1.0 - decay) / (1.0 + decay) + state.ref_var).clamp(min=0.0).sqrt()
    exact = torch.where(state.gain.abs() > _TINY, state.gain.sign() * float("inf"), torch.zeros_like(state.gain))
    return torch.where(se > _TINY, state.gain / se.clamp(min=_TINY), exact)


def progress_competence(
    state: CompetenceState, target_gain: float = 1.0, significance: float = 3.0, decay: float = 0.9
) -> Tensor:
    """Competence from a real gain: size relative to the target, times a significance gate.

    .. math:: p = \\mathrm{clip}\\big(L / (g^* u), 0, 1\\big) \\cdot
              \\mathrm{smoothstep}(z;\\ \\zeta - 1,\\ \\zeta + 1)

    with :math:`g^*` = ``target_gain`` in units :math:`u` of the starting std of one reward
    (:attr:`CompetenceState.unit`), and :math:`\\zeta` = ``significance``.

    Args:
        state: Statistics from :func:`update_competence`.
        target_gain: Gain that counts as mastery, in starting stds of one reward (> 0).
        significance: z at which the gate is half open (> 1).
        decay: The EMA factor of the statistics.

    Returns:
        Shape ``(K,)``, in ``[0, 1]``.
    """
    size = (state.gain / (target_gain * state.unit).clamp(min=_TINY)).clamp(0.0, 1.0)
    return size * smoothstep(gain_zscore(state, decay).nan_to_num(posinf=1e6, neginf=-1e6), significance - 1.0, significance + 1.0)


def level_competence(state: CompetenceState, targets: Tensor, decay: float = 0.9) -> Tensor:
    """Competence from an absolute level: the estimated level has reached a declared target.

    The level is the warm-up's mean plus the gain, :math:`\\hat\\mu = \\mu_0 + L`, with standard
    error :math:`\\mathrm{SE}_\\mu^2 = \\sigma_0^2 / n_0 + \\mathrm{SE}^2`; with target :math:`t`:

    .. math:: \\ell = \\mathrm{smoothstep}\\big((\\hat\\mu - t) / \\mathrm{SE}_\\mu;\\ -1,\\ 1\\big)

    Args:
        state: Statistics from :func:`update_competence`.
        targets: Target level per aspect, shape ``(K,)``; NaN for aspects without one (they score 0).
        decay: The EMA factor of the statistics.

    Returns:
        Shape ``(K,)``, in ``[0, 1]``.
    """
    targets = targets.float()
    se = (
        state.ref_var_between / state.ref_groups.clamp(min=1.0)
        + state.fresh_var * (1.0 - decay) / (1.0 + decay)
        + state.ref_var
    ).clamp(min=_TINY).sqrt()
    level = smoothstep((state.ref_mean + state.gain - targets) / se, -1.0, 1.0)
    return torch.where(torch.isnan(targets), torch.zeros_like(level), level)


def saturation_competence(
    state: CompetenceState,
    saturation: float = 0.5,
    stall_slope: float = 0.01,
    significance: float = 3.0,
    decay: float = 0.9,
) -> Tensor:
    """Competence from saturation: the groups stopped separating their samples and the level stalled.

    With :math:`\\Delta h` the mean change of the groups' Hoyer sparsity against their reference
    (the prompt's first group, as for the gain) and :math:`h_b` the reference's mean, the relative
    drop :math:`\\delta = -\\Delta h / h_b` counts once it clears its noise
    (:math:`z_h = -\\Delta h / \\mathrm{SE}_h`), and only while the gain no longer rises
    (:math:`D` below ``stall_slope`` units :math:`u` per step):

    .. math:: q = \\mathrm{clip}(\\delta / \\delta^*, 0, 1)\\,
              \\mathrm{smoothstep}(z_h;\\ \\zeta - 1,\\ \\zeta + 1)\\,
              \\mathrm{clip}\\big(1 - D / (d^* u), 0, 1\\big)

    An aspect whose groups never separated (:math:`h_b = 0`) scores 0: there is no drop to see.

    Args:
        state: Statistics from :func:`update_competence`.
        saturation: :math:`\\delta^*`, the relative drop of sparsity that counts as saturated (in (0, 1]).
        stall_slope: :math:`d^*`, rise per step in units :math:`u` below which the level counts as stalled.
        significance: :math:`\\zeta`.
        decay: The EMA factor of the statistics.

    Returns:
        Shape ``(K,)``, in ``[0, 1]``.
    """
    has = state.sparsity_base > 1e-6
    drop = torch.where(has, -state.sparsity_change / state.sparsity_base.clamp(min=1e-6), 0.0)
    se = (state.sparsity_var * (1.0 - decay) / (1.0 + decay) + state.sparsity_ref_var).clamp(min=_TINY).sqrt()
    z = -state.sparsity_change / se
    stalled = (1.0 - state.trend / (stall_slope * state.unit).clamp(min=_TINY)).clamp(0.0, 1.0)
    return (drop / saturation).clamp(0.0, 1.0) * smoothstep(z, significance, significance + 2.0) * stalled * has


def check_competence_settings(target_gain: float, significance: float, saturation: float, stall_slope: float) -> None:
    """Check the settings of :func:`competence` (callbacks call it at construction, before any batch).

    Raises:
        ValueError: Naming the setting, its value and the allowed range.
    """
    if target_gain <= 0:
        raise ValueError(
            f"`target_gain` ({target_gain}) must be positive: it is the gain, in starting stds of one reward, that "
            "counts as mastery, e.g. 1.0."
        )
    if significance <= 1:
        raise ValueError(f"`significance` ({significance}) must be above 1: it is the z-score a gain must clear, e.g. 3.")
    if not 0.0 < saturation <= 1.0:
        raise ValueError(f"`saturation` ({saturation}) must be in (0, 1]: the relative drop of group sparsity, e.g. 0.5.")
    if stall_slope <= 0:
        raise ValueError(f"`stall_slope` ({stall_slope}) must be positive, e.g. 0.01.")


def competence(
    state: CompetenceState,
    target_gain: float = 1.0,
    significance: float = 3.0,
    targets: Tensor | None = None,
    saturation: float = 0.5,
    stall_slope: float = 0.01,
    warmup_steps: int = 20,
    decay: float = 0.9,
) -> Tensor:
    """Competence per aspect in ``[0, 1]``: the largest of progress, level and saturation.

    .. math:: c = \\max(p, \\ell, q)

    0 for an aspect still warming up.

    Args:
        state: Statistics from :func:`update_competence`.
        target_gain: See :func:`progress_competence`.
        significance: See :func:`progress_competence`.
        targets: See :func:`level_competence`; ``None``: no level part.
        saturation: See :func:`saturation_competence`.
        stall_slope: See :func:`saturation_competence`.
        warmup_steps: The same value given to :func:`update_competence`.
        decay: The same value given to :func:`update_competence`.

    Returns:
        Shape ``(K,)``, fp32.

    Raises:
        ValueError: If a setting is out of range.
    """
    check_competence_settings(target_gain, significance, saturation, stall_slope)
    parts = [
        progress_competence(state, target_gain, significance, decay),
        saturation_competence(state, saturation, stall_slope, significance, decay),
    ]
    if targets is not None:
        parts.append(level_competence(state, targets, decay))
    value = torch.stack(parts).amax(dim=0)
    return torch.where(state.steps > warmup_steps, value, torch.zeros_like(value))


def check_persistence(persistence: float) -> None:
    """Check the ``persistence`` of :func:`persistent_competence` (callbacks call it at construction).

    Raises:
        ValueError: If ``persistence`` is outside ``[0, 1)``.
    """
    if not 0.0 <= persistence < 1.0:
        raise ValueError(
            f"`persistence` ({persistence}) must be in [0, 1): 0 uses each step's competence as read, 0.9 "
            "averages about 10 steps."
        )


def persistent_competence(previous: Tensor, current: Tensor, persistence: float = 0.0) -> Tensor:
    """Competence that must persist: an EMA over steps of the competence read each step.

    .. math:: c_t = \\rho\\, c_{t-1} + (1 - \\rho)\\, \\hat c_t

    with :math:`\\hat c_t` from :func:`competence` and :math:`\\rho` = ``persistence``. Since both lie
    in ``[0, 1]``, one step moves :math:`c` by at most :math:`1 - \\rho`, so a curve of :math:`c` can
    be read by eye, and a competence that shows in a single batch (a chance crossing of the
    significance gate) moves :math:`c` only by that much. A competence held for :math:`n` steps
    reaches :math:`1 - \\rho^n` of its value. ``persistence = 0`` returns ``current``.

    Args:
        previous: :math:`c_{t-1}`, shape ``(K,)`` (zeros before the first step).
        current: :math:`\\hat c_t`, shape ``(K,)``.
        persistence: :math:`\\rho` in ``[0, 1)``.

    Returns:
        :math:`c_t`, shape ``(K,)``, fp32.

    Raises:
        ValueError: If ``persistence`` is outside ``[0, 1)``.

    Example:
        >>> persistent_competence(torch.zeros(2), torch.tensor([1.0, 0.5]), persistence=0.9)
        tensor([0.1000, 0.0500])
    """
    check_persistence(persistence)
    return persistence * previous.float() + (1.0 - persistence) * current.float()
