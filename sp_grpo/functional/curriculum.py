"""Self-paced curriculum maths: competence from per-aspect rewards, and weights from competence.

The curriculum moves the reward's emphasis through the aspects in order
``fidelity -> temporal -> semantic`` as the generator becomes competent at each. It has three
replaceable parts, each a pure function here:

1. :func:`update_competence` folds one batch of per-aspect rewards into a :class:`CompetenceState`
   (reference statistics, an EMA of the normalised level, of its improvement and of the
   within-group spread), and :func:`competence` reads a competence in ``[0, 1]`` per aspect off it.
2. :func:`unlock_progress` maps competence to how far each aspect is unlocked, through a smooth
   gate (:data:`GATES`).
3. :func:`stage_weights` maps unlock progress to reward weights: non-negative, summing to 1, with a
   floor that keeps earlier aspects from being forgotten.

Rewards are stacked per aspect, shape ``(K, P*G)``: ``K`` aspects in curriculum order, each row the
flat prompt-major rewards of a batch of ``P`` prompts with ``G`` samples each.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Literal

import torch
from torch import Tensor

#: The reward aspects in curriculum order.
ASPECTS: tuple[str, ...] = ("fidelity", "temporal", "semantic")

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


@dataclass(frozen=True)
class CompetenceState:
    """Running statistics behind the competence of ``K`` aspects. Every tensor has shape ``(K,)``.

    Attributes:
        steps: Number of batches folded in so far.
        ref_mean: Mean reward over the warm-up batches (the starting level).
        ref_std: Root-mean batch variance over the warm-up batches (the unit of progress).
        ref_spread: Mean pooled within-group spread over the warm-up batches.
        level: EMA of the normalised level :math:`z_t = (\\bar r_t - \\mu_0) / \\sigma_0`.
        trend: EMA of the per-step change of ``level`` (improvement, in :math:`\\sigma_0` per step).
        spread: EMA of the pooled within-group spread.
    """

    steps: int
    ref_mean: Tensor
    ref_std: Tensor
    ref_spread: Tensor
    level: Tensor
    trend: Tensor
    spread: Tensor

    @classmethod
    def initial(cls, num_aspects: int) -> "CompetenceState":
        """The state before any batch: all statistics zero.

        Args:
            num_aspects: ``K``.

        Returns:
            A fresh state.
        """
        zeros = torch.zeros(num_aspects, dtype=torch.float32)
        return cls(0, zeros, zeros, zeros, zeros, zeros, zeros)

    def to_dict(self) -> dict[str, int | list[float]]:
        """Plain Python values (for checkpoints and logs)."""
        out: dict[str, int | list[float]] = {"steps": self.steps}
        for f in fields(self):
            if f.name != "steps":
                out[f.name] = getattr(self, f.name).tolist()
        return out

    @classmethod
    def from_dict(cls, state: dict) -> "CompetenceState":
        """Inverse of :meth:`to_dict`.

        Args:
            state: A dict written by :meth:`to_dict`.

        Returns:
            The state.
        """
        return cls(
            steps=int(state["steps"]),
            **{
                f.name: torch.as_tensor(state[f.name], dtype=torch.float32)
                for f in fields(cls)
                if f.name != "steps"
            },
        )


def update_competence(
    state: CompetenceState,
    rewards: Tensor,
    group_size: int,
    decay: float = 0.9,
    warmup_steps: int = 20,
) -> CompetenceState:
    """Fold one batch of per-aspect rewards into the competence statistics.

    The first ``warmup_steps`` batches only calibrate the reference: the starting mean
    :math:`\\mu_0`, the unit :math:`\\sigma_0` (batch std) and the starting within-group spread
    :math:`\\varsigma_0`, each a running average over those batches. Afterwards, with batch mean
    :math:`\\bar r_t`, pooled within-group spread :math:`s_t` and :math:`\\beta` = ``decay``:

    .. math:: z_t = (\\bar r_t - \\mu_0) / \\sigma_0

    .. math:: L_t = \\beta L_{t-1} + (1 - \\beta) z_t

    .. math:: D_t = \\beta D_{t-1} + (1 - \\beta)(L_t - L_{t-1})

    .. math:: S_t = \\beta S_{t-1} + (1 - \\beta) s_t, \\quad S_{\\text{warm-up}} = \\varsigma_0

    Normalising by the run's own start makes one setting work for rewards of any scale.

    Args:
        state: Statistics so far.
        rewards: This batch's per-aspect rewards, shape ``(K, P*G)``; under several processes pass
            the rewards of all ranks.
        group_size: Samples per prompt ``G``.
        decay: EMA factor :math:`\\beta \\in [0, 1)`; the EMA averages over about
            :math:`1 / (1 - \\beta)` batches.
        warmup_steps: Batches that calibrate the reference before competence can grow (at least 1).

    Returns:
        The new state (the input is not modified).

    Raises:
        ValueError: If shapes disagree with the state or the settings are out of range.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"`decay` ({decay}) must be in [0, 1): it is the EMA factor; 0.9 averages ~10 batches.")
    if warmup_steps < 1:
        raise ValueError(f"`warmup_steps` ({warmup_steps}) must be at least 1: the reference needs one batch.")
    if rewards.dim() != 2 or rewards.shape[0] != state.level.shape[0]:
        raise ValueError(
            f"`rewards` must have shape (K={state.level.shape[0]}, P*G) to match the state, got "
            f"{tuple(rewards.shape)}; stack one row per aspect in curriculum order."
        )
    grouped = _grouped(rewards.detach().cpu(), group_size)  # (K, P, G), fp32
    mean = grouped.mean(dim=(1, 2))
    var = grouped.var(dim=(1, 2), correction=0)
    spread = grouped.var(dim=2, correction=0).mean(dim=1).sqrt()
    steps = state.steps + 1

    if steps <= warmup_steps:
        # Running averages of the calibration batches; variances average, not stds.
        frac = 1.0 / steps
        ref_var = state.ref_std.pow(2) + frac * (var - state.ref_std.pow(2))
        ref_spread = state.ref_spread + frac * (spread - state.ref_spread)
        return replace(
            state,
            steps=steps,
            ref_mean=state.ref_mean + frac * (mean - state.ref_mean),
            ref_std=ref_var.sqrt(),
            ref_spread=ref_spread,
            spread=ref_spread,
        )

    z = (mean - state.ref_mean) / state.ref_std.clamp(min=1e-6)
    level = decay * state.level + (1.0 - decay) * z
    return replace(
        state,
        steps=steps,
        level=level,
        trend=decay * state.trend + (1.0 - decay) * (level - state.level),
        spread=decay * state.spread + (1.0 - decay) * spread,
    )


