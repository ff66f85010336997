"""Fidelity rewards: the quality of individual frames.

Model-free: :class:`Sharpness`, :class:`NoiseLevel`, :class:`Exposure`, :class:`Contrast`.
Model-backed: :class:`AestheticScore` (a LAION-style linear head on CLIP image features).

Sharpness alone can be gamed by adding noise (noise has a large Laplacian); pair it with
:class:`NoiseLevel`, as ``configs/rewards/model_free.yaml`` does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor

from sp_grpo.functional.semantic import linear_head_score
from sp_grpo.functional.video import clipped_fraction, laplacian_variance, noise_sigma, rms_contrast
from sp_grpo.rewards.backbones import Backbone, resolve_backbone
from sp_grpo.rewards.base import VideoReward

__all__ = ["AestheticScore", "Contrast", "Exposure", "NoiseLevel", "Sharpness", "load_linear_head"]


class Sharpness(VideoReward):
    """Variance of the Laplacian of the luma (:func:`~sp_grpo.functional.video.laplacian_variance`).

    Args:
        saturation: if set, report ``v / (v + saturation)`` in ``[0, 1)`` so that sharpness beyond
            ``saturation`` earns little (limits reward hacking by high-frequency noise).
        num_frames: see :class:`~sp_grpo.rewards.VideoReward`.
        frame_stride: see :class:`~sp_grpo.rewards.VideoReward`.

    Raises:
        ValueError: If ``saturation`` is not positive.
    """

    aspect = "fidelity"
    higher_is_better = True
    is_differentiable = True

    def __init__(
        self, saturation: float | None = None, *, num_frames: int | None = None, frame_stride: int | None = None
    ) -> None:
        super().__init__(num_frames=num_frames, frame_stride=frame_stride)
        if saturation is not None and saturation <= 0:
            raise ValueError(f"Sharpness: `saturation` ({saturation}) must be positive or None (raw variance).")
        self.saturation = saturation

    def score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        variance = laplacian_variance(videos)
        return variance if self.saturation is None else variance / (variance + self.saturation)


class NoiseLevel(VideoReward):
    """Estimated standard deviation of white noise (:func:`~sp_grpo.functional.video.noise_sigma`).

    Lower is better, so :class:`~sp_grpo.rewards.RewardSet` negates it before aggregating.
    """

    aspect = "fidelity"
    higher_is_better = False
    is_differentiable = True

    def score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        return noise_sigma(videos)


class Exposure(VideoReward):
    """Share of well-exposed pixels: ``1 - clipped_fraction`` (neither crushed nor blown out).

    Args:
        low: luma below which a pixel is crushed black.
        high: luma above which a pixel is blown-out white.
        num_frames: see :class:`~sp_grpo.rewards.VideoReward`.
        frame_stride: see :class:`~sp_grpo.rewards.VideoReward`.

    Raises:
        ValueError: If not ``0 <= low < high <= 1``.
    """

    aspect = "fidelity"
    higher_is_better = True

    def __init__(
        self, low: float = 0.02, high: float = 0.98, *, num_frames: int | None = None, frame_stride: int | None = None
    ) -> None:
        super().__init__(num_frames=num_frames, frame_stride=frame_stride)
        if not 0 <= low < high <= 1:
            raise ValueError(f"Exposure: `low` ({low}) and `high` ({high}) must satisfy 0 <= low < high <= 1.")
        self.low, self.high = low, high

    def score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        return 1.0 - clipped_fraction(videos, self.low, self.high)


class Contrast(VideoReward):
    """RMS contrast of the luma (:func:`~sp_grpo.functional.video.rms_contrast`); flat frames score 0."""

    aspect = "fidelity"
    higher_is_better = True
    is_differentiable = True

    def score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        return rms_contrast(videos)


def load_linear_head(path: str | os.PathLike) -> list[tuple[Tensor, Tensor]]:
    """Load a chain of linear layers from a LAION aesthetic-predictor style state dict.

    Accepts ``.pth``/``.pt`` (``torch.save`` of a state dict) and ``.safetensors``. Keys are
    ``weight``/``bias`` (the original single linear head) or ``<prefix>.<i>.weight``/``.bias`` (the
    "improved" predictor's ``layers.0``, ``layers.2``, ...), applied in numeric order.

    Args:
        path: the file.

    Returns:
        ``[(weight, bias), ...]`` in order of application.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file holds no linear layers, or their shapes do not chain to one output.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Aesthetic head {str(path)!r} does not exist; point `head` at a local .pth or .safetensors file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    prefixes = sorted(
        (key[: -len("weight")] for key in state if key.endswith("weight") and state[key].ndim == 2),
        key=lambda prefix: [int(n) for n in re.findall(r"\d+", prefix)],
    )
    layers = [(state[p + "weight"], state.get(p + "bias", torch.zeros(state[p + "weight"].shape[0]))) for p in prefixes]
    if not layers:
        raise ValueError(f"Aesthetic head {str(path)!r} has no 2-D `weight` tensors; expected a linear head state dict.")
    for (w_in, _), (w_out, _) in zip(layers, layers[1:]):
        if w_out.shape[1] != w_in.shape[0]:
            raise ValueError(f"Aesthetic head {str(path)!r}: layer shapes {tuple(w_in.shape)} -> {tuple(w_out.shape)} do not chain.")
    if layers[-1][0].shape[0] != 1:
        raise ValueError(f"Aesthetic head {str(path)!r}: the last layer has {layers[-1][0].shape[0]} outputs, expected 1.")
    return layers


class AestheticScore(VideoReward):
    """LAION-style aesthetic score: a linear head on normalized CLIP image features, frame-averaged.

    .. math:: s_b = \\frac1T\\sum_t h(f_{b,t} / \\lVert f_{b,t}\\rVert)

    The head must match the backbone's embedding size (the public LAION heads are for CLIP
    ViT-L/14, 768-d).

    Args:
        backbone: a :class:`~sp_grpo.rewards.backbones.Backbone` or a local CLIP directory.
        head: the head file (see :func:`load_linear_head`).
        num_frames: see :class:`~sp_grpo.rewards.VideoReward`.
        frame_stride: see :class:`~sp_grpo.rewards.VideoReward`.

    Raises:
        ValueError: If the head's input size differs from the backbone's embedding size (checked on
            first use).
    """

    aspect = "fidelity"
    higher_is_better = True

    def __init__(
        self,
        backbone: Backbone | str,
        head: str | os.PathLike,
        *,
        num_frames: int | None = 8,
        frame_stride: int | None = None,
    ) -> None:
        super().__init__(num_frames=num_frames, frame_stride=frame_stride)
        self.backbone = resolve_backbone(backbone)
        layers = load_linear_head(head)
        for i, (weight, bias) in enumerate(layers):
            self.register_buffer(f"weight_{i}", weight.float(), persistent=False)
            self.register_buffer(f"bias_{i}", bias.float(), persistent=False)
        self.num_layers = len(layers)

    def score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        feats = self.backbone.embed_video(videos)  # (B, T, D)
        layers = [(getattr(self, f"weight_{i}"), getattr(self, f"bias_{i}")) for i in range(self.num_layers)]
        if feats.shape[-1] != layers[0][0].shape[1]:
            raise ValueError(
                f"AestheticScore: the head takes {layers[0][0].shape[1]}-d features but the backbone gives "
                f"{feats.shape[-1]}-d; use the backbone the head was trained on (LAION heads: CLIP ViT-L/14)."
            )
        return linear_head_score(feats.flatten(0, 1), layers).view(feats.shape[:2]).mean(dim=1)
