"""The generator protocol every backbone adapter implements.

The rollout, the training step and the reference-model KL only talk to a generator through
:class:`VideoPolicy`; only the adapter knows the latent layout, the text encoder and the VAE.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch of samples.

    Treated as immutable: :meth:`guided` caches the two halves stacked, so the rollout's steps
    (and a micro-batch's policy and reference passes) concatenate them once, not on every call.

    Attributes:
        cond: ``(N, L, D)`` embeddings of the prompts.
        uncond: ``(N, L, D)`` embeddings of the negative prompt, or ``None`` when classifier-free
            guidance is off.
    """

    cond: Tensor
    uncond: Tensor | None
    _guided: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def guided(self) -> Tensor:
        """``(2N, L, D)``: ``cond`` rows, then ``uncond`` rows, the text of one batched guidance pass.

        Computed once and kept, except where keeping it would be wrong: embeddings that require
        grad (a cached result would hold last iteration's graph), and a result made under
        ``torch.inference_mode`` read outside it (an inference tensor cannot be saved for backward).
        """
        if self.uncond is None:
            raise ValueError("`PromptEmbeds.uncond` is None: encode the prompts with `guidance=True` for guided calls.")
        cached = self._guided
        if cached is not None and (not cached.is_inference() or torch.is_inference_mode_enabled()):
            return cached
        both = torch.cat([self.cond, self.uncond])
        if not both.requires_grad:
            self._guided = both
        return both

    def repeat_interleave(self, repeats: int) -> PromptEmbeds:
        """Repeat each row ``repeats`` times (prompt-major groups)."""
        uncond = None if self.uncond is None else self.uncond.repeat_interleave(repeats, dim=0)
        return PromptEmbeds(self.cond.repeat_interleave(repeats, dim=0), uncond)

    def index(self, idx: Tensor) -> PromptEmbeds:
        """Rows ``idx`` of the conditioning."""
        uncond = None if self.uncond is None else self.uncond[idx]
        return PromptEmbeds(self.cond[idx], uncond)


@runtime_checkable
class VideoPolicy(Protocol):
    """A text-to-video flow-matching generator, as GRPO sees it.

    Conventions: ``x_sigma = (1 - sigma) * x0 + sigma * noise`` and the network predicts the
    velocity ``noise - x0``; sigmas run from 1 (noise) to 0 (data).
    """

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (LoRA weights, or the whole transformer)."""
        ...

    def encode_prompts(self, prompts: Sequence[str], guidance: bool) -> PromptEmbeds:
        """Encode prompts once each; ``uncond`` is the negative prompt when ``guidance`` is True."""
        ...

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """Shape of one sample's latent (without the batch dimension) for a video of that size."""
        ...

    def sigmas(self, num_steps: int, latent_shape: Sequence[int] | None = None) -> Tensor:
        """``(num_steps + 1,)`` fp32 noise levels from ~1 down to 0, the scheduler's schedule.

        ``latent_shape`` (one sample's) is for schedules whose shift depends on the video size (LTX).
        """
        ...

    def velocity(self, latents: Tensor, sigma: Tensor, embeds: PromptEmbeds, guidance_scale: float) -> Tensor:
        """Predict the (guided) velocity.

        Args:
            latents: ``(B, *latent_shape)``.
            sigma: ``(B,)`` noise level of each sample.
            embeds: conditioning with ``B`` rows.
            guidance_scale: classifier-free guidance scale; 1 means no guidance.

        Returns:
            ``(B, *latent_shape)`` velocity, in the latents' dtype.
        """
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Decode ``(B, *latent_shape)`` latents to videos ``(B, T, 3, H, W)`` in ``[0, 1]``."""
        ...

    def reference(self) -> AbstractContextManager[None]:
        """Context in which :meth:`velocity` is the frozen reference model (LoRA disabled)."""
        ...

    @property
    def has_reference(self) -> bool:
        """Whether :meth:`reference` gives a model other than the policy itself."""
        ...


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


def _unwrapped_name(name: str) -> str:
    """A parameter's name as it appears in a state dict: without FSDP's and checkpointing's wrapper levels."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def omit_frozen_from_state_dict(module: nn.Module) -> None:
    """Leave frozen parameters out of ``module.state_dict()`` and do not require them when loading.

    Frozen weights (text encoder, VAE, the base transformer under LoRA) come from the pretrained
    folder; saving them would make every checkpoint as large as the model. With this, a Lightning
    checkpoint (and Lightning's ``EMAWeightAveraging``, which averages a copy of the module) holds
    only what training changes, and loading it with ``strict=True`` still checks every trainable key.
    Setting ``module.omit_frozen_in_state_dict = False`` turns the omission off. Under FSDP the hook
    runs after FSDP's own state-dict hooks, on the full or sharded tensors they produce.
    """

    def frozen_names() -> set[str]:
        return {
            _unwrapped_name(name) for name, param in module.named_parameters(remove_duplicate=False) if not param.requires_grad
        }

    def drop_frozen(mod: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        if not getattr(module, "omit_frozen_in_state_dict", True):
            return
        for name in frozen_names():
            state_dict.pop(prefix + name, None)

    def allow_missing_frozen(mod: nn.Module, incompatible_keys) -> None:
        # The keys are relative to the module being loaded, of which this one may be a child.
        frozen = frozen_names()
        incompatible_keys.missing_keys[:] = [
            key for key in incompatible_keys.missing_keys if not any(key == n or key.endswith("." + n) for n in frozen)
        ]

    module.register_state_dict_post_hook(drop_frozen)
    module.register_load_state_dict_post_hook(allow_missing_frozen)
