"""Measurements on shapes-world videos: object masks, components, glyph matches, centroids.

Pure tensor functions shared by the exact rewards (:mod:`sp_grpo.toy.rewards`) and the gold
evaluation (:mod:`sp_grpo.toy.gold`). Videos are ``(B, T, 3, H, W)`` in ``[0, 1]``; per-frame
results are ``(B, T, ...)``. Nothing here is differentiable: these are exact, rule-based readings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sp_grpo.toy.world import COLOURS, glyph_masks

#: A pixel whose brightest channel is above this belongs to the object.
OBJECT_THRESHOLD = 0.5


def object_masks(videos: Tensor, threshold: float = OBJECT_THRESHOLD) -> Tensor:
    """Object pixels: the brightest channel above ``threshold``.

    .. math:: m_{t,y,x} = [\\max_c v_{t,c,y,x} > \\tau]

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]``.
        threshold: :math:`\\tau`.

    Returns:
        ``(B, T, H, W)`` bool.
    """
    return videos.float().amax(dim=2) > threshold


def palette_distance(videos: Tensor) -> Tensor:
    """Per pixel, the L-infinity distance to the nearest clean colour (black or a palette colour).

    .. math:: d_{t,y,x} = \\min_{p \\in P \\cup \\{0\\}} \\max_c |v_{t,c,y,x} - p_c|

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]``.

    Returns:
        ``(B, T, H, W)`` fp32 distances in ``[0, 1]``.
    """
    allowed = torch.tensor([(0.0, 0.0, 0.0), *COLOURS.values()], device=videos.device)  # (P+1, 3)
    diff = (videos.float().unsqueeze(2) - allowed.view(1, 1, -1, 3, 1, 1)).abs().amax(dim=3)  # (B, T, P+1, H, W)
    return diff.amin(dim=2)


def component_stats(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Area of each frame's mask and of its largest 8-connected component.

    Components by label propagation: every object pixel starts with its own label and takes the
    largest label among its 8 neighbours until nothing changes (no library offers connected
    components for torch tensors without extra dependencies).

    Args:
        masks: ``(B, T, H, W)`` bool.

    Returns:
        ``(area, largest)``, each ``(B, T)`` fp32 pixel counts.
    """
    b, t, h, w = masks.shape
    flat = masks.reshape(b * t, 1, h, w).float()
    labels = torch.arange(1, h * w + 1, device=masks.device, dtype=torch.float32).view(1, 1, h, w) * flat
    for _ in range(h * w):
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * flat
        if torch.equal(grown, labels):
            break
        labels = grown
    sizes = torch.zeros(b * t, h * w + 1, device=masks.device).scatter_add_(
        1, labels.long().view(b * t, -1), torch.ones(b * t, h * w, device=masks.device)
    )
    area = sizes[:, 1:].sum(dim=1)
    largest = sizes[:, 1:].amax(dim=1)
    return area.view(b, t), largest.view(b, t)


def glyph_iou(masks: Tensor) -> Tensor:
    """Best intersection-over-union of each shape's glyph with each frame's mask, over all placements.

    .. math:: \\mathrm{IoU}_s = \\max_{(x, y)} \\frac{|m \\cap g_s^{(x,y)}|}{|m| + |g_s| - |m \\cap g_s^{(x,y)}|}

    Args:
        masks: ``(B, T, H, W)`` bool.

    Returns:
        ``(B, T, S)`` fp32, one column per shape of :data:`~sp_grpo.toy.world.SHAPES`; 0 for empty frames.
    """
    b, t, h, w = masks.shape
    glyphs = glyph_masks().to(masks.device)  # (S, k, k)
    k = glyphs.shape[-1]
    m = masks.reshape(b * t, 1, h, w).float()
    # Cross-correlation over every placement that overlaps the frame.
    inter = F.conv2d(m, glyphs.unsqueeze(1), padding=k - 1)  # (BT, S, H+k-1, W+k-1)
    union = m.sum(dim=(2, 3), keepdim=True) + glyphs.sum(dim=(1, 2)).view(1, -1, 1, 1) - inter
    iou = (inter / union.clamp(min=1.0)).amax(dim=(2, 3))
    return iou.view(b, t, -1)


def centroids(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Centre of mass of each frame's mask, in pixels.

    Args:
        masks: ``(B, T, H, W)`` bool.

    Returns:
        ``(xy, present)``: ``(B, T, 2)`` fp32 (x, y) centroids (0 for empty frames) and ``(B, T)``
        bool, whether the frame has any object pixel.
    """
    m = masks.float()
    area = m.sum(dim=(2, 3))
    ys = torch.arange(masks.shape[2], device=masks.device, dtype=torch.float32)
    xs = torch.arange(masks.shape[3], device=masks.device, dtype=torch.float32)
    cx = (m.sum(dim=2) * xs).sum(dim=2) / area.clamp(min=1.0)
    cy = (m.sum(dim=3) * ys).sum(dim=2) / area.clamp(min=1.0)
    return torch.stack([cx, cy], dim=-1), area > 0


def mean_object_colour(videos: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Mean RGB of the object pixels, per frame.

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]``.
        masks: ``(B, T, H, W)`` bool.

    Returns:
        ``(rgb, present)``: ``(B, T, 3)`` fp32 (0 where empty) and ``(B, T)`` bool.
    """
    m = masks.float().unsqueeze(2)
    area = m.sum(dim=(3, 4))
    rgb = (videos.float() * m).sum(dim=(3, 4)) / area.clamp(min=1.0)
    return rgb, area[..., 0] > 0


__all__ = [
    "OBJECT_THRESHOLD",
    "centroids",
    "component_stats",
    "glyph_iou",
    "mean_object_colour",
    "object_masks",
    "palette_distance",
]
