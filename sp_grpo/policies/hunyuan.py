"""HunyuanVideo text-to-video generators from diffusers, as a :class:`~sp_grpo.policies.VideoPolicy`.

Built on diffusers' ``HunyuanVideoTransformer3DModel``, ``AutoencoderKLHunyuanVideo`` and
``FlowMatchEulerDiscreteScheduler``, with transformers' Llama (token embeddings, from the third-last
layer, of a templated prompt) and CLIP (pooled embedding) text encoders, following
``HunyuanVideoPipeline``. HunyuanVideo is guidance-distilled: the guidance scale is an input of the
network (``embedded_guidance_scale``); the sampler's ``guidance_scale`` is true classifier-free
guidance with a negative prompt, usually 1 (off).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from sp_grpo.policies.base import PromptEmbeds
from sp_grpo.policies.common import DiffusersVideoPolicy, DType, build_pipeline, check_diffusers_folder, flow_sigmas, pack_text, resolve_dtype, unpack_text

# HunyuanVideoPipeline's default Llama prompt template, and how many of its tokens precede the prompt.
DEFAULT_PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
DEFAULT_CROP_START = 95
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_MAX_LENGTH = 77


@dataclass
class HunyuanVideoComponents:
    """The parts of a HunyuanVideo pipeline folder, already built or loaded."""

    transformer: nn.Module
    vae: nn.Module
    text_encoder: nn.Module  # Llama
    tokenizer: Any
    text_encoder_2: nn.Module  # CLIP text model
    tokenizer_2: Any
    scheduler: Any


def load_hunyuan_components(path: str, torch_dtype: torch.dtype = torch.float32) -> HunyuanVideoComponents:
    """Load a diffusers HunyuanVideo folder from a local path; nothing is downloaded.

    The transformer and both text encoders are loaded in ``torch_dtype``; the VAE stays fp32.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the path is not a diffusers HunyuanVideo folder.
    """
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
    from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

    required = ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    folder = check_diffusers_folder(path, required, "HunyuanVideo", "hunyuanvideo-community/HunyuanVideo")
    local = {"local_files_only": True}
    transformer = HunyuanVideoTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch_dtype, **local)
    vae = AutoencoderKLHunyuanVideo.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32, **local)
    text_encoder = LlamaModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch_dtype, **local)
    text_encoder_2 = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder_2", dtype=torch_dtype, **local)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", **local)
    tokenizer_2 = AutoTokenizer.from_pretrained(folder / "tokenizer_2", **local)
    if (folder / "scheduler").exists():
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", **local)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)  # HunyuanVideo's published flow shift
    return HunyuanVideoComponents(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler)


class HunyuanVideoPolicy(DiffusersVideoPolicy):
    """A diffusers HunyuanVideo model behind the :class:`~sp_grpo.policies.VideoPolicy` protocol.

    Args:
        pretrained_path: Local diffusers folder (``model_index.json``, ``transformer/``, ``vae/``,
            ``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``, ``tokenizer_2/``, ``scheduler/``),
            e.g. a downloaded ``hunyuanvideo-community/HunyuanVideo``. Required unless ``components``.
        components: Already built parts (tests, notebooks); overrides ``pretrained_path``.
        torch_dtype: Dtype of the transformer and text encoders; the VAE stays fp32.
        lora_rank: LoRA rank through peft; ``None`` trains the whole transformer.
        lora_alpha: LoRA scaling numerator; defaults to the rank.
        lora_target_modules: Linear layers of the transformer that get adapters.
        lora_seed: Seed of the adapters' initialisation.
        reference_copy: Under full fine-tuning, keep a frozen copy as the KL reference.
        gradient_checkpointing: Recompute transformer blocks in the backward pass.
        negative_prompt: Prompt of the unconditional branch of true classifier-free guidance.
        embedded_guidance_scale: The distilled guidance scale fed to the network (the pipeline's
            ``guidance_scale``, 6 by default).
        prompt_template: Llama prompt template with one ``{}`` for the prompt.
        template_crop_start: Tokens of the template before the prompt, dropped after encoding.
        max_sequence_length: Prompt tokens kept after the template (the pipeline uses 256).
        hidden_layers_to_skip: Which Llama layer gives the embeddings: the last minus this many.
        shift: Flow shift of the sigma schedule; ``None`` keeps the scheduler's (7 for HunyuanVideo).
        cfg_batched: Run both halves of classifier-free guidance as one batch, as two passes, or
            ``auto``: whichever measured faster on the device type.
        decode_chunk_size: Decode at most this many videos at once; ``None`` for all together.
        vae_tiling: Decode in overlapping spatial tiles (diffusers' ``enable_tiling``), needed for
            long high-resolution videos.

    Raises:
        ValueError: an argument is out of range, or neither a path nor components are given.
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        *,
        components: HunyuanVideoComponents | None = None,
        torch_dtype: DType = "bfloat16",
        lora_rank: int | None = 32,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
        lora_seed: int = 0,
        reference_copy: bool = False,
        gradient_checkpointing: bool = False,
        negative_prompt: str = "",
        embedded_guidance_scale: float = 6.0,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        template_crop_start: int = DEFAULT_CROP_START,
        max_sequence_length: int = 256,
        hidden_layers_to_skip: int = 2,
        shift: float | None = None,
        cfg_batched: bool | Literal["auto"] = "auto",
        decode_chunk_size: int | None = None,
        vae_tiling: bool = False,
    ) -> None:
        dtype = resolve_dtype(torch_dtype)
        if max_sequence_length < 1:
            raise ValueError(f"`max_sequence_length` ({max_sequence_length}) must be at least 1.")
        if template_crop_start < 0:
            raise ValueError(f"`template_crop_start` ({template_crop_start}) must be non-negative.")
        if prompt_template.count("{}") != 1:
            raise ValueError(f"`prompt_template` ({prompt_template[:40]!r}...) must contain exactly one `{{}}` where the prompt goes.")
        if components is None:
            if pretrained_path is None:
                raise ValueError(
                    "HunyuanVideoPolicy needs weights: set `pretrained_path` to a local diffusers HunyuanVideo folder,"
                    " or pass `components` (see sp_grpo.policies.hunyuan.tiny_hunyuan_components)."
                )
            components = load_hunyuan_components(pretrained_path, dtype)
        if shift is not None:
            components.scheduler = type(components.scheduler).from_config(components.scheduler.config, shift=shift)
        text_encoder = components.text_encoder if components.text_encoder.dtype == dtype else components.text_encoder.to(dtype)
        text_encoder_2 = components.text_encoder_2 if components.text_encoder_2.dtype == dtype else components.text_encoder_2.to(dtype)
        super().__init__(
            components.transformer,
            {"vae": components.vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2},
            torch_dtype=torch_dtype,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_target_modules=lora_target_modules,
            lora_seed=lora_seed,
            reference_copy=reference_copy,
            gradient_checkpointing=gradient_checkpointing,
            cfg_batched=cfg_batched,
            decode_chunk_size=decode_chunk_size,
        )
        self.tokenizer = components.tokenizer
        self.tokenizer_2 = components.tokenizer_2
        self.scheduler = components.scheduler
        self.negative_prompt = negative_prompt
        self.embedded_guidance_scale = embedded_guidance_scale
        self.prompt_template = prompt_template
        self.template_crop_start = template_crop_start
        self.max_sequence_length = max_sequence_length
        self.hidden_layers_to_skip = hidden_layers_to_skip
        if vae_tiling:
            self.vae.enable_tiling()
        self._vae_t = int(self.vae.config.temporal_compression_ratio)
        self._vae_s = int(self.vae.config.spatial_compression_ratio)
        self._pooled_dim = int(self.transformer.config.pooled_projection_dim)
        # A buffer only to know the device the policy was moved to.
        self.register_buffer("_device_marker", torch.zeros(()), persistent=False)

    # -- text -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], guidance: bool) -> PromptEmbeds:
        """Encode each prompt once (and the negative prompt once), as ``HunyuanVideoPipeline.encode_prompt``.

        Returns:
            :class:`PromptEmbeds` whose rows pack (see :func:`~sp_grpo.policies.common.pack_text`) the
            ``(max_sequence_length, D)`` Llama embeddings, their mask and the CLIP pooled embedding.
        """
        cond = self._encode(list(prompts))
        uncond = self._encode([self.negative_prompt]).expand_as(cond) if guidance else None
        return PromptEmbeds(cond, uncond)

    def _encode(self, prompts: list[str]) -> Tensor:
        device = self._device_marker.device
        crop = self.template_crop_start
        tokens = self.tokenizer(
            [self.prompt_template.format(p) for p in prompts],
            max_length=self.max_sequence_length + crop,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        hidden = hidden[-(self.hidden_layers_to_skip + 1)][:, crop:]
        clip_ids = self.tokenizer_2(prompts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder_2(clip_ids.to(device), output_hidden_states=False).pooler_output
        dtype = self._compute_dtype(self.transformer)
        return pack_text(hidden.to(dtype), mask[:, crop:], pooled.to(dtype))

    # -- latents and sigmas ---------------------------------------------------------------------
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """``(C, (F - 1) / 4 + 1, H / 8, W / 8)`` for a video of ``num_frames`` frames of ``height x width``.

        Raises:
            ValueError: the size does not fit the VAE's and the transformer's strides.
        """
        config = self.transformer.config
        t = self._vae_t
        if num_frames < 1 or (num_frames - 1) % (t * config.patch_size_t) != 0:
            step = t * config.patch_size_t
            raise ValueError(
                f"`num_frames` ({num_frames}) must be 1 more than a multiple of {step} (VAE temporal stride {t} x"
                f" patch {config.patch_size_t}): set `model.sampler.num_frames` to e.g. {step * max(1, num_frames // step) + 1}."
            )
        multiple = self._vae_s * config.patch_size
        for name, size in (("height", height), ("width", width)):
            if size < multiple or size % multiple != 0:
                raise ValueError(
                    f"`{name}` ({size}) must be a positive multiple of {multiple} (VAE stride {self._vae_s} x patch"
                    f" {config.patch_size}): set `model.sampler.{name}` to {max(multiple, size // multiple * multiple)}."
                )
        return (config.in_channels, (num_frames - 1) // t + 1, height // self._vae_s, width // self._vae_s)

    def sigmas(self, num_steps: int, latent_shape: Sequence[int] | None = None) -> Tensor:
        """``HunyuanVideoPipeline``'s schedule: ``linspace(1, 0, S + 1)[:-1]`` shifted, then 0; fp32 on CPU.

        .. math:: \\sigma_i = \\frac{s\\, u_i}{1 + (s - 1)\\, u_i}, \\quad u_i = 1 - i / S
        """
        return flow_sigmas(self.scheduler, np.linspace(1.0, 0.0, num_steps + 1)[:-1])

    # -- network --------------------------------------------------------------------------------
    def _forward(self, latents: Tensor, sigma: Tensor, text: Tensor) -> Tensor:
        network = self._network()
        dtype = self._compute_dtype(network)
        tokens, mask, pooled = unpack_text(text, self._pooled_dim)
        timestep = sigma.to(torch.float32) * self.scheduler.config.num_train_timesteps
        guidance = torch.full((latents.shape[0],), self.embedded_guidance_scale, device=latents.device, dtype=dtype) * 1000.0
        out = network(
            hidden_states=latents.to(dtype),
            timestep=timestep,
            encoder_hidden_states=tokens.to(dtype),
            encoder_attention_mask=mask.to(dtype),
            pooled_projections=pooled.to(dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return out.to(latents.dtype)

    # -- pixels ---------------------------------------------------------------------------------
    def _decode_chunk(self, latents: Tensor) -> Tensor:
        # Unscale in fp32: the scaling factor divides, and half precision would lose the small latents.
        z = latents.to(torch.float32) / self.vae.config.scaling_factor
        video = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return self._to_unit_video(video)


def tiny_hunyuan_components(
    seed: int = 0,
    *,
    vocabulary: Sequence[str] | None = None,
    latent_channels: int = 4,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 10,
    text_dim: int = 16,
    pooled_dim: int = 8,
    shift: float = 7.0,
) -> HunyuanVideoComponents:
    """A tiny HunyuanVideo (sizes of diffusers' own test dummies) with random weights, built offline.

    Both tokenizers are :func:`~sp_grpo.policies.tiny.build_tokenizer`'s word-level tokenizer; use
    it with ``prompt_template=TINY_PROMPT_TEMPLATE, template_crop_start=TINY_CROP_START``. The VAE
    has HunyuanVideo's strides (4 in time, 8 in space) and the transformer a patch of 1.
    """
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    from sp_grpo.policies.tiny import DEFAULT_VOCABULARY, build_tokenizer

    tokenizer = build_tokenizer(vocabulary or DEFAULT_VOCABULARY)
    tokenizer_2 = build_tokenizer(vocabulary or DEFAULT_VOCABULARY)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            num_refiner_layers=1,
            patch_size=1,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=text_dim,
            pooled_projection_dim=pooled_dim,
            rope_axes_dim=(2, 4, 4),
        )
        vae = AutoencoderKLHunyuanVideo(
            latent_channels=latent_channels,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
        )
        text_encoder = LlamaModel(
            LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=37, num_attention_heads=4,
                num_hidden_layers=3, pad_token_id=pad, bos_token_id=eos, eos_token_id=eos, hidden_act="gelu",
            )
        )
        text_encoder_2 = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer_2), hidden_size=pooled_dim, intermediate_size=37, num_attention_heads=4,
                num_hidden_layers=2, pad_token_id=pad, bos_token_id=eos, eos_token_id=eos, projection_dim=32,
                max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="gelu",
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    return HunyuanVideoComponents(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler)


# The tiny tokenizer knows none of the real template's words; this one has 3 tokens before the prompt.
TINY_PROMPT_TEMPLATE = "a video of {}"
TINY_CROP_START = 3


def save_hunyuan_folder(components: HunyuanVideoComponents, path: str | Path) -> Path:
    """Write components as a diffusers ``HunyuanVideoPipeline`` folder that :class:`HunyuanVideoPolicy` loads."""
    from diffusers import HunyuanVideoPipeline

    build_pipeline(HunyuanVideoPipeline, components).save_pretrained(str(path), safe_serialization=True)
    return Path(path)


__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "HunyuanVideoComponents",
    "HunyuanVideoPolicy",
    "TINY_CROP_START",
    "TINY_PROMPT_TEMPLATE",
    "load_hunyuan_components",
    "save_hunyuan_folder",
    "tiny_hunyuan_components",
]
