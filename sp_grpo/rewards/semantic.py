"""Semantic rewards: does the video show what the prompt asks for?

Model-free: :class:`ColorPromptAlignment`. Model-backed: :class:`TextVideoAlignment` (CLIP or
SigLIP from ``transformers``, per sample, frame-averaged) and :class:`JudgeReward` (one head of a
pluggable video judge, see :mod:`sp_grpo.rewards.judges`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from sp_grpo.functional.semantic import (
    COLOUR_PROTOTYPES,
    colour_affinity,
    find_colours,
    margin_credit,
    text_video_similarity,
)
from sp_grpo.rewards.backbones import Backbone, resolve_backbone
from sp_grpo.rewards.base import ASPECTS, Aspect, VideoReward
from sp_grpo.rewards.judges import VideoJudge

__all__ = ["ColorPromptAlignment", "JudgeReward", "TextVideoAlignment"]


class ColorPromptAlignment(VideoReward):
    """Model-free text-video alignment through colour words.

    The prompt's colour words (``red``, ``green``, ``blue``, ``yellow``, ... see
    :data:`~sp_grpo.functional.semantic.COLOUR_PROTOTYPES`) are mapped to RGB prototypes, and the
    video scores the soft fraction of its pixels near each named colour
    (:func:`~sp_grpo.functional.semantic.colour_affinity`), averaged over the colours named.

    A prompt without a known colour word gets the constant ``neutral`` score: within a GRPO group
    (one prompt) a constant has zero advantage, so such prompts neither reward nor punish anything.

    Args:
        bandwidth: RGB distance at which a pixel's affinity falls to ``exp(-1/2)``.
        neutral: the score of prompts without a colour word.
        colours: colour word -> RGB in ``[0, 1]``; ``None`` uses the built-in prototypes.
        num_frames: see :class:`~sp_grpo.rewards.VideoReward`.
        frame_stride: see :class:`~sp_grpo.rewards.VideoReward`.

    Raises:
        ValueError: If ``bandwidth`` is not positive or a colour is not three values in ``[0, 1]``.

    Example:
        >>> reward = ColorPromptAlignment()
        >>> red = torch.zeros(1, 2, 3, 4, 4); red[:, :, 0] = 1.0
        >>> reward(red.repeat(3, 1, 1, 1, 1), ["a red ball", "a blue ball", "a ball"]).round(decimals=3)
        tensor([1.0000, 0.0000, 0.5000])
    """

    aspect = "semantic"
    higher_is_better = True
    is_differentiable = True

    def __init__(
        self,
        bandwidth: float = 0.25,
        neutral: float = 0.5,
        colours: Mapping[str, Sequence[float]] | None = None,
        *,
        num_frames: int | None = None,
        frame_stride: int | None = None,
    ) -> None:
        super().__init__(num_frames=num_frames, frame_stride=frame_stride)
        if bandwidth <= 0:
            raise ValueError(f"ColorPromptAlignment: `bandwidth` ({bandwidth}) must be positive (an RGB distance).")
        table = dict(COLOUR_PROTOTYPES if colours is None else colours)
        for word, rgb in table.items():
            if len(rgb) != 3 or not all(0.0 <= v <= 1.0 for v in rgb):
                raise ValueError(f"ColorPromptAlignment: colour {word!r} ({rgb}) must be three RGB values in [0, 1].")
        self.bandwidth, self.neutral = bandwidth, neutral
        self.colours = {word.lower(): tuple(float(v) for v in rgb) for word, rgb in table.items()}

    def score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        named = [find_colours(prompt, self.colours) for prompt in prompts]
        total = torch.zeros(len(prompts), device=videos.device)
        count = torch.zeros(len(prompts), device=videos.device)
        # One pass per distinct colour, scored only on the samples that name it.
        for word in dict.fromkeys(w for words in named for w in words):
            rows = [i for i, words in enumerate(named) if word in words]
            target = videos.new_tensor(self.colours[word], dtype=torch.float32).expand(len(rows), 3)
            total[rows] += colour_affinity(videos[rows], target, self.bandwidth)
            count[rows] += 1
        neutral = torch.full_like(total, self.neutral)
        return torch.where(count > 0, total / count.clamp_min(1), neutral)


class TextVideoAlignment(VideoReward):
    """CLIP/SigLIP text-video alignment: frame-averaged cosine similarity, one score per sample.

    See :func:`~sp_grpo.functional.semantic.text_video_similarity`. Unlike torchmetrics' CLIPScore
    (a batch mean), this keeps one score per video, which GRPO needs.

    Graded when ``margin`` is set: the score becomes the credit above a similarity margin
    (:func:`~sp_grpo.functional.semantic.margin_credit`) that rises linearly from ``margin[0]`` at
    strictness 0 to ``margin[1]`` at strictness 1, so a curriculum can ask for closer alignment as
    the generator improves. Pick the margins from the similarities your backbone gives the
    training prompts (CLIP ViT-L/14 cosine similarities of matching pairs are typically 0.2-0.35).

    Args:
        backbone: a :class:`~sp_grpo.rewards.backbones.Backbone` or a local CLIP/SigLIP directory.
        margin: ``(coarse, strict)`` similarity margins, or ``None`` for the plain similarity.
        strictness: in ``[0, 1]``, used with ``margin``.
        margin_temperature: width of the hinge's bend (see ``margin_credit``).
        num_frames: see :class:`~sp_grpo.rewards.VideoReward`.
        frame_stride: see :class:`~sp_grpo.rewards.VideoReward`.

    Raises:
        ValueError: If ``margin`` is not two increasing values, or ``strictness`` / ``margin_temperature``
            are out of range.
    """

    aspect = "semantic"
    higher_is_better = True

    def __init__(
        self,
        backbone: Backbone | str,
        margin: tuple[float, float] | None = None,
        strictness: float = 0.0,
        margin_temperature: float = 0.01,
        *,
        num_frames: int | None = 8,
        frame_stride: int | None = None,
    ) -> None:
        super().__init__(num_frames=num_frames, frame_stride=frame_stride)
        if margin is not None and (len(margin) != 2 or not margin[0] <= margin[1]):
            raise ValueError(
                f"TextVideoAlignment: `margin` ({margin}) must be two similarities (coarse, strict) with coarse <= strict."
            )
        if not 0.0 <= strictness <= 1.0:
            raise ValueError(f"TextVideoAlignment: `strictness` ({strictness}) must be in [0, 1].")
        if margin_temperature <= 0:
            raise ValueError(f"TextVideoAlignment: `margin_temperature` ({margin_temperature}) must be positive, e.g. 0.01.")
        self.backbone = resolve_backbone(backbone)
        self.margin = None if margin is None else (float(margin[0]), float(margin[1]))
        self.graded = margin is not None
        self.strictness = float(strictness)
        self.margin_temperature = margin_temperature

    @property
    def current_margin(self) -> float | None:
        """The similarity margin at the current strictness, or ``None`` when not graded."""
        if self.margin is None:
            return None
        return self.margin[0] + self.strictness * (self.margin[1] - self.margin[0])

    def score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        similarity = text_video_similarity(self.backbone.embed_video(videos), self.backbone.embed_text(prompts))
        if self.margin is None:
            return similarity
        return margin_credit(similarity, self.current_margin, self.margin_temperature)


class JudgeReward(VideoReward):
    """One head of a video judge (e.g. VideoAlign's ``VQ``/``MQ``/``TA``) as a reward.

    Several :class:`JudgeReward` objects can read different heads of one judge; inside a
    :class:`~sp_grpo.rewards.RewardSet` the judge runs once per batch.

    Args:
        judge: the :class:`~sp_grpo.rewards.judges.VideoJudge` adapter.
        head: which of ``judge.heads`` to read.
        aspect: the curriculum aspect this head serves (VideoAlign: ``VQ`` fidelity, ``MQ``
            temporal, ``TA`` semantic).
        higher_is_better: whether a larger head value is better.
        num_frames: see :class:`~sp_grpo.rewards.VideoReward`.
        frame_stride: see :class:`~sp_grpo.rewards.VideoReward`.

    Raises:
        ValueError: If ``head`` is not one of the judge's heads or ``aspect`` is unknown.
    """

    is_differentiable = False

    def __init__(
        self,
        judge: VideoJudge,
        head: str,
        aspect: Aspect,
        higher_is_better: bool = True,
        *,
        num_frames: int | None = None,
        frame_stride: int | None = None,
    ) -> None:
        if aspect not in ASPECTS:
            raise ValueError(f"JudgeReward: `aspect` ({aspect!r}) must be one of {list(ASPECTS)}.")
        # Per-instance aspect: one judge class serves every aspect through its heads.
        object.__setattr__(self, "aspect", aspect)
        object.__setattr__(self, "higher_is_better", higher_is_better)
        super().__init__(num_frames=num_frames, frame_stride=frame_stride)
        if head not in judge.heads:
            raise ValueError(f"JudgeReward: `head` ({head!r}) must be one of the judge's heads {list(judge.heads)}.")
        self.judge, self.head = judge, head

    def score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        return self.judge(videos, prompts)[self.head]
