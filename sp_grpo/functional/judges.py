"""Pure maths for VLM video judges: Qwen2-VL-style video patches and yes/no probabilities.

Qwen2-VL and Qwen2.5-VL read a video as a grid of patches: frames are resized so both sides are
multiples of ``patch_size * merge_size`` with the pixel count inside ``[min_pixels, max_pixels]``,
normalized, grouped ``temporal_patch_size`` frames at a time, and flattened patch by patch in the
order the vision tower's 2x2 token merger expects. ``transformers`` ships this as its video
processor, which needs ``torchvision``; these functions do the same in plain torch on tensors that are
already frames in ``[0, 1]`` (no decoding), so a judge runs on the generator's output directly.

:func:`answer_spellings` is the one definition of how a yes/no answer's first token may be spelled;
the in-process judge maps it to token ids, the HTTP judge matches it against the tokens a server
returns, and both sum the probability over every spelling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "QWEN_VIDEO_MAX_PIXELS",
    "QWEN_VIDEO_MIN_PIXELS",
    "answer_spellings",
    "patchify_video",
    "resize_for_patches",
    "smart_size",
    "video_frame_count",
    "yes_probability",
]

# Qwen2-VL / Qwen2.5-VL video input defaults (transformers' `Qwen2VLVideoProcessor.size` and qwen-vl-utils'
# VIDEO_MIN_PIXELS / VIDEO_MAX_PIXELS): a frame's area after resizing. They differ from the image
# processor's (56 * 56 .. 28 * 28 * 1280), which a hub folder's preprocessor_config.json holds.
QWEN_VIDEO_MIN_PIXELS = 128 * 28 * 28
QWEN_VIDEO_MAX_PIXELS = 768 * 28 * 28


def answer_spellings(words: Sequence[str]) -> tuple[str, ...]:
    """Every spelling of the answer words a first answer token may have, without duplicates.

    A chat model may start its answer with ``"Yes"``, ``" Yes"``, ``"yes"`` or ``" yes"``, each a
    different token; a judge's score sums the probability of all of them. Spellings that are not one
    token of a given tokenizer are dropped by the caller.

    Args:
        words: the answer words as written in the question, e.g. ``("Yes",)``.

    Returns:
        Each word as given, after a space, in lower case, and in lower case after a space, in that order.

    Example:
        >>> answer_spellings(["Yes"])
        ('Yes', ' Yes', 'yes', ' yes')
    """
    spellings: dict[str, None] = {}  # an ordered set
    for word in words:
        word = word.strip()
        for form in (word, " " + word, word.lower(), " " + word.lower()):
            spellings[form] = None
    return tuple(spellings)


def video_frame_count(total: int, num_frames: int, temporal_patch_size: int) -> int:
    """How many frames of a ``total``-frame video a Qwen2-VL video input takes.

    The vision tower reads ``temporal_patch_size`` frames per patch, so the count is rounded down to a
    multiple of it (as Qwen's video processors do), never above ``total``; a video shorter than one
    temporal patch is used whole (its last frame is repeated by :func:`patchify_video`).

    .. math:: n = \\max\\bigl(t\\,\\lfloor \\min(N, T) / t \\rfloor,\\ \\min(T, t)\\bigr)

    Args:
        total: frames in the video, ``T``.
        num_frames: frames asked for, ``N``.
        temporal_patch_size: ``t`` (2 for Qwen2-VL and Qwen2.5-VL).

    Returns:
        The number of frames to sample.

    Example:
        >>> video_frame_count(16, 8, 2), video_frame_count(5, 8, 2), video_frame_count(1, 8, 2)
        (8, 4, 1)
    """
    return max(temporal_patch_size * (min(num_frames, total) // temporal_patch_size), min(total, temporal_patch_size))


def smart_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The resized ``(height, width)`` a Qwen2-VL processor uses for a frame.

    Both sides are rounded to multiples of ``factor``; if the area leaves ``[min_pixels, max_pixels]``
    the frame is scaled by :math:`\\sqrt{\\text{area}/\\text{bound}}` first (down to the largest
    multiples below, or up to the smallest above), keeping the aspect ratio.

    .. math:: h' = f\\,\\operatorname{round}(h/f),\\quad w' = f\\,\\operatorname{round}(w/f)

    Args:
        height: frame height in pixels.
        width: frame width in pixels.
        factor: ``patch_size * merge_size`` (28 for Qwen2.5-VL).
        min_pixels: the smallest allowed area.
        max_pixels: the largest allowed area.

    Returns:
        ``(height, width)``, both multiples of ``factor``.

    Raises:
        ValueError: If the aspect ratio exceeds 200 (the processors refuse such frames too).

    Example:
        >>> smart_size(480, 832, factor=28, min_pixels=56 * 56, max_pixels=360 * 420)
        (280, 504)
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"smart_size: aspect ratio {max(height, width) / min(height, width):.1f} exceeds 200.")
    new_h, new_w = round(height / factor) * factor, round(width / factor) * factor
    if new_h * new_w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / beta / factor) * factor)
        new_w = max(factor, math.floor(width / beta / factor) * factor)
    elif new_h * new_w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_h, new_w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return new_h, new_w


def resize_for_patches(
    frames: Tensor,
    factor: int,
    min_pixels: int,
    max_pixels: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> Tensor:
    """Resize frames to :func:`smart_size` (bicubic, antialiased, as the processors do) and normalize.

    .. math:: \\hat x = (\\operatorname{resize}(x) - \\mu) / \\sigma

    Args:
        frames: ``(..., 3, H, W)`` in ``[0, 1]``.
        factor: ``patch_size * merge_size``.
        min_pixels: the smallest allowed area.
        max_pixels: the largest allowed area.
        mean: per-channel mean.
        std: per-channel standard deviation.

    Returns:
        ``(..., 3, H', W')`` float32.
    """
    x = frames.float()  # fp32: interpolation and normalization
    lead, (height, width) = x.shape[:-3], x.shape[-2:]
    new_h, new_w = smart_size(height, width, factor, min_pixels, max_pixels)
    x = x.reshape(-1, 3, height, width)
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    x = (x - x.new_tensor(mean).view(1, 3, 1, 1)) / x.new_tensor(std).view(1, 3, 1, 1)
    return x.reshape(*lead, 3, new_h, new_w)


def patchify_video(
    video: Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[Tensor, tuple[int, int, int]]:
    """Flatten one normalized video into the patch sequence of a Qwen2-VL vision tower.

    Frames are padded to a multiple of ``temporal_patch_size`` by repeating the last one. Patches are
    ordered time-major, then by ``merge_size x merge_size`` block, then within the block (row, column),
    so that consecutive ``merge_size**2`` patches are the ones the merger fuses into one token.

    Args:
        video: ``(T, C, H, W)``, with ``H`` and ``W`` multiples of ``patch_size * merge_size``.
        patch_size: spatial patch side.
        merge_size: side of the block of patches merged into one language-model token.
        temporal_patch_size: frames per patch.

    Returns:
        ``(patches, (grid_t, grid_h, grid_w))`` with ``patches`` of shape
        ``(grid_t * grid_h * grid_w, C * temporal_patch_size * patch_size**2)``; the language model sees
        ``grid_t * grid_h * grid_w / merge_size**2`` video tokens.

    Raises:
        ValueError: If ``H`` or ``W`` is not a multiple of ``patch_size * merge_size``.
    """
    frames, channels, height, width = video.shape
    factor = patch_size * merge_size
    if height % factor or width % factor:
        raise ValueError(
            f"patchify_video: frame size {height}x{width} must be multiples of patch_size * merge_size ({factor})."
        )
    if pad := -frames % temporal_patch_size:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
        frames += pad
    grid_t, grid_h, grid_w = frames // temporal_patch_size, height // patch_size, width // patch_size
    patches = video.reshape(
        grid_t, temporal_patch_size, channels,
        grid_h // merge_size, merge_size, patch_size,
        grid_w // merge_size, merge_size, patch_size,
    )
    # (t, block_row, block_col, row_in_block, col_in_block | channel, frame_in_patch, y, x)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(grid_t * grid_h * grid_w, -1), (grid_t, grid_h, grid_w)


def yes_probability(logits: Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]) -> Tensor:
    """P("yes") of a yes/no answer from its first-token logits, renormalized over the two answers.

    Probability mass of several spellings ("Yes", " yes") adds up; every other token is ignored, so the
    score does not depend on how much mass the model puts on unrelated continuations.

    .. math:: p = \\frac{\\sum_{y} e^{\\ell_y}}{\\sum_{y} e^{\\ell_y} + \\sum_{n} e^{\\ell_n}}

    Args:
        logits: ``(N, V)`` next-token logits.
        yes_ids: token ids meaning yes.
        no_ids: token ids meaning no.

    Returns:
        ``(N,)`` float32 in ``[0, 1]``.

    Example:
        >>> yes_probability(torch.tensor([[0.0, 2.0, 2.0, 9.0]]), yes_ids=[1, 2], no_ids=[0]).round(decimals=4)
        tensor([0.9366])
    """
    logits = logits.float()  # fp32: bf16 logits round differences of a few tenths
    yes = torch.logsumexp(logits[:, list(yes_ids)], dim=-1)
    no = torch.logsumexp(logits[:, list(no_ids)], dim=-1)
    return torch.sigmoid(yes - no)
