"""The base class of every reward: input checks and frame subsampling, done once, here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from sp_grpo.functional.aspects import ASPECTS, Aspect

__all__ = ["ASPECTS", "Aspect", "VideoReward", "check_videos", "evenly_spaced_frames"]


def check_videos(videos: Tensor, prompts: Sequence[str], name: str = "reward") -> None:
    """Check a batch of videos and prompts against the library's video convention.

    Args:
        videos: expected ``(B, T, 3, H, W)``, floating point, values in ``[0, 1]``.
        prompts: expected ``B`` strings.
        name: who is checking, named in the error.

    Raises:
        TypeError: If ``videos`` is not a floating-point tensor or ``prompts`` is a single string.
        ValueError: If the shape, value range or number of prompts is wrong.
    """
    if not isinstance(videos, Tensor):
        raise TypeError(f"{name}: `videos` must be a torch.Tensor of shape (B, T, 3, H, W), got {type(videos).__name__}.")
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(
            f"{name}: `videos` must have shape (B, T, 3, H, W) with 3 RGB channels, got {tuple(videos.shape)}; "
            "put channels before height and width (e.g. `videos.permute(0, 1, 4, 2, 3)` for (B, T, H, W, 3))."
        )
    if not videos.is_floating_point():
        raise TypeError(
            f"{name}: `videos` must be floating point with values in [0, 1], got dtype {videos.dtype}; "
            "convert uint8 frames with `videos.float() / 255`."
        )
    if videos.numel() > 0:
        low, high = videos.min().item(), videos.max().item()
        if not (low >= 0.0 and high <= 1.0):  # also catches NaN
            raise ValueError(
                f"{name}: `videos` values must be in [0, 1], got min {low:.4g} and max {high:.4g}; "
                "decoded videos in [-1, 1] need `(videos + 1) / 2`, then `.clamp(0, 1)`."
            )
    if isinstance(prompts, str):
        raise TypeError(f"{name}: `prompts` must be a sequence of strings, one per video, got a single string.")
    if len(prompts) != videos.shape[0]:
        raise ValueError(
            f"{name}: got {len(prompts)} prompts for {videos.shape[0]} videos; pass exactly one prompt per video "
            "(repeat each prompt `group_size` times for GRPO groups)."
        )


def evenly_spaced_frames(total: int, num_frames: int) -> list[int]:
    """``num_frames`` evenly spaced frame indices out of ``total``, first and last included.

    Args:
        total: number of frames of the video.
        num_frames: how many to keep (at least 1); a video with no more frames is used whole.

    Returns:
        Sorted frame indices.

    Example:
        >>> evenly_spaced_frames(9, 3), evenly_spaced_frames(2, 3), evenly_spaced_frames(5, 1)
        ([0, 4, 8], [0, 1], [0])
    """
    if total <= num_frames:
        return list(range(total))
    return torch.linspace(0, total - 1, num_frames).round().long().tolist()


class VideoReward(nn.Module):
    """A reward on generated videos: one score per sample, torchmetrics-style.

    Subclasses set the class attributes and implement :meth:`score`; the maths lives in
    :mod:`sp_grpo.functional`. :meth:`forward` checks the inputs, subsamples frames, calls
    :meth:`score` and checks its output, so no subclass repeats that work.

    Frame subsampling keeps ``num_frames`` evenly spaced frames (first and last included) or every
    ``frame_stride``-th frame; a video with no more than ``num_frames`` frames is used whole.

    Attributes:
        aspect: ``"fidelity"``, ``"temporal"`` or ``"semantic"``: which curriculum stage it serves.
        higher_is_better: whether a larger score is a better video. :class:`~sp_grpo.rewards.RewardSet`
            negates scores with ``False`` before aggregating.
        is_differentiable: whether gradients flow from the score to the pixels.
        min_frames: the fewest frames :meth:`score` can work with (after subsampling).
        graded: whether the reward has graded strictness, :attr:`strictness` in ``[0, 1]`` (0 coarse,
            1 strict), which a curriculum raises through :meth:`set_strictness` as the generator
            becomes competent. A graded subclass takes ``strictness`` in ``__init__`` and reads
            ``self.strictness`` in :meth:`score`.

    Args:
        num_frames: keep at most this many evenly spaced frames; ``None`` keeps all.
        frame_stride: keep every ``frame_stride``-th frame; ``None`` keeps all.

    Raises:
        ValueError: If both are set, or either is not a positive integer, or ``num_frames`` is below
            :attr:`min_frames`.

    Example:
        >>> class Brightness(VideoReward):
        ...     aspect = "fidelity"
        ...     def score(self, videos, prompts):
        ...         return videos.mean(dim=(1, 2, 3, 4))
        >>> Brightness(num_frames=2)(torch.full((2, 5, 3, 4, 4), 0.25), ["a", "b"])
        tensor([0.2500, 0.2500])
    """

    aspect: ClassVar[Aspect]
    higher_is_better: ClassVar[bool] = True
    is_differentiable: ClassVar[bool] = False
    min_frames: ClassVar[int] = 1
    graded: ClassVar[bool] = False

    def __init__(self, *, num_frames: int | None = None, frame_stride: int | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        if getattr(self, "aspect", None) not in ASPECTS:
            raise TypeError(f"{name}.aspect ({getattr(self, 'aspect', None)!r}) must be one of {list(ASPECTS)}.")
        if num_frames is not None and frame_stride is not None:
            raise ValueError(
                f"{name}: set `num_frames` ({num_frames}) or `frame_stride` ({frame_stride}), not both."
            )
        for arg, value in (("num_frames", num_frames), ("frame_stride", frame_stride)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: `{arg}` ({value!r}) must be a positive integer or None (all frames).")
        if num_frames is not None and num_frames < self.min_frames:
            raise ValueError(
                f"{name}: `num_frames` ({num_frames}) must be at least {self.min_frames}: the score compares frames; "
                f"set `num_frames` to {self.min_frames} or more."
            )
        self.num_frames = num_frames
        self.frame_stride = frame_stride

    def set_strictness(self, value: float) -> None:
        """Set how strict a graded reward is: 0 coarse, 1 strict.

        Args:
            value: Strictness in ``[0, 1]``.

        Raises:
            TypeError: If the reward is not graded.
            ValueError: If ``value`` is outside ``[0, 1]``.
        """
        name = type(self).__name__
        if not self.graded:
            raise TypeError(f"{name} has no graded strictness (`graded` is False); only graded rewards can be tightened.")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name}: strictness ({value}) must be in [0, 1]: 0 is coarse, 1 strict.")
        self.strictness = float(value)

    def frame_indices(self, total: int) -> list[int]:
        """Indices of the frames kept out of ``total``.

        Args:
            total: number of frames of the input videos.

        Returns:
            Sorted frame indices.
        """
        if self.frame_stride is not None:
            return list(range(0, total, self.frame_stride))
        if self.num_frames is None:
            return list(range(total))
        return evenly_spaced_frames(total, self.num_frames)

    def forward(self, videos: Tensor, prompts: Sequence[str]) -> Tensor:
        """Score each video against its prompt.

        Args:
            videos: ``(B, T, 3, H, W)`` float in ``[0, 1]``.
            prompts: ``B`` prompts.

        Returns:
            ``(B,)`` float32 scores.

        Raises:
            TypeError, ValueError: On malformed inputs (see :func:`check_videos`), or when fewer than
                :attr:`min_frames` frames remain after subsampling.
            RuntimeError: If :meth:`score` does not return ``B`` values.
        """
        name = type(self).__name__
        check_videos(videos, prompts, name)
        index = self.frame_indices(videos.shape[1])
        if len(index) < self.min_frames:
            raise ValueError(
                f"{name}: needs at least {self.min_frames} frames after subsampling, got {len(index)} "
                f"(video length {videos.shape[1]}, num_frames={self.num_frames}, frame_stride={self.frame_stride}); "
                "pass longer videos or lower `frame_stride`."
            )
        if len(index) != videos.shape[1]:
            videos = videos[:, index]
        scores = self.score(videos, list(prompts))
        if scores.shape != (videos.shape[0],):
            raise RuntimeError(f"{name}.score must return shape ({videos.shape[0]},), got {tuple(scores.shape)}.")
        return scores.float()

    def score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        """Compute the scores; the one method a subclass implements.

        Args:
            videos: ``(B, T', 3, H, W)`` checked and subsampled videos.
            prompts: ``B`` prompts.

        Returns:
            ``(B,)`` scores.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `score(videos, prompts)`.")

    def extra_repr(self) -> str:
        graded = f", strictness={self.strictness}" if self.graded else ""
        return f"aspect={self.aspect!r}, num_frames={self.num_frames}, frame_stride={self.frame_stride}{graded}"
