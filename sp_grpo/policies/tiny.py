"""Tiny Wan generators built offline, for tests, notebooks and the CPU demo.

Real diffusers and transformers classes (``WanTransformer3DModel``, ``AutoencoderKLWan``,
``UMT5EncoderModel``) at toy sizes, with random weights and a word-level tokenizer built here, so
nothing is downloaded. Sizes follow diffusers' own dummy components for Wan.
"""

from __future__ import annotations

from typing import Any, Sequence

from sp_grpo.policies.diffusers_helpers import save_folder, seeded
from sp_grpo.policies.wan import WanComponents, WanPolicy

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # T5's convention: pad 0, eos 1, unk 2
DEFAULT_VOCABULARY = tuple(
    """a an the of in on at to from with and or is are video clip scene shot
    red green blue yellow orange purple pink white black gray grey brown cyan magenta
    square circle triangle ball cube box star ring disk dot shape object cat dog bird car person
    moving moves move left right up down across around slowly quickly fast slow still static rotating
    small large big tiny bright dark background foreground sky water field street room
    high quality blurry low worst best""".split()
)


def build_tokenizer(vocabulary: Sequence[str] = DEFAULT_VOCABULARY):
    """A lower-casing word-level tokenizer that appends ``</s>``, as T5's does.

    Unknown words map to ``<unk>``; punctuation is split off.

    Args:
        vocabulary: Words of the vocabulary (duplicates are ignored).

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` that saves and loads with ``save_pretrained`` /
        ``AutoTokenizer.from_pretrained``.

    Example:
        >>> tokenizer = build_tokenizer(["red", "square"])
        >>> tokenizer("A red square, moving!").input_ids  # unknown words -> <unk> (2), then </s> (1)
        [2, 3, 4, 2, 2, 2, 1]
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys([*SPECIAL_TOKENS, *(w.lower() for w in vocabulary)]))
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_text_encoder(vocab_size: int, text_dim: int = 32):
    """A 2-layer UMT5 encoder of width ``text_dim`` with random weights (uses the global RNG)."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=text_dim,
        d_kv=8,
        d_ff=2 * text_dim,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
    )
    return UMT5EncoderModel(config)


def tiny_wan_components(
    seed: int = 0,
    *,
    vocabulary: Sequence[str] = DEFAULT_VOCABULARY,
    latent_channels: int = 4,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 12,
    ffn_dim: int = 32,
    text_dim: int = 32,
    shift: float = 3.0,
) -> WanComponents:
    """Build a tiny Wan (transformer, VAE, UMT5 encoder, tokenizer, scheduler) with random weights.

    The VAE has Wan's strides (4 in time, 8 in space), so a ``9 x 64 x 64`` video has latents of
    shape ``(latent_channels, 3, 8, 8)``.

    Args:
        seed: Seed of the random weights; the same seed gives the same model.
        vocabulary: Words of the tokenizer.
        latent_channels: VAE latent channels (the transformer's in/out channels).
        num_layers: Transformer blocks.
        num_attention_heads: Attention heads per block.
        attention_head_dim: Width of each head.
        ffn_dim: Hidden width of the feed-forward layers.
        text_dim: Width of the text encoder.
        shift: Flow shift of the sigma schedule.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    tokenizer = build_tokenizer(vocabulary)
    with seeded(seed):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=latent_channels,
            out_channels=latent_channels,
            text_dim=text_dim,
            freq_dim=32,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=latent_channels,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * latent_channels,
            latents_std=[1.0] * latent_channels,
        )
        text_encoder = tiny_text_encoder(len(tokenizer), text_dim)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    return WanComponents(transformer, vae, text_encoder, tokenizer, scheduler)


class TinyWanPolicy(WanPolicy):
    """A :class:`WanPolicy` around :func:`tiny_wan_components`: builds offline in well under a second.

    Args:
        seed: Seed of the random weights and of the LoRA initialisation.
        lora_rank: LoRA rank through peft; ``None`` trains the whole transformer.
        num_layers: Transformer blocks.
        max_sequence_length: Text tokens per prompt.
        **settings: The other settings every backbone shares, fields of
            :class:`~sp_grpo.policies.settings.PolicySettings` (``reference_copy``, ``cfg_batched``, ...).
    """

    def __init__(self, seed: int = 0, *, lora_rank: int | None = 4, num_layers: int = 2, max_sequence_length: int = 16, **settings: Any) -> None:
        super().__init__(
            components=tiny_wan_components(seed, num_layers=num_layers),
            max_sequence_length=max_sequence_length,
            lora_rank=lora_rank,
            lora_seed=seed,
            **settings,
        )


#: Write components as the diffusers ``WanPipeline`` folder that :class:`WanPolicy` loads (pixel space: no ``vae/``).
save_wan_folder = save_folder


__all__ = ["DEFAULT_VOCABULARY", "TinyWanPolicy", "build_tokenizer", "save_wan_folder", "tiny_text_encoder", "tiny_wan_components"]
