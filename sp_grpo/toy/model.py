"""The tiny generator of the shapes world: diffusers' Wan transformer in pixel space, and its shipped weights.

The network is the real ``WanTransformer3DModel`` with a UMT5 text encoder, at a size that runs a
GRPO iteration in about a second on two CPU cores. It works on pixels: its VAE is the identity
(:class:`~sp_grpo.toy.pixel_vae.PixelSpaceVAE`), latents are the RGB frames scaled to ``[-1, 1]``,
laid out ``(3, T, H, W)``. Its patch is one world cell
(:data:`~sp_grpo.toy.world.CELL`), so each token is a cell of one frame.

``sp_grpo/toy/checkpoint/`` holds weights pre-trained by flow matching on rendered videos
(``python -m sp_grpo.toy.pretrain``); :class:`ShapesWanPolicy` loads them, offline.

Wan encodes positions only with rotary embeddings, which are relative: a token cannot tell which
frame or where in the frame it is, except by attending to the edges of the video. A tiny model
then spreads the object over frames and positions instead of moving it (seen here: objects that
pop in and out). :class:`ShapesWanTransformer` adds one learned absolute position embedding to the
patch embeddings; everything else is diffusers' ``WanTransformer3DModel``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    ModelMixin,  # noqa: F401 - see below
    WanTransformer3DModel,
)
from torch import Tensor, nn

from sp_grpo.policies.diffusers_helpers import seeded
from sp_grpo.policies.tiny import build_tokenizer, tiny_text_encoder
from sp_grpo.policies.wan import WanComponents, WanPolicy
from sp_grpo.toy.pixel_vae import PixelSpaceVAE
from sp_grpo.toy.world import CELL, GRID, NUM_FRAMES, VOCABULARY

#: The shipped pre-trained generator (a diffusers Wan folder without ``vae/``: pixel space).
CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"
#: An earlier checkpoint of the same pre-training recipe (seed 0, step 400 of a CPU run), the ablation's
#: weak start: colour learned, fidelity and temporal rewards clearly below the shipped one's (README).
WEAK_CHECKPOINT_DIR = Path(__file__).parent / "checkpoint_weak"
#: Text tokens per prompt: five words and the end-of-sequence token, with room to spare.
MAX_SEQUENCE_LENGTH = 8
# `ModelMixin` is imported above for diffusers: loading a pipeline folder whose model_index.json names
# ["sp_grpo.toy.model", "ShapesWanTransformer"] (the shipped checkpoint, an `sp-grpo export`), it looks
# up its loadable base classes in this module. With it, `WanPipeline.from_pretrained(folder, vae=None)`
# works once sp_grpo.toy is imported.


class ShapesWanTransformer(WanTransformer3DModel):
    """``WanTransformer3DModel`` plus a learned absolute position embedding of the shapes world's grid.

    The embedding, ``(1, inner_dim, NUM_FRAMES, GRID, GRID)``, is added to the patch embeddings by a
    forward hook, so the parent's ``forward`` runs unchanged; it saves and loads with the other
    weights (``ShapesWanTransformer.from_pretrained``). Arguments are the parent's.
    """

    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, CELL, CELL),
        num_attention_heads: int = 2,
        attention_head_dim: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        text_dim: int = 32,
        freq_dim: int = 64,
        ffn_dim: int = 128,
        num_layers: int = 2,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 32,
        pos_embed_seq_len: int | None = None,
    ) -> None:
        # The signature is spelled out because diffusers maps config.json onto it.
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        inner = num_attention_heads * attention_head_dim
        self.absolute_position = nn.Parameter(0.02 * torch.randn(1, inner, NUM_FRAMES, GRID, GRID))
        # A bound method (not a lambda), so deepcopy (the KL reference copy) rebinds it to the copy.
        self.patch_embedding.register_forward_hook(self._add_position)

    def _add_position(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        frames, height, width = output.shape[2:]
        return output + self.absolute_position[:, :, :frames, :height, :width].to(output.dtype)


def load_shapes_components(path: str | Path) -> WanComponents:
    """Load a shapes-world folder (written by :func:`~sp_grpo.policies.tiny.save_wan_folder`) offline.

    Args:
        path: The folder (``transformer/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``).

    Returns:
        Components with the identity VAE (:class:`~sp_grpo.toy.pixel_vae.PixelSpaceVAE`).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, UMT5EncoderModel

    folder = Path(path)
    transformer = ShapesWanTransformer.from_pretrained(folder / "transformer", local_files_only=True)
    text_encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    return WanComponents(transformer, PixelSpaceVAE(), text_encoder, tokenizer, scheduler)


def shapes_wan_components(
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 32,
    ffn_dim: int = 128,
    text_dim: int = 32,
    shift: float = 1.0,
) -> WanComponents:
    """Build the shapes world's generator with random weights (the start of pre-training).

    Args:
        seed: Seed of the random weights.
        num_layers: Transformer blocks.
        num_attention_heads: Attention heads per block.
        attention_head_dim: Width of each head; Wan's rotary embedding splits it over (t, h, w).
        ffn_dim: Hidden width of the feed-forward layers.
        text_dim: Width of the UMT5 text encoder.
        shift: Flow shift of the sigma schedule (1: none; the frames are tiny).

    Returns:
        Components with the identity VAE (pixel space) and the world's word-level tokenizer.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer = build_tokenizer(VOCABULARY)
    with seeded(seed):
        transformer = ShapesWanTransformer(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            text_dim=text_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
        )
        text_encoder = tiny_text_encoder(len(tokenizer), text_dim)
    return WanComponents(transformer, PixelSpaceVAE(), text_encoder, tokenizer, FlowMatchEulerDiscreteScheduler(shift=shift))


class ShapesWanPolicy(WanPolicy):
    """The pre-trained shapes-world generator shipped with the package, as a :class:`WanPolicy`.

    Loads ``sp_grpo/toy/checkpoint/`` (or ``pretrained_path``) offline; nothing is downloaded.

    Args:
        pretrained_path: A folder written by ``python -m sp_grpo.toy.pretrain``; ``None`` loads the
            shipped checkpoint.
        lora_rank: LoRA rank through peft; ``None`` trains the whole transformer.
        **settings: The other settings every backbone shares, fields of
            :class:`~sp_grpo.policies.settings.PolicySettings` (``reference_copy``, ``lora_seed``, ...).

    Raises:
        FileNotFoundError: If the checkpoint folder is missing.
    """

    def __init__(self, pretrained_path: str | None = None, *, lora_rank: int | None = 8, **settings: Any) -> None:
        path = Path(pretrained_path) if pretrained_path is not None else CHECKPOINT_DIR
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(
                f"No shapes-world checkpoint at {str(path)!r}: reinstall sp_grpo (the package ships"
                " sp_grpo/toy/checkpoint/) or pre-train one with `python -m sp_grpo.toy.pretrain --out DIR` and pass"
                " `pretrained_path: DIR`."
            )
        super().__init__(components=load_shapes_components(path), max_sequence_length=MAX_SEQUENCE_LENGTH, lora_rank=lora_rank, **settings)
        #: The folder the weights came from (the shipped checkpoint unless ``pretrained_path`` is given).
        self.pretrained_path = str(path)


__all__ = [
    "CHECKPOINT_DIR",
    "MAX_SEQUENCE_LENGTH",
    "WEAK_CHECKPOINT_DIR",
    "ShapesWanPolicy",
    "ShapesWanTransformer",
    "load_shapes_components",
    "shapes_wan_components",
]
