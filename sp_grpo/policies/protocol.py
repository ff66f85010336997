"""The generator protocol every backbone adapter implements.

The rollout, the training step and the reference-model KL only talk to a generator through
:class:`VideoPolicy`; only the adapter knows the latent layout, the text encoder and the VAE.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

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

        ``latent_shape`` (one sample's) is for schedules whose shift depends on the video size (LTX):
        they raise without it. The schedule is a function of the two arguments alone.
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

    def decode(self, latents: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Decode ``(B, *latent_shape)`` latents to videos ``(B, T, 3, H, W)`` in ``[0, 1]``.

        ``generator`` (on the latents' device) is the source of any noise the decoder mixes in
        (LTX-Video's timestep-conditioned VAE); decoders that add none ignore it.
        """
        ...

    def reference(self) -> AbstractContextManager[None]:
        """Context in which :meth:`velocity` is the frozen reference model (LoRA disabled)."""
        ...

    @property
    def has_reference(self) -> bool:
        """Whether :meth:`reference` gives a model other than the policy itself."""
        ...


__all__ = ["PromptEmbeds", "VideoPolicy"]
