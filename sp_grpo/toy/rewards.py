"""Exact rewards of the shapes world, one per aspect, as :class:`~sp_grpo.rewards.VideoReward` modules.

The world's truth is known, so each aspect has an exact, rule-based score in ``[0, 1]``:

* :class:`ShapesFidelity`: clean frames, one solid object, nothing else (dim pixels included);
* :class:`ShapesTemporal`: the same object in every frame, moving steadily, not frozen;
* :class:`ShapesSemantic`: colour, shape and direction as the prompt says.

They are smooth where they can be (GRPO needs graded scores within a group), unlike the gold
evaluation (:mod:`sp_grpo.toy.gold`), which makes hard decisions and is not trained on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sp_grpo.rewards.base import VideoReward
from sp_grpo.toy.measure import (
    centroids,
    component_stats,
    glyph_iou,
    mean_object_colour,
    object_masks,
    palette_distance,
)
from sp_grpo.toy.world import CELL, COLOURS, DIRECTIONS, parse_prompt

#: Pixel colour error (L-infinity) at which a pixel scores 0 in :func:`pixel_purity`.
PURITY_TOLERANCE = 0.25
#: The tolerance :class:`ShapesFidelity` tightens to at strictness 1.
STRICT_PURITY_TOLERANCE = 0.1


def pixel_purity(videos: Tensor, tolerance: float = PURITY_TOLERANCE) -> Tensor:
    """Mean closeness of every pixel to black or to a palette colour.

    .. math:: p = \\tfrac{1}{THW} \\textstyle\\sum \\max(0, 1 - d_{t,y,x} / \\delta)

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]``.
        tolerance: :math:`\\delta`.

    Returns:
        ``(B,)`` fp32 in ``[0, 1]``.
    """
    return (1.0 - palette_distance(videos) / tolerance).clamp(min=0.0).mean(dim=(1, 2, 3))


def fidelity_score(videos: Tensor, tolerance: float = PURITY_TOLERANCE) -> Tensor:
    """Clean frames with one solid object: purity times, per frame, solidity and presence.

    With object area :math:`a_t` and largest 8-connected component :math:`\\ell_t`; an object of at
    least one cell (:math:`c^2` pixels) counts as present. Presence does not grow with size, so the
    reward does not prefer big shapes (a square) over thin ones (a plus):

    .. math:: f = p \\cdot \\tfrac{1}{T} \\textstyle\\sum_t \\frac{\\ell_t}{\\max(a_t, 1)} \\min(1, \\ell_t / c^2)

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]``.
        tolerance: Pixel colour error at which a pixel's purity is 0 (see :func:`pixel_purity`).

    Returns:
        ``(B,)`` fp32 in ``[0, 1]``; an empty video scores 0.
    """
    area, largest = component_stats(object_masks(videos))
    solid = largest / area.clamp(min=1.0) * (largest / CELL**2).clamp(max=1.0)
    return pixel_purity(videos, tolerance) * solid.mean(dim=1)


def temporal_score(videos: Tensor) -> Tensor:
    """The same object throughout, moving at a steady pace of at least one cell per frame.

    Mean of three terms in ``[0, 1]``, each 0 when a frame is empty: consistency (area and colour
    of consecutive frames agree), smoothness (consecutive centroid steps agree) and motion (the mean
    step is at least one cell):

    .. math:: c = \\tfrac{1}{T-1} \\textstyle\\sum_t \\frac{\\min(a_t, a_{t+1})}{\\max(a_t, a_{t+1})} (1 - \\|\\bar c_{t+1} - \\bar c_t\\|_\\infty)

    .. math:: s = 1 - \\min\\big(1, \\tfrac{1}{T-2} \\textstyle\\sum_t \\|\\Delta_{t+1} - \\Delta_t\\| / \\text{cell}\\big),
              \\quad m = \\min\\big(1, \\|\\bar \\Delta\\| / \\text{cell}\\big)

    with :math:`\\bar c_t` the mean object colour and :math:`\\Delta_t` the centroid step.

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]`` with ``T >= 3``.

    Returns:
        ``(B,)`` fp32 in ``[0, 1]``.
    """
    masks = object_masks(videos)
    area = masks.float().sum(dim=(2, 3))  # (B, T)
    rgb, present = mean_object_colour(videos, masks)
    all_present = present.all(dim=1).float()
    same_area = torch.minimum(area[:, 1:], area[:, :-1]) / torch.maximum(area[:, 1:], area[:, :-1]).clamp(min=1.0)
    same_colour = 1.0 - (rgb[:, 1:] - rgb[:, :-1]).abs().amax(dim=2)
    consistency = (same_area * same_colour).mean(dim=1)
    xy, _ = centroids(masks)
    steps = xy[:, 1:] - xy[:, :-1]  # (B, T-1, 2)
    jerk = (steps[:, 1:] - steps[:, :-1]).norm(dim=2).mean(dim=1)
    smoothness = 1.0 - (jerk / CELL).clamp(max=1.0)
    motion = (steps.mean(dim=1).norm(dim=1) / CELL).clamp(max=1.0)
    return all_present * (consistency + smoothness + motion) / 3.0


def semantic_score(
    videos: Tensor, prompts: list[str], temperature: float = 0.05, strictness: float = 1.0
) -> Tensor:
    """Colour, shape and direction of the object against the prompt; from a sum to a product.

    Strict (``strictness`` 1): the product of the three terms, like the gold all-three-correct rate,
    so the weakest attribute sets the score and a policy cannot trade one attribute for another.
    Coarse (``strictness`` 0): their mean, so each attribute earns credit on its own. In between,
    with :math:`\\kappa` = ``strictness``:

    .. math:: s = (1 - \\kappa)\\,\\tfrac13 (s_{colour} + s_{shape} + s_{direction})
              + \\kappa\\, s_{colour} s_{shape} s_{direction}

    Colour: :math:`1 - \\|\\bar c - c^*\\|_\\infty` of the mean object colour. Shape: the softmax
    probability of the prompt's glyph among all glyphs, from their best IoU per frame at
    ``temperature``, averaged over frames. Direction: the mean centroid step's component along the
    prompt's direction, in cells, clipped to ``[0, 1]``.

    .. math:: s_{shape} = \\tfrac{1}{T} \\textstyle\\sum_t \\mathrm{softmax}_s(\\mathrm{IoU}_{t,s} / \\tau)_{s^*}

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]``.
        prompts: ``B`` prompts of the shapes grammar.
        temperature: :math:`\\tau` of the shape softmax.
        strictness: :math:`\\kappa \\in [0, 1]`.

    Returns:
        ``(B,)`` fp32 in ``[0, 1]``.
    """
    truth = torch.tensor([parse_prompt(p).index for p in prompts], device=videos.device)  # (B, 3)
    masks = object_masks(videos)
    rgb, present = mean_object_colour(videos, masks)
    target = torch.tensor(list(COLOURS.values()), device=videos.device)[truth[:, 0]]  # (B, 3)
    colour = ((1.0 - (rgb - target[:, None]).abs().amax(dim=2)) * present.float()).mean(dim=1)

    iou = glyph_iou(masks)  # (B, T, S)
    prob = torch.softmax(iou / temperature, dim=2)
    chosen = prob.gather(2, truth[:, 1].view(-1, 1, 1).expand(-1, iou.shape[1], 1)).squeeze(2)
    shape = (chosen * present.float()).mean(dim=1)

    xy, _ = centroids(masks)
    both = (present[:, 0] & present[:, -1]).float()
    step = (xy[:, -1] - xy[:, 0]) / max(videos.shape[1] - 1, 1)
    unit = torch.tensor(list(DIRECTIONS.values()), device=videos.device, dtype=torch.float32)[truth[:, 2]]
    direction = ((step * unit).sum(dim=1) / CELL).clamp(0.0, 1.0) * both
    coarse = (colour + shape + direction) / 3.0
    return (1.0 - strictness) * coarse + strictness * (colour * shape * direction)


def _check_strictness(name: str, strictness: float) -> float:
    if not 0.0 <= strictness <= 1.0:
        raise ValueError(f"{name}: `strictness` ({strictness}) must be in [0, 1]: 0 is coarse, 1 strict.")
    return float(strictness)


class ShapesFidelity(VideoReward):
    """Fidelity of a shapes-world video: clean pixels, one solid object (:func:`fidelity_score`).

    Graded: the pixel purity tolerance tightens linearly from :data:`PURITY_TOLERANCE` (strictness 0)
    to :data:`STRICT_PURITY_TOLERANCE` (strictness 1), so off-palette pixels cost more.

    Args:
        strictness: In ``[0, 1]``; a curriculum may raise it during training.

    Raises:
        ValueError: If ``strictness`` is outside ``[0, 1]``.
    """

    aspect = "fidelity"
    graded = True

    def __init__(self, strictness: float = 0.0) -> None:
        super().__init__()
        self.strictness = _check_strictness(type(self).__name__, strictness)

    @property
    def tolerance(self) -> float:
        """The purity tolerance at the current strictness."""
        return PURITY_TOLERANCE + self.strictness * (STRICT_PURITY_TOLERANCE - PURITY_TOLERANCE)

    def score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        return fidelity_score(videos, self.tolerance)


class ShapesTemporal(VideoReward):
    """Temporal quality: the same object, steady motion, not frozen (:func:`temporal_score`)."""

    aspect = "temporal"
    min_frames = 3

    def score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        return temporal_score(videos)


class ShapesSemantic(VideoReward):
    """Alignment with the prompt: colour, shape and direction (:func:`semantic_score`).

    Graded: strictness 0 gives each attribute its own credit (their mean), strictness 1 the product
    (the default, and what the gold evaluation asks for).

    Args:
        temperature: Softmax temperature of the shape term; lower is sharper.
        strictness: In ``[0, 1]``; a curriculum may raise it during training.

    Raises:
        ValueError: If ``temperature`` is not positive or ``strictness`` outside ``[0, 1]``.
    """

    aspect = "semantic"
    min_frames = 2
    graded = True

    def __init__(self, temperature: float = 0.05, strictness: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"`temperature` ({temperature}) must be positive, e.g. 0.05.")
        self.temperature = temperature
        self.strictness = _check_strictness(type(self).__name__, strictness)

    def score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        return semantic_score(videos, prompts, self.temperature, self.strictness)


__all__ = [
    "PURITY_TOLERANCE",
    "STRICT_PURITY_TOLERANCE",
    "ShapesFidelity",
    "ShapesSemantic",
    "ShapesTemporal",
    "fidelity_score",
    "pixel_purity",
    "semantic_score",
    "temporal_score",
]
