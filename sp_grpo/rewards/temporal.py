"""Temporal rewards: coherence across frames, and the motion that keeps coherence honest.

Flicker, smoothness and consistency are all maximized by a frozen, static video. A generator trained
on them alone learns to stop moving (reward hacking). :class:`DynamicDegree` scores the amount of
motion (0 for a static video); the shipped configs put it in the temporal aspect beside the coherence
terms, so stillness buys coherence but forfeits the dynamic term, and a smoothly moving video scores
highest. :class:`DynamicDegree` saturates at its threshold, so chaotic motion earns no more than
clear motion and still loses on flicker and smoothness.
"""

from __future__ import annotations

from torch import Tensor

from sp_grpo.functional.video import dynamic_degree, feature_consistency, motion_smoothness, temporal_flickering
from sp_grpo.rewards.backbones import Backbone, resolve_backbone
from sp_grpo.rewards.base import VideoReward

__all__ = ["DynamicDegree", "FeatureConsistency", "MotionSmoothness", "TemporalFlickering"]


class TemporalFlickering(VideoReward):
    """VBench temporal flickering, ``(255 - mean |x_t - x_{t-1}|) / 255``; a static video scores 1.

    See :func:`~sp_grpo.functional.video.temporal_flickering`. VBench computes it on every frame of
    the video; subsampling frames (``num_frames``) turns it into flicker between the kept frames.
    """

    aspect = "temporal"
    higher_is_better = True
    is_differentiable = True
    min_frames = 2

    def score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        return temporal_flickering(videos)


class MotionSmoothness(VideoReward):
    """Model-free motion smoothness: inner frames predicted by averaging their neighbours.

    See :func:`~sp_grpo.functional.video.motion_smoothness` for the deviation from VBench (linear
    interpolation instead of the AMT interpolation network).
    """

    aspect = "temporal"
    higher_is_better = True
    is_differentiable = True
    min_frames = 3

    def score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        return motion_smoothness(videos)


class DynamicDegree(VideoReward):
    """Amount of motion, in ``[0, 1]``; a static video scores 0. The guard against rewarding stillness.

    Model-free stand-in for VBench's RAFT-based dynamic degree; see
    :func:`~sp_grpo.functional.video.dynamic_degree`.

    Args:
        threshold: luma change (``[0, 1]`` units) counted as full motion.
        top_fraction: share of the most-changed pixels averaged per frame pair.
        num_frames: see :class:`~sp_grpo.rewards.VideoReward`.
        frame_stride: see :class:`~sp_grpo.rewards.VideoReward`.

    Raises:
        ValueError: If ``threshold`` is not positive or ``top_fraction`` is not in ``(0, 1]``.
    """

    aspect = "temporal"
    higher_is_better = True
    min_frames = 2

    def __init__(
        self,
        threshold: float = 0.05,
        top_fraction: float = 0.05,
        *,
        num_frames: int | None = None,
        frame_stride: int | None = None,
    ) -> None:
        super().__init__(num_frames=num_frames, frame_stride=frame_stride)
        if threshold <= 0:
            raise ValueError(f"DynamicDegree: `threshold` ({threshold}) must be positive (a luma change in [0, 1]).")
        if not 0 < top_fraction <= 1:
            raise ValueError(f"DynamicDegree: `top_fraction` ({top_fraction}) must be in (0, 1].")
        self.threshold, self.top_fraction = threshold, top_fraction

    def score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        return dynamic_degree(videos, self.threshold, self.top_fraction)


class FeatureConsistency(VideoReward):
    """VBench subject/background consistency on the features of any image backbone.

    With a DINO backbone (e.g. DINOv2) this is VBench's *subject consistency*; with a CLIP image
    tower, its *background consistency*. See :func:`~sp_grpo.functional.video.feature_consistency`.

    Args:
        backbone: a :class:`~sp_grpo.rewards.backbones.Backbone` or a local model directory.
        num_frames: see :class:`~sp_grpo.rewards.VideoReward`.
        frame_stride: see :class:`~sp_grpo.rewards.VideoReward`.
    """

    aspect = "temporal"
    higher_is_better = True
    min_frames = 2

    def __init__(
        self, backbone: Backbone | str, *, num_frames: int | None = 8, frame_stride: int | None = None
    ) -> None:
        super().__init__(num_frames=num_frames, frame_stride=frame_stride)
        self.backbone = resolve_backbone(backbone)

    def score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        return feature_consistency(self.backbone.embed_video(videos))
