r"""Running statistics behind competence: per-prompt paired gains, their noise, and group sparsity.

:func:`update_competence` folds one batch of per-aspect rewards into a :class:`CompetenceState`;
:mod:`sp_grpo.functional.competence` reads competence off it. Rewards are stacked per aspect, shape
``(K, P*G)``: ``K`` aspects in curriculum order, each row the flat prompt-major rewards of ``P``
prompts with ``G`` samples each.

How the gain is estimated. Each prompt's first group after a reset is its baseline :math:`b_p`
(mean, and the variance of that mean :math:`v_{b,p} = \bar s^2 / G`, with :math:`\bar s^2` the
pooled within-group variance of its batch). A later group of the prompt
gives the paired difference :math:`d_p = \bar r_p - b_p`, so which prompts a batch drew does not
matter; a group of a prompt seen for the first time only sets its baseline. Without prompts,
every group is compared with the warm-up's mean of group means :math:`\mu_0` instead, with that
mean's spread across groups :math:`\sigma_0^2` as its noise (valid when batches draw prompts at
random). Per batch, with the :math:`n` groups compared:

.. math:: \hat g_t = \tfrac1n \textstyle\sum_p d_p, \quad
          F_t = \tfrac{1}{n^2}\textstyle\sum_p \mathrm{fresh}_p, \quad
          R_t = \tfrac{1}{n^2}\textstyle\sum_p \mathrm{ref}_p

where the fresh noise is :math:`\bar s^2 / G` (paired) or :math:`\sigma_0^2` (unpaired), and the
reference noise is :math:`v_{b,p}` (paired; independent across prompts) or, for the unpaired groups
together, :math:`\sigma_0^2 / n_0` (one shared error, that of :math:`\mu_0`). Fresh noise is
new every batch, so the EMA :math:`L` of :math:`\hat g_t` averages it down by
:math:`(1 - \beta) / (1 + \beta)`; reference noise repeats when prompts recur, so it is not
averaged down (an upper bound):

.. math:: \mathrm{SE}^2 = \bar F \tfrac{1 - \beta}{1 + \beta} + \bar R, \qquad z = L / \mathrm{SE}
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from sp_grpo.functional.reward_weighting import hoyer_sparsity

__all__ = ["CompetenceState", "reset_aspects", "update_competence"]


@dataclass(frozen=True)
class CompetenceState:
    """Running statistics of ``K`` aspects. Tensors have shape ``(K,)`` unless noted.

    Attributes:
        steps: Batches folded in per aspect since its last reset (long).
        ref_mean: :math:`\\mu_0`, mean of the warm-up batches' group means.
        ref_m2: Sum of squared deviations of those group means (Welford), for :math:`\\sigma_0^2`.
        ref_groups: :math:`n_0`, number of warm-up groups.
        ref_within: Mean within-group variance over the warm-up batches; :math:`\\varsigma_0^2`.
        ref_sparsity: Mean Hoyer sparsity of the warm-up groups, :math:`h_0`.
        ref_sparsity_var: Mean over the warm-up batches of the variance of a batch's mean sparsity
            (across its groups, over their number).
        gain: :math:`L`, EMA of the batch gain :math:`\\hat g_t`.
        trend: EMA of the per-step change of :math:`L`.
        fresh_var: EMA of :math:`F_t`.
        ref_var: EMA of :math:`R_t`.
        sparsity_change: EMA of the batch's mean change of group sparsity against the same
            comparison as the gain (the prompt's first group, or :math:`h_0`), :math:`\Delta h`.
        sparsity_var: EMA of the fresh variance of that batch mean (from the spread across groups).
        sparsity_ref_var: EMA of the variance of its reference part (not averaged down over batches).
        sparsity_base: EMA of the mean reference sparsity of the compared groups, :math:`h_b`.
        baselines: Prompt -> ``(3, K)`` tensor: first group mean, the variance of that mean, and the
            group's Hoyer sparsity; NaN where an aspect has no baseline yet. At most ``max_prompts``
            entries, oldest dropped.
    """

    steps: Tensor
    ref_mean: Tensor
    ref_m2: Tensor
    ref_groups: Tensor
    ref_within: Tensor
    ref_sparsity: Tensor
    ref_sparsity_var: Tensor
    gain: Tensor
    trend: Tensor
    fresh_var: Tensor
    ref_var: Tensor
    sparsity_change: Tensor
    sparsity_var: Tensor
    sparsity_ref_var: Tensor
    sparsity_base: Tensor
    baselines: dict[str, Tensor]

    @classmethod
    def initial(cls, num_aspects: int) -> "CompetenceState":
        """The state before any batch.

        Args:
            num_aspects: ``K``.

        Returns:
            A fresh state: zero statistics, no baselines.
        """
        zeros = torch.zeros(num_aspects, dtype=torch.float32)
        tensors = {f.name: zeros for f in fields(cls) if f.name not in ("steps", "baselines")}
        return cls(steps=torch.zeros(num_aspects, dtype=torch.long), baselines={}, **tensors)

    @property
    def ref_var_between(self) -> Tensor:
        """:math:`\\sigma_0^2`: variance of the warm-up group means (0 with fewer than 2 groups)."""
        return self.ref_m2 / (self.ref_groups - 1.0).clamp(min=1.0)

    @property
    def ref_spread(self) -> Tensor:
        """:math:`\\varsigma_0`: the warm-up's within-group standard deviation."""
        return self.ref_within.clamp(min=0.0).sqrt()

    @property
    def unit(self) -> Tensor:
        """The unit of gain: the starting std of one reward, :math:`u = \\sqrt{\\varsigma_0^2 + \\sigma_0^2}`.

        Within-group noise plus the spread between groups (prompts), so a gain of one unit is larger
        than what the draw of prompts or samples moves a batch's mean by.
        """
        return (self.ref_within + self.ref_var_between).clamp(min=0.0).sqrt()

    def to_dict(self) -> dict:
        """Plain Python values (for checkpoints)."""
        out: dict = {f.name: getattr(self, f.name).tolist() for f in fields(self) if f.name != "baselines"}
        out["baselines"] = {prompt: value.tolist() for prompt, value in self.baselines.items()}
        return out

    @classmethod
    def from_dict(cls, state: dict) -> "CompetenceState":
        """Inverse of :meth:`to_dict`.

        Args:
            state: A dict written by :meth:`to_dict`.

        Returns:
            The state.
        """
        values = {
            f.name: torch.as_tensor(state[f.name], dtype=torch.long if f.name == "steps" else torch.float32)
            for f in fields(cls)
            if f.name != "baselines"
        }
        baselines = {p: torch.as_tensor(v, dtype=torch.float32) for p, v in state["baselines"].items()}
        return cls(baselines=baselines, **values)


def _ema(old: Tensor, new: Tensor, decay: float) -> Tensor:
    return decay * old + (1.0 - decay) * new


def update_competence(
    state: CompetenceState,
    rewards: Tensor,
    group_size: int,
    prompts: list[str] | None = None,
    decay: float = 0.9,
    warmup_steps: int = 20,
    max_prompts: int = 4096,
) -> CompetenceState:
    """Fold one batch of per-aspect rewards into the statistics (see the module docstring).

    An aspect's first ``warmup_steps`` batches (after the start or a :func:`reset_aspects`) calibrate
    its reference: :math:`\\mu_0`, :math:`\\sigma_0^2`, :math:`\\varsigma_0^2` and :math:`h_0`.
    Afterwards, with :math:`\\beta` = ``decay``:

    .. math:: L_t = \\beta L_{t-1} + (1 - \\beta) \\hat g_t, \\quad
              D_t = \\beta D_{t-1} + (1 - \\beta)(L_t - L_{t-1})

    and EMAs of :math:`F_t`, :math:`R_t` and of the groups' change of Hoyer sparsity against the
    same references as the gain (with its noise). A batch with no group to compare (all prompts new)
    leaves these statistics as they were. Every group of a prompt without a baseline becomes that
    prompt's baseline (warm-up included).

    Args:
        state: Statistics so far.
        rewards: Per-aspect rewards, shape ``(K, P*G)``; under several processes pass the rewards
            of all ranks.
        group_size: Samples per prompt ``G`` (at least 2).
        prompts: The ``P*G`` prompts (prompt-major, each repeated ``G`` times), or ``None``; without
            them every group is compared with :math:`\\mu_0`.
        decay: EMA factor :math:`\\beta \\in [0, 1)`; about :math:`1/(1-\\beta)` batches are averaged.
        warmup_steps: Calibration batches per aspect (at least 1).
        max_prompts: Most baselines kept; the oldest are dropped (and re-made on the next visit).

    Returns:
        The new state (the input is not modified).

    Raises:
        ValueError: If shapes disagree or a setting is out of range.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"`decay` ({decay}) must be in [0, 1): it is the EMA factor; 0.9 averages ~10 batches.")
    if warmup_steps < 1:
        raise ValueError(f"`warmup_steps` ({warmup_steps}) must be at least 1: the reference needs one batch.")
    if max_prompts < 1:
        raise ValueError(f"`max_prompts` ({max_prompts}) must be at least 1.")
    if group_size < 2:
        raise ValueError(
            f"`group_size` ({group_size}) must be at least 2: a group's spread needs two samples; "
            "set `group_size` to 2 or more."
        )
    num = state.steps.shape[0]
    if rewards.dim() != 2 or rewards.shape[0] != num or rewards.shape[1] % group_size != 0:
        raise ValueError(
            f"`rewards` must have shape (K={num}, P*G) with P*G a multiple of group_size={group_size}, got "
            f"{tuple(rewards.shape)}; stack one row per aspect in curriculum order, whole groups only."
        )
    rewards = rewards.detach().cpu().float()
    grouped = rewards.reshape(num, -1, group_size)  # (K, P, G)
    n_groups = grouped.shape[1]
    if prompts is not None and len(prompts) != rewards.shape[1]:
        raise ValueError(f"`prompts` has {len(prompts)} entries for {rewards.shape[1]} rewards; pass one per sample.")
    means = grouped.mean(dim=2)  # (K, P)
    within = grouped.var(dim=2, correction=1)  # (K, P), unbiased
    # Variance of each group mean from the batch's pooled within-group variance: a few samples of a
    # skewed reward (e.g. mostly 0) often have zero spread, and a per-group estimate of 0 would make
    # a chance difference look certain.
    mean_var = within.mean(dim=1, keepdim=True).expand_as(means) / group_size
    group_sparsity = hoyer_sparsity(rewards, group_size)  # (K, P)
    batch_sparsity = group_sparsity.mean(dim=1)  # (K,)
    # Variance of the batch's mean sparsity, from the spread across its groups (prompt mix included).
    batch_sparsity_var = (
        group_sparsity.var(dim=1, correction=1) / n_groups if n_groups > 1 else torch.zeros(num)
    )

    # Baselines as they were before this batch, per group.
    group_prompts = list(prompts[::group_size]) if prompts is not None else [None] * n_groups
    nan = torch.full((3, num), float("nan"))
    base = torch.stack([state.baselines.get(p, nan) if p is not None else nan for p in group_prompts], dim=2)
    paired = ~torch.isnan(base[0])  # (K, P)

    warm = state.steps < warmup_steps  # (K,): this batch calibrates
    steps = state.steps + 1

    # -- warm-up: Welford merge of this batch's group means into the reference -----------------------
    count = state.ref_groups + n_groups
    batch_mean = means.mean(dim=1)
    batch_m2 = (means - batch_mean[:, None]).pow(2).sum(dim=1)
    delta = batch_mean - state.ref_mean
    ref_mean = state.ref_mean + delta * n_groups / count
    ref_m2 = state.ref_m2 + batch_m2 + delta.pow(2) * state.ref_groups * n_groups / count
    frac = 1.0 / steps.float()
    ref_within = state.ref_within + frac * (within.mean(dim=1) - state.ref_within)
    ref_sparsity = state.ref_sparsity + frac * (batch_sparsity - state.ref_sparsity)
    ref_sparsity_var = state.ref_sparsity_var + frac * (batch_sparsity_var - state.ref_sparsity_var)

    # -- after warm-up: gain, its noise, sparsity ----------------------------------------------------
    # With prompts, only groups of prompts seen before count (paired); without, every group (unpaired).
    used = paired if prompts is not None else torch.ones_like(paired)
    n_used = used.sum(dim=1)  # (K,)
    var_between = state.ref_var_between
    diff = torch.where(paired, means - base[0], means - state.ref_mean[:, None])
    fresh = torch.where(paired, mean_var, var_between[:, None].expand_as(means))
    denominator = n_used.clamp(min=1).float()
    batch_gain = torch.where(used, diff, 0.0).sum(dim=1) / denominator
    batch_fresh = torch.where(used, fresh, 0.0).sum(dim=1) / denominator**2
    # Paired baselines are independent of each other; the unpaired groups share one error, mu_0's.
    unpaired_share = (used & ~paired).float().sum(dim=1) / denominator
    batch_reference = (
        torch.where(used & paired, base[1], 0.0).sum(dim=1) / denominator**2
        + unpaired_share.pow(2) * var_between / state.ref_groups.clamp(min=1.0)
    )
    # The gain statistics start at the first batch after warm-up that has a group to compare.
    first = state.fresh_var == 0
    gain = _ema(state.gain, batch_gain, decay)
    fresh_var = torch.where(first, batch_fresh, _ema(state.fresh_var, batch_fresh, decay))
    ref_var = torch.where(first, batch_reference, _ema(state.ref_var, batch_reference, decay))
    counted = n_used > 0  # a batch with nothing to compare leaves the gain statistics alone
    gain = torch.where(counted, gain, state.gain)
    fresh_var = torch.where(counted, fresh_var, state.fresh_var)
    ref_var = torch.where(counted, ref_var, state.ref_var)
    # Separation, compared like the gain: each group's sparsity against its prompt's first group's
    # (or h_0 without prompts). Part of a paired difference's variance is the baseline's, which
    # repeats when prompts recur; sparsity of a few samples has heavy tails, so the whole per-batch
    # variance is also counted as not averaging down (an upper bound).
    h_ref = torch.where(paired, base[2], state.ref_sparsity[:, None].expand_as(means))
    h_diff = group_sparsity - h_ref
    batch_change = torch.where(used, h_diff, 0.0).sum(dim=1) / denominator
    deviation = torch.where(used, h_diff - batch_change[:, None], 0.0)
    spread_ok = n_used >= 2
    batch_change_var = deviation.pow(2).sum(dim=1) / (n_used - 1).clamp(min=1) / denominator
    paired_share = (used & paired).float().sum(dim=1) / denominator
    batch_change_ref = paired_share * batch_change_var + unpaired_share.pow(2) * 2.0 * state.ref_sparsity_var / warmup_steps
    batch_base = torch.where(used, h_ref, 0.0).sum(dim=1) / denominator
    sparsity_ok = counted & spread_ok
    first_sparsity = state.sparsity_var == 0
    sparsity_change = torch.where(sparsity_ok, _ema(state.sparsity_change, batch_change, decay), state.sparsity_change)
    sparsity_var = torch.where(
        sparsity_ok,
        torch.where(first_sparsity, batch_change_var, _ema(state.sparsity_var, batch_change_var, decay)),
        state.sparsity_var,
    )
    sparsity_ref_var = torch.where(
        sparsity_ok,
        torch.where(first_sparsity, batch_change_ref, _ema(state.sparsity_ref_var, batch_change_ref, decay)),
        state.sparsity_ref_var,
    )
    sparsity_base = torch.where(
        sparsity_ok,
        torch.where(first_sparsity, batch_base, _ema(state.sparsity_base, batch_base, decay)),
        state.sparsity_base,
    )

    def pick(during: Tensor, after: Tensor) -> Tensor:
        return torch.where(warm, during, after)

    new = replace(
        state,
        steps=steps,
        ref_mean=pick(ref_mean, state.ref_mean),
        ref_m2=pick(ref_m2, state.ref_m2),
        ref_groups=pick(count, state.ref_groups),
        ref_within=pick(ref_within, state.ref_within),
        ref_sparsity=pick(ref_sparsity, state.ref_sparsity),
        ref_sparsity_var=pick(ref_sparsity_var, state.ref_sparsity_var),
        gain=pick(state.gain, gain),
        trend=pick(state.trend, torch.where(counted, _ema(state.trend, gain - state.gain, decay), state.trend)),
        fresh_var=pick(state.fresh_var, fresh_var),
        ref_var=pick(state.ref_var, ref_var),
        sparsity_change=pick(state.sparsity_change, sparsity_change),
        sparsity_var=pick(state.sparsity_var, sparsity_var),
        sparsity_ref_var=pick(state.sparsity_ref_var, sparsity_ref_var),
        sparsity_base=pick(state.sparsity_base, sparsity_base),
        baselines=dict(state.baselines),
    )
    # New baselines: the first group of each prompt that has none (per aspect).
    if prompts is not None:
        for index, prompt in enumerate(group_prompts):
            old = new.baselines.get(prompt)
            fresh_base = torch.stack([means[:, index], mean_var[:, index], group_sparsity[:, index]])
            if old is None:
                new.baselines[prompt] = fresh_base
            elif torch.isnan(old[0]).any():
                new.baselines[prompt] = torch.where(torch.isnan(old), fresh_base, old)
        while len(new.baselines) > max_prompts:
            new.baselines.pop(next(iter(new.baselines)))
    return new


def reset_aspects(state: CompetenceState, mask: Tensor) -> CompetenceState:
    """Forget everything about the aspects in ``mask``: they warm up again from their next batch.

    Used when an aspect's reward changes meaning (e.g. it grew stricter), so gains measured
    against the old reward would be wrong.

    Args:
        state: Statistics so far.
        mask: Boolean, shape ``(K,)``: the aspects to reset.

    Returns:
        The new state (the input is not modified).
    """
    mask = mask.bool()
    values = {
        f.name: torch.where(mask, torch.zeros_like(getattr(state, f.name)), getattr(state, f.name))
        for f in fields(state)
        if f.name != "baselines"
    }
    baselines = {p: torch.where(mask[None, :], float("nan"), v) for p, v in state.baselines.items()}
    return CompetenceState(baselines=baselines, **values)
