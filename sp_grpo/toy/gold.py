"""The gold evaluation of the shapes world: attributes read off the video, not the training reward.

The training rewards (:mod:`sp_grpo.toy.rewards`) are smooth scores GRPO can climb; the gold
evaluation makes hard decisions (which colour, which shape, which direction) and measures frame
cleanliness and flicker with fixed thresholds, so a policy that games a reward (dim texture the
reward ignores, an object that wobbles instead of moving) shows up here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sp_grpo.rewards.base import check_videos
from sp_grpo.toy.measure import centroids, glyph_iou, mean_object_colour, object_masks, palette_distance
from sp_grpo.toy.world import CELL, COLOURS, DIRECTIONS, parse_prompt

#: Pixels further than this (L-infinity) from black and from every palette colour are dirty.
CLEAN_TOLERANCE = 0.1
#: Smallest mean move per frame, in pixels, that counts as motion (half a cell).
MIN_MOTION = CELL / 2
#: Metric names of :func:`gold_scores`, in report order.
GOLD_METRICS = ("colour_acc", "shape_acc", "direction_acc", "all_correct", "cleanliness", "flicker")


@dataclass
class Attributes:
    """Attributes read off a batch of videos; ``-1`` where none could be read (e.g. an empty video).

    Attributes:
        colour: ``(B,)`` long index into :data:`~sp_grpo.toy.world.COLOURS`.
        shape: ``(B,)`` long index into :data:`~sp_grpo.toy.world.SHAPES`.
        direction: ``(B,)`` long index into :data:`~sp_grpo.toy.world.DIRECTIONS`.
    """

    colour: Tensor
    shape: Tensor
    direction: Tensor


def read_attributes(videos: Tensor) -> Attributes:
    """Read colour, shape and direction off each video by hard decisions.

    Colour: the palette colour nearest (L2) the mean object colour over all frames. Shape: the
    glyph with the highest intersection-over-union summed over frames. Direction: the direction
    whose unit vector has the largest dot product with the mean centroid step, if the object moves at
    least :data:`MIN_MOTION` pixels per frame.

    .. math:: \\hat d = \\arg\\max_d \\langle u_d, \\tfrac{1}{T-1}(c_{T} - c_1) \\rangle

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]``.

    Returns:
        The attributes.
    """
    masks = object_masks(videos)
    rgb, present = mean_object_colour(videos, masks)
    weights = present.float().unsqueeze(-1)
    overall = (rgb * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (B, 3)
    palette = torch.tensor(list(COLOURS.values()), device=videos.device)
    colour = torch.cdist(overall, palette).argmin(dim=1)
    any_object = present.any(dim=1)
    colour = torch.where(any_object, colour, -1)

    iou = glyph_iou(masks).sum(dim=1)  # (B, S)
    shape = torch.where(any_object, iou.argmax(dim=1), -1)

    xy, _ = centroids(masks)
    both = present[:, 0] & present[:, -1]
    step = (xy[:, -1] - xy[:, 0]) / max(videos.shape[1] - 1, 1)  # (B, 2) pixels per frame
    units = torch.tensor(list(DIRECTIONS.values()), device=videos.device, dtype=torch.float32)
    direction = (step @ units.T).argmax(dim=1)
    moving = both & (step.norm(dim=1) >= MIN_MOTION)
    direction = torch.where(moving, direction, -1)
    return Attributes(colour, shape, direction)


def cleanliness(videos: Tensor) -> Tensor:
    """Fraction of pixels within :data:`CLEAN_TOLERANCE` of black or of a palette colour.

    Dim pixels count: a 0.15 grey on the background is dirty.

    .. math:: \\text{clean} = \\tfrac{1}{THW} \\textstyle\\sum [d_{t,y,x} \\le \\epsilon]

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]``.

    Returns:
        ``(B,)`` fp32 in ``[0, 1]``.
    """
    return (palette_distance(videos) <= CLEAN_TOLERANCE).float().mean(dim=(1, 2, 3))


def background_flicker(videos: Tensor) -> Tensor:
    """VBench-style temporal flickering score, on the background only.

    VBench scores flicker as ``1 - mean |frame_{t+1} - frame_t|`` on static scenes; the shapes move,
    so only pixels that are background (no object) in both frames count.

    .. math:: \\text{flicker} = 1 - \\frac{\\sum_t \\sum_{b_t} |v_{t+1} - v_t|}{3 \\sum_t |b_t|},
              \\quad b_t = \\neg m_t \\wedge \\neg m_{t+1}

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]`` with ``T >= 2``.

    Returns:
        ``(B,)`` fp32 in ``[0, 1]``; 1 means a perfectly steady background.
    """
    v = videos.float()
    masks = object_masks(v)
    background = (~masks[:, 1:] & ~masks[:, :-1]).float().unsqueeze(2)  # (B, T-1, 1, H, W)
    diff = (v[:, 1:] - v[:, :-1]).abs() * background
    return 1.0 - diff.sum(dim=(1, 2, 3, 4)) / (3.0 * background.sum(dim=(1, 2, 3, 4))).clamp(min=1.0)


def gold_scores(videos: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
    """Per-sample gold scores of videos against their prompts.

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]``.
        prompts: ``B`` prompts of the shapes grammar.

    Returns:
        Metric name (:data:`GOLD_METRICS`) -> ``(B,)`` fp32: 0/1 correctness of ``colour_acc``,
        ``shape_acc``, ``direction_acc`` and ``all_correct``; ``cleanliness``; ``flicker``.

    Raises:
        ValueError: On malformed videos or prompts outside the grammar.
    """
    check_videos(videos, prompts, "gold_scores")
    truth = torch.tensor([parse_prompt(p).index for p in prompts], device=videos.device)  # (B, 3)
    read = read_attributes(videos)
    correct = torch.stack([read.colour == truth[:, 0], read.shape == truth[:, 1], read.direction == truth[:, 2]]).float()
    return {
        "colour_acc": correct[0],
        "shape_acc": correct[1],
        "direction_acc": correct[2],
        "all_correct": correct.prod(dim=0),
        "cleanliness": cleanliness(videos),
        "flicker": background_flicker(videos),
    }


def gold_summary(videos: Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Means of :func:`gold_scores` over the batch."""
    return {name: float(value.mean()) for name, value in gold_scores(videos, prompts).items()}


__all__ = [
    "Attributes",
    "CLEAN_TOLERANCE",
    "GOLD_METRICS",
    "MIN_MOTION",
    "background_flicker",
    "cleanliness",
    "gold_scores",
    "gold_summary",
    "read_attributes",
]