def competence(
    state: CompetenceState,
    target_gain: float = 1.0,
    stall_slope: float = 0.01,
    warmup_steps: int = 20,
) -> Tensor:
    """Competence per aspect in ``[0, 1]``: mastered by improvement, or saturated.

    An aspect is competent when its level rose by ``target_gain`` reference stds (mastery
    :math:`m`), or when its within-group spread has shrunk while the level no longer improves
    (plateau :math:`q`): then its groups carry little advantage signal and staying on it
    teaches little.

    .. math:: m = \\mathrm{clip}(L / g^*, 0, 1)

    .. math:: a = \\mathrm{clip}(1 - S / \\varsigma_0, 0, 1), \\quad
              q = a \\cdot \\mathrm{clip}(1 - D / d^*, 0, 1)

    .. math:: c = \\max(m, q)

    with :math:`g^*` = ``target_gain`` and :math:`d^*` = ``stall_slope``. Competence is 0 during
    warm-up and for an aspect whose reference spread is 0 (no spread to shrink).

    Args:
        state: Statistics from :func:`update_competence`.
        target_gain: Improvement, in reference stds, that counts as mastery (> 0). Smaller is a
            faster curriculum.
        stall_slope: Improvement per step, in reference stds, below which the level counts as
            stalled (> 0).
        warmup_steps: The same value given to :func:`update_competence`.

    Returns:
        Competence, shape ``(K,)``, fp32.

    Raises:
        ValueError: If ``target_gain`` or ``stall_slope`` is not positive.
    """
    if target_gain <= 0:
        raise ValueError(f"`target_gain` ({target_gain}) must be positive: it is the improvement that counts as mastery.")
    if stall_slope <= 0:
        raise ValueError(f"`stall_slope` ({stall_slope}) must be positive: it is the slope below which progress stalls.")
    if state.steps <= warmup_steps:
        return torch.zeros_like(state.level)
    mastery = (state.level / target_gain).clamp(0.0, 1.0)
    has_spread = state.ref_spread > 1e-8
    shrink = torch.where(has_spread, 1.0 - state.spread / state.ref_spread.clamp(min=1e-8), 0.0).clamp(0.0, 1.0)
    stalled = (1.0 - state.trend / stall_slope).clamp(0.0, 1.0)
    return torch.maximum(mastery, shrink * stalled)


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
    if gate not in GATES:
        raise ValueError(f"`gate` ({gate!r}) must be one of {sorted(GATES)}.")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"`threshold` ({threshold}) must be in (0, 1): competence lives in [0, 1].")
    if width <= 0:
        raise ValueError(f"`width` ({width}) must be positive: it is the competence range over which a gate opens.")
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
    num = progress.shape[0]
    if not 0.0 <= floor < 1.0 / num:
        raise ValueError(
            f"`floor` ({floor}) must be in [0, 1/{num}) for {num} aspects: the current aspect must keep more "
            f"weight than each earlier one; set `floor` below {1.0 / num:.3f}."
        )
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

