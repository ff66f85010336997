r"""Policy-gradient losses for GRPO: the PPO clipped surrogate and the Gaussian KL to a reference.

Both work on quantities produced by :func:`sp_grpo.functional.sde.sde_step`: ``log_ratio`` is the
difference of two of its ``log_prob`` outputs (current policy minus rollout policy) and
:func:`gaussian_kl` compares two of its ``prev_mean`` outputs under the shared ``std``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SurrogateOutput", "clipped_surrogate", "gaussian_kl"]


@dataclass
class SurrogateOutput:
    """Result of :func:`clipped_surrogate`; every field is a 0-d fp32 tensor.

    Attributes:
        loss: The clipped surrogate to minimise (carries the gradient).
        clip_frac: Fraction of elements whose ratio lies outside the clip range, detached.
        approx_kl: Schulman's k3 estimate of KL(old || new), :math:`\\mathbb E[(r - 1) - \\log r]`, detached.
        ratio_mean: Mean probability ratio :math:`r`, detached.
    """

    loss: Tensor
    clip_frac: Tensor
    approx_kl: Tensor
    ratio_mean: Tensor


def clipped_surrogate(
    log_ratio: Tensor, advantages: Tensor, clip_range: float | tuple[float, float]
) -> SurrogateOutput:
    r"""PPO's clipped policy loss.

    With :math:`r = \exp(\text{log\_ratio})` and clip range :math:`(\epsilon_{lo}, \epsilon_{hi})`:

    .. math:: L = \mathrm{mean}\left(\max\big(-A\,r,\; -A\,\mathrm{clip}(r, 1 - \epsilon_{lo},
        1 + \epsilon_{hi})\big)\right)

    The max takes the pessimistic bound, so once the ratio has moved past the clip range in the
    direction the advantage favours, that element's gradient is zero.

    Args:
        log_ratio: :math:`\log \pi_\theta(a) - \log \pi_{old}(a)`, e.g. ``(B,)``.
        advantages: Same shape as ``log_ratio``; treated as constants (pass them detached).
        clip_range: :math:`\epsilon` for a symmetric range, or ``(lo, hi)`` for
            :math:`[1 - lo, 1 + hi]`; ``0 < lo < 1`` and ``hi > 0``.

    Returns:
        :class:`SurrogateOutput` with ``loss``, ``clip_frac``, ``approx_kl`` and ``ratio_mean``.

    Raises:
        ValueError: If the shapes differ or ``clip_range`` is not positive (lower part below 1).

    Example:
        >>> out = clipped_surrogate(torch.zeros(4), torch.tensor([1.0, -1.0, 2.0, 0.0]), 0.2)
        >>> out.loss, out.clip_frac
        (tensor(-0.5000), tensor(0.))
    """
    if log_ratio.shape != advantages.shape:
        raise ValueError(
            f"`log_ratio` shape {tuple(log_ratio.shape)} must equal `advantages` shape {tuple(advantages.shape)}: "
            "each log-ratio is weighted by its own sample's advantage; index the advantages like the log-ratios."
        )
    low, high = _clip_bounds(clip_range)
    # fp32: exp() of a bf16 log-ratio near 0 is quantised to steps of ~0.008, as wide as the clip range.
    log_ratio = log_ratio.float()
    advantages = advantages.float()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        clip_frac = ((ratio < 1.0 - low) | (ratio > 1.0 + high)).float().mean()
        approx_kl = ((ratio - 1.0) - log_ratio).mean()
        ratio_mean = ratio.mean()
    return SurrogateOutput(loss=loss, clip_frac=clip_frac, approx_kl=approx_kl, ratio_mean=ratio_mean)


def _clip_bounds(clip_range: float | tuple[float, float]) -> tuple[float, float]:
    """Return ``(lo, hi)`` from a float or pair, checking ``0 < lo < 1`` and ``hi > 0``."""
    low, high = (clip_range, clip_range) if isinstance(clip_range, (int, float)) else tuple(clip_range)
    if not (0 < low < 1 and high > 0):
        raise ValueError(
            f"`clip_range` ({clip_range!r}) must be positive, with its lower part below 1: the ratio is kept in "
            f"[1 - lo, 1 + hi] = [{1 - low}, {1 + high}]; use e.g. 0.2, or (lo, hi) with 0 < lo < 1 and hi > 0. "
            "Flow-matching GRPO typically uses a much smaller value such as 1e-4."
        )
    return float(low), float(high)


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    r"""KL divergence between two Gaussian transitions that share their std, per sample.

    .. math:: \mathrm{KL}_b = \frac{1}{D} \sum_{j=1}^{D} \frac{(\mu_{b,j} - \mu^{ref}_{b,j})^2}{2 s_{b,j}^2}

    i.e. :math:`\mathrm{KL}(\mathcal N(\mu, s^2) \,\|\, \mathcal N(\mu^{ref}, s^2))` averaged over the
    :math:`D` non-batch elements, the same reduction as ``sde_step``'s ``log_prob``. Elements with
    ``std == 0`` (a deterministic ODE step) contribute 0, never NaN or inf.

    Args:
        mean: ``(B, ...)`` mean of the current policy's transition (``prev_mean``).
        ref_mean: ``(B, ...)`` mean of the reference policy's transition.
        std: Shared std, broadcastable to ``mean``, typically ``(B, 1, ..., 1)``.

    Returns:
        ``(B,)`` fp32.

    Raises:
        ValueError: If ``mean`` and ``ref_mean`` differ in shape, ``mean`` has no batch dimension, or
            ``std`` does not broadcast to ``mean``.

    Example:
        >>> gaussian_kl(torch.ones(2, 3), torch.zeros(2, 3), torch.full((2, 1), 0.5))
        tensor([2., 2.])
    """
    if mean.shape != ref_mean.shape:
        raise ValueError(
            f"`mean` shape {tuple(mean.shape)} must equal `ref_mean` shape {tuple(ref_mean.shape)}: "
            "both are transition means for the same samples; evaluate both policies on the same batch."
        )
    if mean.ndim < 1:
        raise ValueError("`mean` must have a batch dimension first, got a 0-d tensor; pass shape (B, ...).")
    try:
        std = torch.broadcast_to(std, mean.shape)
    except RuntimeError as err:
        raise ValueError(
            f"`std` shape {tuple(std.shape)} does not broadcast to `mean` shape {tuple(mean.shape)}; "
            "pass `sde_step(...).std`, shaped (B, 1, ..., 1)."
        ) from err
    # fp32: the squared difference of two nearly equal bf16 means is mostly rounding error.
    std = std.float()
    stochastic = std > 0
    # Divide by 1 where std is 0 so neither the value nor its gradient becomes NaN; zero those after.
    safe_var = torch.where(stochastic, std, torch.ones_like(std)) ** 2
    kl = (mean.float() - ref_mean.float()) ** 2 / (2.0 * safe_var)
    kl = torch.where(stochastic, kl, torch.zeros_like(kl))
    return kl.reshape(kl.shape[0], -1).mean(dim=1)
