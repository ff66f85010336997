"""Text-video alignment maths: embedding similarity, colour-word alignment, linear score heads.

Pure functions, tensors in and out, fp32 maths. Parsing a prompt into colour words lives here too
because it is a deterministic function of the text that the model-free semantic reward needs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "COLOUR_PROTOTYPES",
    "colour_affinity",
    "find_colours",
    "margin_credit",
    "linear_head_score",
    "text_video_similarity",
]

#: RGB prototypes in ``[0, 1]`` of the colour words the model-free semantic reward understands.
COLOUR_PROTOTYPES: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.8, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "orange": (1.0, 0.55, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "pink": (1.0, 0.6, 0.8),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "brown": (0.55, 0.3, 0.1),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
    "grey": (0.5, 0.5, 0.5),
}

_WORD = re.compile(r"[a-z]+")


def find_colours(prompt: str, vocabulary: Sequence[str] | None = None) -> list[str]:
    """Colour words of ``prompt`` in order of appearance, duplicates removed.

    Args:
        prompt: free text; matching is case-insensitive and on whole words.
        vocabulary: the colour words to look for; defaults to the keys of :data:`COLOUR_PROTOTYPES`.

    Returns:
        The colour words found, e.g. ``["red", "blue"]`` for "A red ball on a blue mat".

    Example:
        >>> find_colours("A Red square and a red circle on GREY")
        ['red', 'grey']
    """
    known = set(COLOUR_PROTOTYPES if vocabulary is None else vocabulary)
    found: list[str] = []
    for word in _WORD.findall(prompt.lower()):
        if word in known and word not in found:
            found.append(word)
    return found


def colour_affinity(videos: Tensor, colours: Tensor, bandwidth: float = 0.25) -> Tensor:
    """How much of each video is close to a target colour: a soft fraction of matching pixels.

    Each pixel gets a Gaussian affinity to the target colour in RGB space; the score is the mean
    affinity over pixels and frames, so it grows with the area the colour covers and with how
    exactly it is matched.

    .. math:: s_b = \\operatorname{mean}_{t,h,w}
        \\exp\\Big(-\\frac{\\lVert x_{b,t,:,h,w} - c_b\\rVert^2}{2\\,\\beta^2}\\Big)

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]``.
        colours: ``(B, 3)`` target RGB colour per sample in ``[0, 1]``.
        bandwidth: ``beta``, the RGB distance at which affinity falls to ``exp(-1/2)``.

    Returns:
        ``(B,)`` float32 scores in ``[0, 1]``.

    Raises:
        ValueError: If ``bandwidth`` is not positive.
    """
    if bandwidth <= 0:
        raise ValueError(f"`bandwidth` ({bandwidth}) must be positive: it is an RGB distance.")
    # fp32: squared distances of nearby colours are tiny.
    diff = videos.float() - colours.float().to(videos.device)[:, None, :, None, None]
    sq_dist = diff.pow(2).sum(dim=2)  # (B, T, H, W)
    return torch.exp(-sq_dist / (2 * bandwidth**2)).mean(dim=(1, 2, 3))


def text_video_similarity(frame_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Frame-averaged cosine similarity between each video and its prompt (CLIP-score style).

    .. math:: s_b = \\frac1T\\sum_t \\cos(f_{b,t}, e_b)

    Args:
        frame_embeds: ``(B, T, D)`` image embeddings of the frames.
        text_embeds: ``(B, D)`` text embedding of each sample's prompt.

    Returns:
        ``(B,)`` float32 cosine similarities in ``[-1, 1]``.
    """
    # fp32: embeddings often come out of a bf16 backbone.
    frames = F.normalize(frame_embeds.float(), dim=-1)
    text = F.normalize(text_embeds.float(), dim=-1)
    return torch.einsum("btd,bd->bt", frames, text).mean(dim=1)


def margin_credit(similarity: Tensor, margin: float, temperature: float = 0.01) -> Tensor:
    """Credit for a similarity above a margin: a smooth hinge, so samples below the margin earn ~0.

    Raising the margin makes an alignment reward stricter: within a GRPO group, samples that only
    roughly match the prompt stop earning credit, and the advantage goes to those that clear it.

    .. math:: c = \\tau \\log\\big(1 + e^{(s - m) / \\tau}\\big)

    Args:
        similarity: ``(B,)`` similarities.
        margin: :math:`m`.
        temperature: :math:`\\tau > 0`, the width of the hinge's bend.

    Returns:
        ``(B,)`` fp32 credits, non-negative and increasing in ``similarity``.

    Example:
        >>> margin_credit(torch.tensor([0.1, 0.3, 0.5]), margin=0.3, temperature=1e-4).round(decimals=3)
        tensor([0.0000, 0.0000, 0.2000])
    """
    return temperature * F.softplus((similarity.float() - margin) / temperature)


def linear_head_score(embeds: Tensor, layers: Sequence[tuple[Tensor, Tensor]], normalize: bool = True) -> Tensor:
    """Apply a chain of affine layers (no activations) to L2-normalized embeddings.

    This is the form of the LAION aesthetic predictors: the original one is a single linear layer
    on CLIP ViT-L/14 embeddings, the "improved" one a stack of linear layers with dropout and no
    non-linearity between them. Both take unit-norm embeddings.

    .. math:: z_0 = e / \\lVert e\\rVert,\\qquad z_{k+1} = W_k z_k + b_k,\\qquad s = z_K

    Args:
        embeds: ``(N, D)`` image embeddings.
        layers: ``[(W_0, b_0), ...]`` with ``W_k`` of shape ``(D_{k+1}, D_k)`` and the last output
            size 1.
        normalize: L2-normalize ``embeds`` first (LAION's heads expect it).

    Returns:
        ``(N,)`` float32 scores.
    """
    z = embeds.float()  # fp32: the head was trained in fp32
    if normalize:
        z = F.normalize(z, dim=-1)
    for weight, bias in layers:
        z = F.linear(z, weight.float().to(z.device), bias.float().to(z.device))
    return z.squeeze(-1)
