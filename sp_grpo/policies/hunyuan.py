"""HunyuanVideo text-to-video generators from diffusers, as a :class:`~sp_grpo.policies.VideoPolicy`.

Built on diffusers' ``HunyuanVideoTransformer3DModel``, ``AutoencoderKLHunyuanVideo`` and
``FlowMatchEulerDiscreteScheduler``, with transformers' Llama (token embeddings, from the third-last
layer, of a templated prompt) and CLIP (pooled embedding) text encoders, following
``HunyuanVideoPipeline``. HunyuanVideo is guidance-distilled: the guidance scale is an input of the
network (``embedded_guidance_scale``); the sampler's ``guidance_scale`` is true classifier-free
guidance with a negative prompt, usually 1 (off).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from sp_grpo.policies.diffusers_base import DiffusersVideoPolicy, LatentLayout
from sp_grpo.policies.diffusers_helpers import build_pipeline, check_diffusers_folder, components_or_load, flow_sigmas
from sp_grpo.policies.diffusers_helpers import pack_text, save_folder, seeded, unpack_text
from sp_grpo.policies.settings import DType, PolicySettings

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

    def pipeline(self):
        """diffusers' ``HunyuanVideoPipeline`` over these same modules (shared, not copied)."""
        from diffusers import HunyuanVideoPipeline

        return build_pipeline(HunyuanVideoPipeline, self)


def load_hunyuan_components(path: str, torch_dtype: torch.dtype = torch.float32, shift: float | None = None) -> HunyuanVideoComponents:
    """Load a diffusers HunyuanVideo folder from a local path; nothing is downloaded.

    The transformer and both text encoders are loaded in ``torch_dtype``; the VAE stays fp32. The
    flow shift is the folder's scheduler config's unless ``shift`` is given; a folder without
    ``scheduler/`` needs ``shift``.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the path is not a diffusers HunyuanVideo folder, or it has no ``scheduler/`` and
            ``shift`` is not given.
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
        if shift is not None:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift=shift)
    elif shift is None:
        raise ValueError(
            f"`pretrained_path` ({path!r}) has no scheduler/ folder, so the flow shift is unknown: set"
            " `model.policy.init_args.shift` (7.0 is HunyuanVideo's published shift), or add the scheduler/ folder."
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    return HunyuanVideoComponents(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler)


class HunyuanVideoPolicy(DiffusersVideoPolicy):
    """A diffusers HunyuanVideo model behind the :class:`~sp_grpo.policies.VideoPolicy` protocol.

    Args:
        pretrained_path: Local diffusers folder (``model_index.json``, ``transformer/``, ``vae/``,
            ``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``, ``tokenizer_2/``, ``scheduler/``),
            e.g. a downloaded ``hunyuanvideo-community/HunyuanVideo``. Required unless ``components``.
        components: Already built parts (tests, notebooks); overrides ``pretrained_path``.
        embedded_guidance_scale: The distilled guidance scale fed to the network (the pipeline's
            ``guidance_scale``, 6 by default). The sampler's ``guidance_scale`` is true
            classifier-free guidance with ``negative_prompt``, usually 1 (off).
        prompt_template: Llama prompt template with one ``{}`` for the prompt.
        template_crop_start: Tokens of the template before the prompt, dropped after encoding.
        max_sequence_length: Prompt tokens kept after the template (the pipeline uses 256).
        hidden_layers_to_skip: Which Llama layer gives the embeddings: the last minus this many.
        shift: Flow shift of the sigma schedule; ``None`` keeps the scheduler's (the folder's
            ``scheduler/``; a folder without one needs ``shift``, 7 for HunyuanVideo).
        torch_dtype: Dtype of the transformer and text encoders; the VAE stays fp32.
        **settings: The settings every backbone shares, fields of
            :class:`~sp_grpo.policies.settings.PolicySettings`; long high-resolution videos need
            ``vae_tiling``.

    Raises:
        ValueError: ``template_crop_start`` or ``prompt_template`` is malformed, a shared setting is
            out of range, a folder without ``scheduler/`` comes without ``shift``, or neither a path
            nor components are given.
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        *,
        components: HunyuanVideoComponents | None = None,
        embedded_guidance_scale: float = 6.0,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        template_crop_start: int = DEFAULT_CROP_START,
        max_sequence_length: int = 256,
        hidden_layers_to_skip: int = 2,
        shift: float | None = None,
        torch_dtype: DType = "bfloat16",
        **settings: Any,
    ) -> None:
        shared = PolicySettings(torch_dtype=torch_dtype, **settings)
        if template_crop_start < 0:
            raise ValueError(f"`model.policy.init_args.template_crop_start` ({template_crop_start}) must be non-negative.")
        if prompt_template.count("{}") != 1:
            raise ValueError(
                f"`model.policy.init_args.prompt_template` ({prompt_template[:40]!r}...) must contain exactly one `{{}}`"
                " where the prompt goes."
            )
        if components is not None and shift is not None:
            components.scheduler = type(components.scheduler).from_config(components.scheduler.config, shift=shift)
        load = functools.partial(load_hunyuan_components, torch_dtype=shared.dtype, shift=shift)
        components = components_or_load(components, pretrained_path, load, "HunyuanVideoPolicy", "sp_grpo.policies.hunyuan.tiny_hunyuan_components")
        super().__init__(components, shared, max_sequence_length=max_sequence_length)
        self.embedded_guidance_scale = embedded_guidance_scale
        self.prompt_template = prompt_template
        self.template_crop_start = template_crop_start
        self.hidden_layers_to_skip = hidden_layers_to_skip
        vae = self.vae.config
        self.layout = LatentLayout.of(self.transformer.config, vae.temporal_compression_ratio, vae.spatial_compression_ratio)
        self._pooled_dim = int(self.transformer.config.pooled_projection_dim)

    # -- text -----------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> Tensor:
        """``HunyuanVideoPipeline.encode_prompt``'s embeddings, packed (:func:`~sp_grpo.policies.diffusers_helpers.pack_text`):
        the ``(max_sequence_length, D)`` Llama tokens of the templated prompt, their mask and the CLIP pooled embedding."""
        device = self._device
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

    # -- sigmas ---------------------------------------------------------------------------------
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
    def _decode_chunk(self, latents: Tensor, generator: torch.Generator | None) -> Tensor:
        # Unscale in fp32: the scaling factor divides, and half precision would lose the small latents.
        z = latents.to(torch.float32) / self.vae.config.scaling_factor
        video = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return self._to_unit_video(video)


