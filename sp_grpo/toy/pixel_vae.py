"""The identity as a VAE, for generators that work on pixels (the shapes world's).

The shapes world's transformer denoises the RGB frames themselves, scaled to ``[-1, 1]`` and laid
out ``(3, T, H, W)``. :class:`PixelSpaceVAE` gives :class:`~sp_grpo.policies.WanPolicy` the parts of
diffusers' ``AutoencoderKLWan`` it reads, with strides 1, three channels, mean 0 and std 1, so the
policy needs no pixel-space case of its own. A diffusers folder has no ``vae/`` for it: diffusers
pipelines know it as ``vae=None``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor, nn


class PixelSpaceVAE(nn.Module):
    """A VAE whose latents are the pixels: ``decode`` returns its input.

    It holds no weights, so a policy's ``state_dict`` is the same with it as without a VAE.

    Attributes:
        config: What ``WanPolicy`` reads of a Wan VAE's config: ``z_dim`` 3, ``scale_factor_temporal``
            and ``scale_factor_spatial`` 1, ``latents_mean`` 0 and ``latents_std`` 1 per channel.

    Example:
        >>> z = torch.rand(1, 3, 2, 4, 4) * 2 - 1
        >>> torch.equal(PixelSpaceVAE().decode(z, return_dict=False)[0], z)
        True
    """

    dtype = torch.float32

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(
            z_dim=3, scale_factor_temporal=1, scale_factor_spatial=1, latents_mean=[0.0] * 3, latents_std=[1.0] * 3
        )

    def decode(self, z: Tensor, return_dict: bool = False) -> tuple[Tensor]:
        """``(B, 3, T, H, W)`` latents in ``[-1, 1]`` are the video: returned as they are, as ``(video,)``.

        Raises:
            ValueError: ``return_dict`` is true (diffusers' output classes are not needed here).
        """
        if return_dict:
            raise ValueError("PixelSpaceVAE.decode returns a tuple: call it with return_dict=False, as WanPolicy does.")
        return (z,)


def pipeline_vae(vae: nn.Module) -> nn.Module | None:
    """The ``vae`` a diffusers pipeline takes for a policy's VAE: ``None`` for :class:`PixelSpaceVAE`."""
    return None if isinstance(vae, PixelSpaceVAE) else vae


__all__ = ["PixelSpaceVAE", "pipeline_vae"]
