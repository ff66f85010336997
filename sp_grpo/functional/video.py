"""Model-free video reward maths: frame quality, temporal coherence and motion.

Every function takes videos ``(B, T, 3, H, W)`` with values in ``[0, 1]`` (or per-frame features)
and returns one float32 score per sample, ``(B,)``. The maths runs in fp32 whatever the input dtype,
because means of many small pixel differences lose most of their digits in fp16/bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "clipped_fraction",
    "dynamic_degree",
    "feature_consistency",
    "laplacian_variance",
    "luma",
    "motion_smoothness",
    "noise_sigma",
    "rms_contrast",
    "temporal_flickering",
]

# ITU-R BT.601 luma weights, the ones OpenCV's grey conversion uses.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def luma(videos: Tensor) -> Tensor:
    """Grey-level (luma) of RGB frames.

    .. math:: Y = 0.299 R + 0.587 G + 0.114 B

    Args:
        videos: ``(..., 3, H, W)`` RGB values in ``[0, 1]``.

    Returns:
        ``(..., H, W)`` float32 luma in ``[0, 1]``.
    """
    weights = videos.new_tensor(_LUMA_WEIGHTS, dtype=torch.float32)
    # fp32: the weighted sum is the base of every statistic below.
    return torch.einsum("...chw,c->...hw", videos.float(), weights)


def temporal_flickering(videos: Tensor) -> Tensor:
    """VBench temporal-flickering score: one minus the mean absolute change between frames.

    VBench averages, over consecutive frame pairs, the mean absolute pixel difference on the 0-255
    scale, then maps it to ``(255 - mae) / 255``. On ``[0, 1]`` videos that is the expression below.
    A static video scores exactly 1.

    .. math:: s = \\frac{255 - \\frac{1}{T-1}\\sum_{t=1}^{T-1}
        \\operatorname{mean}_{c,h,w} |255 x_t - 255 x_{t-1}|}{255}

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]``, ``T >= 2``.

    Returns:
        ``(B,)`` float32 scores in ``[0, 1]``, higher is steadier.
    """
    # fp32 and the 0-255 scale, to follow VBench's arithmetic step by step.
    pixels = videos.float() * 255.0
    mae_per_pair = (pixels[:, 1:] - pixels[:, :-1]).abs().mean(dim=(2, 3, 4))
    return (255.0 - mae_per_pair.mean(dim=1)) / 255.0


def feature_consistency(features: Tensor) -> Tensor:
    """VBench subject/background consistency of per-frame features.

    Each frame ``t >= 1`` is compared with the first frame and with the previous frame by cosine
    similarity, each clamped at zero; the two are averaged and the result is averaged over frames.
    VBench's subject consistency uses DINO features, background consistency CLIP image features.

    .. math:: s = \\frac{1}{T-1}\\sum_{t=1}^{T-1} \\tfrac12\\big(\\max(0, \\cos(f_t, f_{t-1}))
        + \\max(0, \\cos(f_t, f_0))\\big)

    Args:
        features: ``(B, T, D)`` per-frame features, ``T >= 2``.

    Returns:
        ``(B,)`` float32 scores in ``[0, 1]``.
    """
    # fp32: cosine similarities of nearly identical features differ only in late digits.
    feats = F.normalize(features.float(), dim=-1)
    to_previous = (feats[:, 1:] * feats[:, :-1]).sum(-1).clamp_min(0.0)
    to_first = (feats[:, 1:] * feats[:, :1]).sum(-1).clamp_min(0.0)
    return (0.5 * (to_previous + to_first)).mean(dim=1)


def motion_smoothness(videos: Tensor) -> Tensor:
    """Model-free motion smoothness: how well each frame is predicted from its two neighbours.

    VBench drops every other frame, re-creates it with a learned frame interpolator (AMT) and scores
    ``(255 - mae) / 255``. Without a learned interpolator we predict each inner frame as the average
    of its neighbours (linear interpolation in pixel space): constant-velocity fades and static
    scenes score 1, jerky or flickering ones lower. Slow, smooth motion of sharp edges also costs a
    little, because pixel averaging is not motion-compensated.

    .. math:: s = 1 - \\frac{1}{T-2}\\sum_{t=1}^{T-2}
        \\operatorname{mean}_{c,h,w}\\big|x_t - \\tfrac12(x_{t-1} + x_{t+1})\\big|

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]``, ``T >= 3``.

    Returns:
        ``(B,)`` float32 scores in ``[0, 1]``, higher is smoother.
    """
    x = videos.float()  # fp32: small residuals
    predicted = 0.5 * (x[:, :-2] + x[:, 2:])
    return 1.0 - (x[:, 1:-1] - predicted).abs().mean(dim=(1, 2, 3, 4))


def dynamic_degree(videos: Tensor, threshold: float = 0.05, top_fraction: float = 0.05) -> Tensor:
    """Model-free dynamic degree: how much of the video moves, saturating at ``threshold``.

    VBench estimates optical flow with RAFT, takes the mean of the top 5% flow magnitudes per frame
    pair and calls a video dynamic when enough pairs exceed a threshold (a 0/1 score per video). We
    cannot run RAFT here, so the magnitude of a pair is the mean of the top ``top_fraction`` of
    absolute luma changes, and the score is continuous so that GRPO gets a signal:

    .. math:: m_t = \\operatorname{mean}\\big(\\operatorname{top}_{q}
        |Y_t - Y_{t-1}|\\big),\\qquad s = \\frac{1}{T-1}\\sum_{t=1}^{T-1} \\min(1, m_t / \\tau)

    A static video scores exactly 0. Saturation at ``tau`` means extra chaos beyond clear motion
    earns nothing.

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]``, ``T >= 2``.
        threshold: ``tau``, the luma change (in ``[0, 1]`` units) counted as full motion.
        top_fraction: ``q``, the fraction of pixels with the largest change that are averaged.

    Returns:
        ``(B,)`` float32 scores in ``[0, 1]``.

    Raises:
        ValueError: If ``threshold`` is not positive or ``top_fraction`` is not in ``(0, 1]``.
    """
    if threshold <= 0:
        raise ValueError(f"`threshold` ({threshold}) must be positive: it is the luma change counted as full motion.")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"`top_fraction` ({top_fraction}) must be in (0, 1]: it is the share of pixels averaged.")
    y = luma(videos)  # (B, T, H, W), fp32
    change = (y[:, 1:] - y[:, :-1]).abs().flatten(2)  # (B, T-1, H*W)
    k = max(1, math.ceil(top_fraction * change.shape[-1]))
    magnitude = change.topk(k, dim=-1).values.mean(-1)  # (B, T-1)
    return (magnitude / threshold).clamp(max=1.0).mean(dim=1)


def laplacian_variance(videos: Tensor) -> Tensor:
    """Sharpness as the variance of the Laplacian of the luma, averaged over frames.

    The classic focus measure: blur removes high frequencies and so lowers the variance of the
    4-neighbour Laplacian. Computed on the valid (unpadded) region.

    .. math:: L = Y * \\begin{bmatrix}0&1&0\\\\1&-4&1\\\\0&1&0\\end{bmatrix},\\qquad
        s = \\frac1T\\sum_t \\operatorname{Var}_{h,w}(L_t)

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]``, ``H, W >= 3``.

    Returns:
        ``(B,)`` float32, zero for a flat video, larger for sharper ones.
    """
    y = luma(videos)
    batch, frames, height, width = y.shape
    kernel = y.new_tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    lap = F.conv2d(y.reshape(batch * frames, 1, height, width), kernel)
    return lap.flatten(1).var(dim=1, unbiased=False).view(batch, frames).mean(dim=1)


def noise_sigma(videos: Tensor) -> Tensor:
    """Immerkær's fast estimate of the standard deviation of additive white noise, per video.

    The mask below is the difference of two Laplacians; it cancels smooth image structure and keeps
    noise, whose absolute response is proportional to its standard deviation.

    .. math:: \\sigma = \\sqrt{\\frac{\\pi}{2}} \\frac{1}{6 (W-2)(H-2)} \\sum_{h,w}
        \\Big|Y * \\begin{bmatrix}1&-2&1\\\\-2&4&-2\\\\1&-2&1\\end{bmatrix}\\Big|

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]``, ``H, W >= 3``.

    Returns:
        ``(B,)`` float32 noise standard deviation in ``[0, 1]`` units, averaged over frames.
    """
    y = luma(videos)
    batch, frames, height, width = y.shape
    mask = y.new_tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]]).view(1, 1, 3, 3)
    response = F.conv2d(y.reshape(batch * frames, 1, height, width), mask).abs()
    sigma = math.sqrt(math.pi / 2) * response.flatten(1).sum(1) / (6 * (width - 2) * (height - 2))
    return sigma.view(batch, frames).mean(dim=1)


def clipped_fraction(videos: Tensor, low: float = 0.02, high: float = 0.98) -> Tensor:
    """Share of pixels whose luma is crushed to black or blown out to white.

    .. math:: s = \\operatorname{mean}_{t,h,w}\\,[Y < \\text{low}] + [Y > \\text{high}]

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]``.
        low: luma strictly below which a pixel counts as crushed black.
        high: luma strictly above which a pixel counts as blown-out white.

    Returns:
        ``(B,)`` float32 fractions in ``[0, 1]``; lower is better exposed.

    Raises:
        ValueError: If not ``0 <= low < high <= 1``.
    """
    if not 0 <= low < high <= 1:
        raise ValueError(f"`low` ({low}) and `high` ({high}) must satisfy 0 <= low < high <= 1.")
    y = luma(videos)
    return ((y < low) | (y > high)).float().mean(dim=(1, 2, 3))


def rms_contrast(videos: Tensor) -> Tensor:
    """RMS contrast: the standard deviation of the luma within a frame, averaged over frames.

    .. math:: s = \\frac1T\\sum_t \\operatorname{Std}_{h,w}(Y_t)

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]``.

    Returns:
        ``(B,)`` float32 in ``[0, 0.5]``; zero for a flat frame.
    """
    y = luma(videos)
    return y.flatten(2).std(dim=2, unbiased=False).mean(dim=1)
