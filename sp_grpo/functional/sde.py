r"""One stochastic step of a flow-matching sampler, with the log-density GRPO needs.

Flow-matching convention used throughout (Wan, Flux, SD3 in diffusers):

.. math:: x_\sigma = (1 - \sigma)\, x_0 + \sigma\, \epsilon, \qquad v = \epsilon - x_0

Sigmas run from 1 (noise) to 0 (data) and a step goes from ``sigma`` to ``sigma_next < sigma``, so
:math:`dt = \sigma_{next} - \sigma < 0`. From a velocity prediction ``v`` the model's guesses of the
data and of the noise are

.. math:: \hat x_0 = x - \sigma v, \qquad \hat\epsilon = x + (1 - \sigma) v

and, because :math:`x_\sigma` is Gaussian given :math:`x_0`, the score is
:math:`\nabla \log p_\sigma(x) = -\hat\epsilon / \sigma`.

Why an SDE at all: the deterministic probability-flow ODE :math:`dx = v\, dt` gives a policy with no
density, so no policy-gradient ratio. Every reverse-time SDE

.. math:: dx = \left[v - \tfrac{g^2}{2} \nabla \log p_\sigma(x)\right] dt + g\, dW, \qquad dt < 0

has the *same marginals* :math:`p_\sigma` as the ODE for any diffusion coefficient :math:`g(\sigma)`
(the :math:`-\tfrac{g^2}{2}\nabla\log p` drift correction is what preserves them). Substituting the
score gives

.. math:: dx = \left[v + \tfrac{g^2}{2\sigma}\,(x + (1 - \sigma) v)\right] dt + g\, dW,

whose Euler-Maruyama step is a Gaussian :math:`\mathcal N(\mu, s^2)` with
:math:`s = g\sqrt{-dt}`. The three kinds differ only in :math:`\mu` and :math:`s`:

* ``"sde"`` (Flow-GRPO, Liu et al. 2025): :math:`g = \eta \sqrt{\sigma / (1 - \sigma)}`, which
  expands to the published
  :math:`\mu = x\,(1 + \tfrac{g^2}{2\sigma} dt) + v\,(1 + \tfrac{g^2 (1-\sigma)}{2\sigma})\, dt`.
* ``"dance"`` (DanceGRPO, Xue et al. 2025): constant :math:`g = \eta`, written as
  :math:`\mu = x + v\,dt - \tfrac{\eta^2}{2}\, \mathrm{score}\; dt` with the score from
  :math:`\hat x_0`; it is the same SDE with another :math:`g`.
* ``"cps"`` (coefficients-preserving sampling, Wang & Yu 2025): not an Euler-Maruyama step but a
  DDIM-like jump that re-noises :math:`\hat x_0` to ``sigma_next`` while keeping the total noise
  coefficient exactly ``sigma_next``: :math:`s = \sigma_{next} \sin(\eta\pi/2)`,
  :math:`\mu = (1 - \sigma_{next})\hat x_0 + \sqrt{\sigma_{next}^2 - s^2}\,\hat\epsilon`.

For every kind ``log_prob`` is the full Gaussian log-density. Flow-GRPO's public ``"cps"`` code
instead scores :math:`-(x_{next} - \mu)^2` (no :math:`1/2s^2`, no constants); that only rescales the
log-ratio, but clip ranges tuned there do not carry over unchanged.

With :math:`\eta = 0` every kind reduces to the Euler step :math:`x + v\,dt` of diffusers'
``FlowMatchEulerDiscreteScheduler``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = ["SDEKind", "SDEStepOutput", "check_sigma_schedule", "sde_step"]

SDEKind = Literal["sde", "cps", "dance"]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class SDEStepOutput:
    """Result of one :func:`sde_step`.

    Attributes:
        prev_sample: ``x`` at ``sigma_next``, same shape and dtype as the input ``sample``. When sampled
            here it stays differentiable through ``prev_mean`` (reparameterised); when passed in it is
            returned as given (cast to the sample's dtype).
        log_prob: ``(B,)`` fp32, mean over non-batch elements of the Gaussian log-density of
            ``prev_sample`` under :math:`\\mathcal N(\\text{prev\\_mean}, \\text{std}^2)`. Zero for
            samples whose step is deterministic (``std == 0``).
        prev_mean: fp32, same shape as ``sample``: the mean of the transition.
        std: fp32, shape ``(B, 1, ..., 1)`` (broadcastable to ``sample``): the transition's standard
            deviation.
    """

    prev_sample: Tensor
    log_prob: Tensor
    prev_mean: Tensor
    std: Tensor


# --- the three transition kernels ----------------------------------------------------------------
# Each maps fp32 (x, v, sigma, sigma_next, noise_level) to (mean, std); sigma and sigma_next are
# shaped (B, 1, ..., 1) so one batch can hold samples at different steps.
_Kernel = Callable[[Tensor, Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]


def _flow_grpo_kernel(
    x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float
) -> tuple[Tensor, Tensor]:
    r"""Flow-GRPO's marginal-preserving SDE, :math:`g = \eta\sqrt{\sigma/(1-\sigma)}`.

    .. math:: \mu = x\,(1 + \tfrac{g^2}{2\sigma} dt) + v\,(1 + \tfrac{g^2 (1-\sigma)}{2\sigma})\, dt,
        \quad s = g \sqrt{-dt}
    """
    dt = sigma_next - sigma
    # g is infinite at sigma == 1 (the first step of every schedule); like Flow-GRPO, evaluate it
    # with the next sigma there (Flow-GRPO uses the schedule's second sigma, which is sigma_next).
    one_minus = torch.where(sigma >= 1.0, 1.0 - sigma_next, 1.0 - sigma)
    g = noise_level * torch.sqrt(sigma / one_minus)
    mean = x * (1.0 + g**2 / (2.0 * sigma) * dt) + v * (1.0 + g**2 * (1.0 - sigma) / (2.0 * sigma)) * dt
    return mean, g * torch.sqrt(-dt)


def _cps_kernel(
    x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float
) -> tuple[Tensor, Tensor]:
    r"""Coefficients-preserving sampling: re-noise :math:`\hat x_0` to exactly ``sigma_next``.

    .. math:: s = \sigma_{next}\sin(\eta\pi/2), \quad
        \mu = (1-\sigma_{next})\hat x_0 + \sqrt{\sigma_{next}^2 - s^2}\,\hat\epsilon
    """
    x0_hat = x - sigma * v
    eps_hat = x + (1.0 - sigma) * v
    angle = noise_level * math.pi / 2.0
    std = sigma_next * math.sin(angle)
    # sqrt(sigma_next^2 - std^2) == sigma_next * cos(angle) exactly; the cosine form cannot go
    # negative by rounding and has no infinite gradient where the root is 0.
    mean = (1.0 - sigma_next) * x0_hat + sigma_next * math.cos(angle) * eps_hat
    return mean, std


def _dance_kernel(
    x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float
) -> tuple[Tensor, Tensor]:
    r"""DanceGRPO's SDE, constant :math:`g = \eta`.

    .. math:: \mathrm{score} = -\frac{x - (1-\sigma)\hat x_0}{\sigma^2}, \quad
        \mu = x + v\,dt - \tfrac{\eta^2}{2}\,\mathrm{score}\,dt, \quad s = \eta\sqrt{-dt}
    """
    dt = sigma_next - sigma
    x0_hat = x - sigma * v
    score = -(x - (1.0 - sigma) * x0_hat) / sigma**2
    mean = x + v * dt - 0.5 * noise_level**2 * score * dt
    return mean, noise_level * torch.sqrt(-dt)


_KERNELS: dict[str, _Kernel] = {"sde": _flow_grpo_kernel, "cps": _cps_kernel, "dance": _dance_kernel}


# --- public step ---------------------------------------------------------------------------------
def sde_step(
    model_output: Tensor,
    sample: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    *,
    kind: SDEKind = "sde",
    noise_level: float = 0.7,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    check_sigmas: bool = True,
) -> SDEStepOutput:
    r"""Take (or score) one stochastic step from ``sigma`` to ``sigma_next``.

    The transition is Gaussian, :math:`x_{next} \sim \mathcal N(\mu, s^2 I)`, with :math:`\mu, s` set
    by ``kind`` (see the module docstring for the three forms and their derivation). Without
    ``prev_sample`` a new sample is drawn, :math:`x_{next} = \mu + s\, z`; with it, the given sample is
    only scored (this is how the policy update re-evaluates a stored rollout).

    The log-density keeps its constants and is averaged, not summed, over the non-batch elements so
    that its scale (and the PPO ratio's) does not depend on the latent's resolution, as Flow-GRPO
    and DanceGRPO do:

    .. math:: \log p = \frac{1}{D}\sum_{j=1}^{D}\left[-\frac{(x_{next,j} - \mu_j)^2}{2 s^2}
        - \log s - \tfrac12\log 2\pi\right]

    where :math:`D` is the number of elements per sample. ``prev_sample`` enters it detached: the
    policy gradient flows through :math:`\mu` (i.e. ``model_output``) only.

    A sample whose ``std`` is 0 (``noise_level == 0``, or ``"cps"`` with ``sigma_next == 0``) takes a
    deterministic ODE step: ``prev_sample == prev_mean`` and its ``log_prob`` is 0 by convention (the
    density is a point mass; no ratio can be formed), never NaN or inf.

    Args:
        model_output: Predicted velocity :math:`v = \epsilon - x_0`, shape ``(B, ...)``
            (e.g. ``(B, C, F, H, W)``), any float dtype.
        sample: Current latent :math:`x_\sigma`, same shape as ``model_output``.
        sigma: Current noise level in ``(0, 1]``: a float, a 0-d tensor, or ``(B,)`` (one per sample).
        sigma_next: Next noise level in ``[0, sigma)``, same forms as ``sigma``.
        kind: ``"sde"`` (Flow-GRPO), ``"cps"`` (coefficients-preserving) or ``"dance"`` (DanceGRPO).
        noise_level: :math:`\eta \ge 0`; for ``"cps"`` at most 1 (it is an angle fraction of
            :math:`\pi/2`).
        prev_sample: Latent at ``sigma_next`` to score instead of sampling one, shape of ``sample``.
        generator: Random generator on ``sample``'s device, for reproducible sampling.
        noise: Standard-normal noise :math:`z` to use instead of drawing it, shape of ``sample``.
        check_sigmas: Check ``0 <= sigma_next < sigma <= 1``. Float sigmas are checked in Python for
            free; tensor sigmas on an accelerator cost a host sync per call, so a loop that checked
            its whole schedule once (:func:`check_sigma_schedule`) passes ``False``.

    Returns:
        :class:`SDEStepOutput` with ``prev_sample`` (dtype of ``sample``), ``log_prob`` ``(B,)``,
        ``prev_mean`` and ``std`` ``(B, 1, ..., 1)``, all fp32 except ``prev_sample``.

    Raises:
        ValueError: If ``kind`` is unknown, ``noise_level`` is out of range, a sigma is outside
            ``[0, 1]`` or ``sigma_next >= sigma``, a sigma tensor is not ``(B,)``, shapes differ, or
            both ``prev_sample`` and ``noise`` are given.

    Example:
        >>> x, v = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
        >>> out = sde_step(v, x, sigma=0.8, sigma_next=0.7, kind="sde", noise_level=0.7)
        >>> out.prev_sample.shape, out.log_prob.shape, out.std.shape
        (torch.Size([2, 4, 3]), torch.Size([2]), torch.Size([2, 1, 1]))
        >>> same = sde_step(v, x, 0.8, 0.7, prev_sample=out.prev_sample)
        >>> torch.allclose(same.log_prob, out.log_prob)
        True
    """
    _check_args(model_output, sample, kind, noise_level, prev_sample, noise)
    batch, ndim = sample.shape[0], sample.ndim
    sigma_b = _per_sample_sigma(sigma, "sigma", batch, ndim, sample.device)
    sigma_next_b = _per_sample_sigma(sigma_next, "sigma_next", batch, ndim, sample.device)
    floats_in_range = isinstance(sigma, float) and isinstance(sigma_next, float) and 0.0 <= sigma_next < sigma <= 1.0
    if check_sigmas and not floats_in_range:
        _check_sigmas(sigma_b, sigma_next_b)

    # fp32 maths: GRPO divides exp(log_prob) of two nearly equal policies, and in bf16 the means and
    # log-densities lose the few significant digits that ratio lives on.
    x = sample.float()
    v = model_output.float()
    prev_mean, std = _KERNELS[kind](x, v, sigma_b, sigma_next_b, float(noise_level))
    std = std.expand(batch, *([1] * (ndim - 1)))

    if prev_sample is None:
        if noise is None:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        next_x = prev_mean + std * noise.float()
    else:
        next_x = prev_sample.float()

    log_prob = _gaussian_log_prob(next_x.detach(), prev_mean, std)
    return SDEStepOutput(prev_sample=next_x.to(sample.dtype), log_prob=log_prob, prev_mean=prev_mean, std=std)


def _gaussian_log_prob(value: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    r"""Per-sample mean log-density of ``value`` under :math:`\mathcal N(mean, std^2)`; 0 where std is 0.

    .. math:: \frac{1}{D}\sum_j \left[-\frac{(x_j-\mu_j)^2}{2s^2} - \log s - \tfrac12\log 2\pi\right]

    Args:
        value: ``(B, ...)`` fp32.
        mean: ``(B, ...)`` fp32.
        std: ``(B, 1, ..., 1)`` fp32, non-negative.

    Returns:
        ``(B,)`` fp32.
    """
    stochastic = std > 0
    # Substitute 1 for a zero std before dividing so that neither the value nor its gradient is NaN;
    # those entries are then zeroed.
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    log_density = -((value - mean) ** 2) / (2.0 * safe_std**2) - torch.log(safe_std) - _LOG_SQRT_2PI
    log_density = torch.where(stochastic, log_density, torch.zeros_like(log_density))
    return log_density.reshape(log_density.shape[0], -1).mean(dim=1)


# --- validation ----------------------------------------------------------------------------------
def _check_args(
    model_output: Tensor,
    sample: Tensor,
    kind: str,
    noise_level: float,
    prev_sample: Tensor | None,
    noise: Tensor | None,
) -> None:
    """Raise a ValueError naming the setting and the fix for any bad non-sigma argument."""
    if kind not in _KERNELS:
        raise ValueError(
            f"`kind` ({kind!r}) is not a known SDE step; choose one of {list(get_args(SDEKind))}: "
            "'sde' (Flow-GRPO), 'cps' (coefficients-preserving) or 'dance' (DanceGRPO)."
        )
    if not noise_level >= 0:  # also rejects NaN
        raise ValueError(
            f"`noise_level` ({noise_level}) must be at least 0: it scales the injected noise; "
            "use 0 for a deterministic (ODE) step or a positive value such as 0.7."
        )
    if kind == "cps" and noise_level > 1:
        raise ValueError(
            f"`noise_level` ({noise_level}) must be at most 1 for kind 'cps': the noise is "
            "sigma_next * sin(noise_level * pi / 2), so 1 already means all of the next noise is fresh; "
            "set `noise_level` in [0, 1]."
        )
    if sample.ndim < 1:
        raise ValueError("`sample` must have a batch dimension first, got a 0-d tensor; pass shape (B, ...).")
    for name, tensor in (("model_output", model_output), ("prev_sample", prev_sample), ("noise", noise)):
        if tensor is not None and tensor.shape != sample.shape:
            raise ValueError(
                f"`{name}` shape {tuple(tensor.shape)} must equal `sample` shape {tuple(sample.shape)}: "
                "the step is element-wise; pass tensors for the same batch and latent layout."
            )
    if prev_sample is not None and noise is not None:
        raise ValueError(
            "`prev_sample` and `noise` were both given: `prev_sample` is only scored, so `noise` would be "
            "ignored; pass `noise` to sample, or `prev_sample` to score, not both."
        )


def _per_sample_sigma(value: float | Tensor, name: str, batch: int, ndim: int, device: torch.device) -> Tensor:
    """Turn a float, 0-d or ``(B,)`` sigma into an fp32 tensor shaped ``(B, 1, ..., 1)``."""
    # fp32 even for bf16 sigmas: sigma_next - sigma is a small difference of nearly equal numbers.
    # A float is filled in on the device (as_tensor would copy it from the host, a sync on a GPU).
    if isinstance(value, (float, int)):
        sig = torch.full((batch,), float(value), dtype=torch.float32, device=device)
    else:
        sig = torch.as_tensor(value, dtype=torch.float32, device=device)
    if sig.ndim == 0:
        sig = sig.expand(batch)
    if sig.shape != (batch,):
        raise ValueError(
            f"`{name}` has shape {tuple(sig.shape)}, expected a float or shape ({batch},) "
            f"(one per sample in the batch of {batch}); pass one sigma per sample."
        )
    return sig.reshape(batch, *([1] * (ndim - 1)))


def _check_sigmas(sigma: Tensor, sigma_next: Tensor) -> None:
    """Check 0 <= sigma_next < sigma <= 1 for every sample."""
    for name, sig in (("sigma", sigma), ("sigma_next", sigma_next)):
        bad = ~((sig >= 0) & (sig <= 1))
        if bad.any():
            raise ValueError(
                f"`{name}` must lie in [0, 1] (1 is pure noise, 0 is data), got {_rounded(sig[bad])}; "
                "pass the scheduler's sigmas (e.g. `scheduler.sigmas[i]`), not its timesteps in [0, 1000]."
            )
    bad = ~(sigma_next < sigma)
    if bad.any():
        raise ValueError(
            f"`sigma_next` {_rounded(sigma_next[bad])} must be smaller than `sigma` {_rounded(sigma[bad])}: "
            "sigmas run from 1 (noise) to 0 (data), so each step lowers sigma; pass `sigmas[i + 1]` as "
            "`sigma_next` for `sigmas[i]`."
        )


def check_sigma_schedule(sigmas: Tensor) -> None:
    """Check a whole schedule once: values in ``[0, 1]``, strictly decreasing.

    :func:`sde_step` checks each step's sigmas; on an accelerator that is a host sync per step. A
    sampling or training loop checks its schedule here once, on the CPU copy, and then passes
    ``check_sigmas=False`` to every step.

    Args:
        sigmas: ``(S + 1,)`` noise levels, from ~1 (noise) down to 0 (data).

    Raises:
        ValueError: If a sigma is outside ``[0, 1]`` or the schedule does not decrease, naming the step.

    Example:
        >>> check_sigma_schedule(torch.tensor([1.0, 0.5, 0.0]))
        >>> check_sigma_schedule(torch.tensor([1.0, 0.5, 0.5]))
        Traceback (most recent call last):
        ...
        ValueError: `sigma_next` [0.5] must be smaller than `sigma` [0.5]: sigmas run from 1 (noise) to 0 (data), so each step lowers sigma; pass `sigmas[i + 1]` as `sigma_next` for `sigmas[i]`.
    """
    sigmas = sigmas.detach().float().cpu()
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"A sigma schedule must be 1-d with at least 2 values (S + 1 for S steps); got shape {tuple(sigmas.shape)}.")
    _check_sigmas(sigmas[:-1], sigmas[1:])


def _rounded(values: Tensor) -> list[float]:
    """Values for an error message, without fp32 digits like 0.6000000238418579."""
    return [round(v, 6) for v in values.tolist()]
