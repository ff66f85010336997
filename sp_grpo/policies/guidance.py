"""Classifier-free guidance around a network call, and whether its two halves run as one batch."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from sp_grpo.policies.protocol import PromptEmbeds

CFGBatching = Literal["auto"] | bool

#: Whether one batched guidance pass of ``2B`` rows beat two passes of ``B`` rows, per device type,
#: as measured by ``benchmarks/cfg_batching.py`` (README, "Performance"). 2-core CPU, tiny Wans of
#: configs/tiny.yaml and benchmarks/iteration_overhead.py: batched / two passes 0.58-0.86 in the
#: rollout and 0.60-0.86 in the update (1 and 2 threads); H100: 0.63 in the rollout
#: (benchmarks/rollout_overhead.py). Devices not listed get the batched pass.
BATCHED_CFG_IS_FASTER: dict[str, bool] = {"cpu": True, "cuda": True}


def cfg_batched_on(device: torch.device, setting: CFGBatching) -> bool:
    """Whether guidance runs as one batched pass on ``device`` under the ``cfg_batched`` setting.

    ``True`` and ``False`` are obeyed; ``"auto"`` looks the device type up in
    :data:`BATCHED_CFG_IS_FASTER`, the measured choice. (Batched was faster on every device
    measured so far, CPUs included; a device where two passes win is one entry there.)

    Example:
        >>> cfg_batched_on(torch.device("cpu"), "auto"), cfg_batched_on(torch.device("cpu"), False)
        (True, False)
    """
    if setting == "auto":
        return BATCHED_CFG_IS_FASTER.get(device.type, True)
    return bool(setting)


def cfg_velocity(
    forward, latents: Tensor, sigma: Tensor, embeds: PromptEmbeds, guidance_scale: float, batched: bool
) -> Tensor:
    """Classifier-free guidance around a conditional network call.

    .. math:: v = v_u + w (v_c - v_u)

    Args:
        forward: ``forward(latents, sigma, text) -> velocity``, the raw network call.
        latents: ``(B, ...)`` latents.
        sigma: ``(B,)`` noise levels.
        embeds: conditioning with ``B`` rows; ``uncond`` is needed when ``guidance_scale != 1``.
        guidance_scale: the guidance weight ``w``.
        batched: run the conditional and unconditional halves in one forward pass of ``2B`` rows
            instead of two passes (see :func:`cfg_batched_on` for which is faster where).

    Returns:
        ``(B, ...)`` guided velocity.

    Example:
        >>> net = lambda x, sigma, text: x + text.sum(dim=(1, 2)).view(-1, 1)
        >>> embeds = PromptEmbeds(cond=torch.ones(1, 2, 1), uncond=torch.zeros(1, 2, 1))
        >>> cfg_velocity(net, torch.zeros(1, 3), torch.ones(1), embeds, guidance_scale=3.0, batched=True)
        tensor([[6., 6., 6.]])
    """
    if guidance_scale == 1.0 or embeds.uncond is None:
        return forward(latents, sigma, embeds.cond)
    if batched:
        both = forward(torch.cat([latents, latents]), torch.cat([sigma, sigma]), embeds.guided())
        v_cond, v_uncond = both.chunk(2)
    else:
        v_cond = forward(latents, sigma, embeds.cond)
        v_uncond = forward(latents, sigma, embeds.uncond)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


__all__ = ["BATCHED_CFG_IS_FASTER", "CFGBatching", "cfg_batched_on", "cfg_velocity"]