def tiny_hunyuan_components(seed: int = 0, *, vocabulary: Sequence[str] | None = None, shift: float = 7.0) -> HunyuanVideoComponents:
    """A tiny HunyuanVideo (sizes of diffusers' own test dummies) with random weights, built offline.

    Both tokenizers are :func:`~sp_grpo.policies.tiny.build_tokenizer`'s word-level tokenizer; use
    it with ``prompt_template=TINY_PROMPT_TEMPLATE, template_crop_start=TINY_CROP_START``. The VAE
    has HunyuanVideo's strides (4 in time, 8 in space) and 4 latent channels, the transformer a
    patch of 1, text width 16 and pooled width 8.
    """
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    from sp_grpo.policies.tiny import DEFAULT_VOCABULARY, build_tokenizer

    tokenizer = build_tokenizer(vocabulary or DEFAULT_VOCABULARY)
    tokenizer_2 = build_tokenizer(vocabulary or DEFAULT_VOCABULARY)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    with seeded(seed):
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
        )
        vae = AutoencoderKLHunyuanVideo(
            latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
            spatial_compression_ratio=8, temporal_compression_ratio=4,
        )
        text_encoder = LlamaModel(
            LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37, num_attention_heads=4,
                num_hidden_layers=3, pad_token_id=pad, bos_token_id=eos, eos_token_id=eos, hidden_act="gelu",
            )
        )
        text_encoder_2 = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer_2), hidden_size=8, intermediate_size=37, num_attention_heads=4,
                num_hidden_layers=2, pad_token_id=pad, bos_token_id=eos, eos_token_id=eos, projection_dim=32,
                max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="gelu",
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    return HunyuanVideoComponents(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler)


# The tiny tokenizer knows none of the real template's words; this one has 3 tokens before the prompt.
TINY_PROMPT_TEMPLATE = "a video of {}"
TINY_CROP_START = 3


#: Write components as the diffusers ``HunyuanVideoPipeline`` folder that the policy loads.
save_hunyuan_folder = save_folder


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
