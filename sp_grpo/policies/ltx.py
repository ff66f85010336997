"""LTX-Video text-to-video generators from diffusers, as a :class:`~sp_grpo.policies.VideoPolicy`.

Built on diffusers' ``LTXVideoTransformer3DModel``, ``AutoencoderKLLTXVideo`` and
``FlowMatchEulerDiscreteScheduler`` with transformers' T5 encoder, following ``LTXPipeline``. The
transformer works on *packed* latents (a token sequence); this adapter keeps latents unpacked,
``(C, F, H, W)`` like the other backbones, and packs them around each network call. The schedule's
shift depends on the latent sequence length (``use_dynamic_shifting``), so :meth:`LTXVideoPolicy.sigmas`
needs the latent shape.
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

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class LTXVideoComponents:
    """The parts of an LTX-Video pipeline folder, already built or loaded."""

    transformer: nn.Module
    vae: nn.Module
    text_encoder: nn.Module  # T5 encoder
    tokenizer: Any
    scheduler: Any


def load_ltx_components(path: str, torch_dtype: torch.dtype = torch.float32) -> LTXVideoComponents:
    """Load a diffusers LTX-Video folder from a local path; nothing is downloaded.

    The transformer and the text encoder are loaded in ``torch_dtype``; the VAE stays fp32.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the path is not a diffusers LTX-Video folder.
    """
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel

    required = ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    folder = check_diffusers_folder(path, required, "LTX-Video", "Lightricks/LTX-Video")
    local = {"local_files_only": True}
    transformer = LTXVideoTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch_dtype, **local)
    vae = AutoencoderKLLTXVideo.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32, **local)
    text_encoder = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch_dtype, **local)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", **local)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", **local)
    return LTXVideoComponents(transformer, vae, text_encoder, tokenizer, scheduler)


def sequence_shift(sequence_length: int, base_length: int, max_length: int, base_shift: float, max_shift: float) -> float:
    """The dynamic shift ``mu`` of a latent sequence: linear in its length, as in ``LTXPipeline``.

    .. math:: \\mu = b + (m_{max} - b) \\frac{n - n_{base}}{n_{max} - n_{base}}
    """
    slope = (max_shift - base_shift) / (max_length - base_length)
    return base_shift + slope * (sequence_length - base_length)


class LTXVideoPolicy(DiffusersVideoPolicy):
    """A diffusers LTX-Video model behind the :class:`~sp_grpo.policies.VideoPolicy` protocol.

    Args:
        pretrained_path: Local diffusers folder (``model_index.json``, ``transformer/``, ``vae/``,
            ``text_encoder/``, ``tokenizer/``, ``scheduler/``), e.g. a downloaded
            ``Lightricks/LTX-Video``. Required unless ``components`` is given.
        components: Already built parts (tests, notebooks); overrides ``pretrained_path``.
        torch_dtype: Dtype of the transformer and the text encoder; the VAE stays fp32.
        lora_rank: LoRA rank through peft; ``None`` trains the whole transformer.
        lora_alpha: LoRA scaling numerator; defaults to the rank.
        lora_target_modules: Linear layers of the transformer that get adapters.
        lora_seed: Seed of the adapters' initialisation.
        reference_copy: Under full fine-tuning, keep a frozen copy as the KL reference.
        gradient_checkpointing: Recompute transformer blocks in the backward pass.
        negative_prompt: Prompt of the unconditional branch of classifier-free guidance.
        max_sequence_length: T5 tokens per prompt (the pipeline uses 128).
        frame_rate: Frames per second the video is generated for (scales the temporal RoPE).
        decode_timestep: Timestep of timestep-conditioned VAEs (LTX-Video 0.9.1+ suggest 0.05).
        decode_noise_scale: Noise mixed into the latents before a timestep-conditioned decode;
            ``None`` uses ``decode_timestep``, as the pipeline does. It is drawn from torch's global
            generator (seeded by ``seed_everything``).
        cfg_batched: Run both halves of classifier-free guidance as one batch, as two passes, or
            ``auto``: whichever measured faster on the device type.
        decode_chunk_size: Decode at most this many videos at once; ``None`` for all together.
        vae_tiling: Decode in overlapping tiles (diffusers' ``enable_tiling``).

    Raises:
        ValueError: an argument is out of range, or neither a path nor components are given.
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        *,
        components: LTXVideoComponents | None = None,
        torch_dtype: DType = "bfloat16",
        lora_rank: int | None = 32,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
        lora_seed: int = 0,
        reference_copy: bool = False,
        gradient_checkpointing: bool = False,
        negative_prompt: str = "",
        max_sequence_length: int = 128,
        frame_rate: float = 25.0,
        decode_timestep: float = 0.0,
        decode_noise_scale: float | None = None,
        cfg_batched: bool | Literal["auto"] = "auto",
        decode_chunk_size: int | None = None,
        vae_tiling: bool = False,
    ) -> None:
        dtype = resolve_dtype(torch_dtype)
        if max_sequence_length < 1:
            raise ValueError(f"`max_sequence_length` ({max_sequence_length}) must be at least 1.")
        if frame_rate <= 0:
            raise ValueError(f"`frame_rate` ({frame_rate}) must be positive, e.g. 25.")
        if decode_timestep < 0 or (decode_noise_scale is not None and not 0 <= decode_noise_scale <= 1):
            raise ValueError(
                f"`decode_timestep` ({decode_timestep}) must be non-negative and `decode_noise_scale` ({decode_noise_scale})"
                " in [0, 1] or null; LTX-Video 0.9.1+ suggests 0.05 and 0.025."
            )
        if components is None:
            if pretrained_path is None:
                raise ValueError(
                    "LTXVideoPolicy needs weights: set `pretrained_path` to a local diffusers LTX-Video folder, or pass"
                    " `components` (see sp_grpo.policies.ltx.tiny_ltx_components)."
                )
            components = load_ltx_components(pretrained_path, dtype)
        text_encoder = components.text_encoder if components.text_encoder.dtype == dtype else components.text_encoder.to(dtype)
        super().__init__(
            components.transformer,
            {"vae": components.vae, "text_encoder": text_encoder},
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
        self.scheduler = components.scheduler
        self.negative_prompt = negative_prompt
        self.max_sequence_length = max_sequence_length
        self.frame_rate = frame_rate
        self.decode_timestep = decode_timestep
        self.decode_noise_scale = decode_timestep if decode_noise_scale is None else decode_noise_scale
        if vae_tiling:
            self.vae.enable_tiling()
        self._vae_t = int(self.vae.temporal_compression_ratio)
        self._vae_s = int(self.vae.spatial_compression_ratio)
        self._last_latent_shape: tuple[int, ...] | None = None

    # -- text -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], guidance: bool) -> PromptEmbeds:
        """Encode each prompt once (and the negative prompt once), as ``LTXPipeline.encode_prompt``.

        Returns:
            :class:`PromptEmbeds` whose rows pack (see :func:`~sp_grpo.policies.common.pack_text`) the
            ``(max_sequence_length, D)`` T5 embeddings and their attention mask.
        """
        cond = self._encode(list(prompts))
        uncond = self._encode([self.negative_prompt]).expand_as(cond) if guidance else None
        return PromptEmbeds(cond, uncond)

    def _encode(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        device = self.vae.latents_mean.device
        # LTXPipeline runs T5 without the mask and hands the mask to the transformer instead.
        hidden = self.text_encoder(tokens.input_ids.to(device))[0]
        return pack_text(hidden.to(self._compute_dtype(self.transformer)), tokens.attention_mask.to(device))

    # -- latents and sigmas ---------------------------------------------------------------------
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """``(C, (F - 1) / 8 + 1, H / 32, W / 32)`` (for LTX-Video's VAE) for a video of that size.

        Raises:
            ValueError: the size does not fit the VAE's and the transformer's strides.
        """
        config = self.transformer.config
        step = self._vae_t * config.patch_size_t
        if num_frames < 1 or (num_frames - 1) % step != 0:
            raise ValueError(
                f"`num_frames` ({num_frames}) must be 1 more than a multiple of {step} (VAE temporal stride"
                f" {self._vae_t} x patch {config.patch_size_t}): set `model.sampler.num_frames` to e.g."
                f" {step * max(1, num_frames // step) + 1}."
            )
        multiple = self._vae_s * config.patch_size
        for name, size in (("height", height), ("width", width)):
            if size < multiple or size % multiple != 0:
                raise ValueError(
                    f"`{name}` ({size}) must be a positive multiple of {multiple} (VAE stride {self._vae_s} x patch"
                    f" {config.patch_size}): set `model.sampler.{name}` to {max(multiple, size // multiple * multiple)}."
                )
        shape = (config.in_channels, (num_frames - 1) // self._vae_t + 1, height // self._vae_s, width // self._vae_s)
        self._last_latent_shape = shape
        return shape

    def sigmas(self, num_steps: int, latent_shape: Sequence[int] | None = None) -> Tensor:
        """``LTXPipeline``'s schedule: ``linspace(1, 1/S, S)`` shifted by the sequence-length shift, then 0.

        Args:
            num_steps: ``S``.
            latent_shape: ``(C, F, H, W)``; ``None`` uses the last shape :meth:`latent_shape` returned
                (the rollout asks for the shape first).

        Returns:
            ``(S + 1,)`` fp32 sigmas on the CPU.

        Raises:
            RuntimeError: no latent shape is known and the scheduler shifts by sequence length.
        """
        config = self.scheduler.config
        mu = None
        if config.get("use_dynamic_shifting", False):
            shape = latent_shape if latent_shape is not None else self._last_latent_shape
            if shape is None:
                raise RuntimeError(
                    "LTXVideoPolicy.sigmas needs the latent shape: its scheduler shifts the schedule by the video's"
                    " token count. Call `latent_shape(num_frames, height, width)` first or pass `latent_shape`."
                )
            mu = sequence_shift(
                int(np.prod(shape[1:])),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
        return flow_sigmas(self.scheduler, np.linspace(1.0, 1.0 / num_steps, num_steps), mu)

    # -- network --------------------------------------------------------------------------------
    def _forward(self, latents: Tensor, sigma: Tensor, text: Tensor) -> Tensor:
        network = self._network()
        dtype = self._compute_dtype(network)
        tokens, mask, _ = unpack_text(text)
        p, p_t = network.config.patch_size, network.config.patch_size_t
        _, _, frames, height, width = latents.shape
        out = network(
            hidden_states=pack_latents(latents.to(dtype), p, p_t),
            encoder_hidden_states=tokens.to(dtype),
            timestep=sigma.to(torch.float32) * self.scheduler.config.num_train_timesteps,
            encoder_attention_mask=mask,
            num_frames=frames // p_t,
            height=height // p,
            width=width // p,
            rope_interpolation_scale=(self._vae_t / self.frame_rate, self._vae_s, self._vae_s),
            return_dict=False,
        )[0]
        return unpack_latents(out, frames, height, width, p, p_t).to(latents.dtype)

    # -- pixels ---------------------------------------------------------------------------------
    def _decode_chunk(self, latents: Tensor) -> Tensor:
        vae = self.vae
        # Denormalise in fp32: the per-channel statistics are fp32 and half precision would round them.
        mean = vae.latents_mean.view(1, -1, 1, 1, 1).float()
        std = vae.latents_std.view(1, -1, 1, 1, 1).float()
        z = latents.to(torch.float32) * std / vae.config.scaling_factor + mean
        timestep = None
        if vae.config.timestep_conditioning:
            timestep = torch.full((z.shape[0],), self.decode_timestep, device=z.device)
            if self.decode_noise_scale > 0:
                z = (1 - self.decode_noise_scale) * z + self.decode_noise_scale * torch.randn_like(z)
        video = vae.decode(z.to(vae.dtype), timestep, return_dict=False)[0]
        return self._to_unit_video(video)


def pack_latents(latents: Tensor, patch_size: int = 1, patch_size_t: int = 1) -> Tensor:
    """``(B, C, F, H, W)`` latents to ``(B, F/p_t * H/p * W/p, C * p_t * p * p)`` tokens, frame-major."""
    b, c, f, h, w = latents.shape
    x = latents.reshape(b, c, f // patch_size_t, patch_size_t, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (f // patch_size_t) * (h // patch_size) * (w // patch_size), -1)


def unpack_latents(tokens: Tensor, frames: int, height: int, width: int, patch_size: int = 1, patch_size_t: int = 1) -> Tensor:
    """Inverse of :func:`pack_latents`: tokens back to ``(B, C, frames, height, width)``."""
    b = tokens.shape[0]
    f, h, w = frames // patch_size_t, height // patch_size, width // patch_size
    x = tokens.reshape(b, f, h, w, -1, patch_size_t, patch_size, patch_size)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, -1, frames, height, width)


def tiny_ltx_components(
    seed: int = 0,
    *,
    vocabulary: Sequence[str] | None = None,
    latent_channels: int = 8,
    num_layers: int = 1,
    num_attention_heads: int = 4,
    attention_head_dim: int = 8,
    text_dim: int = 32,
) -> LTXVideoComponents:
    """A tiny LTX-Video (sizes of diffusers' own test dummies) with random weights, built offline.

    The VAE has strides 4 in time and space (so a ``9 x 32 x 32`` video has ``(8, 3, 8, 8)``
    latents) and the scheduler LTX-Video's sequence-length shift.
    """
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from sp_grpo.policies.tiny import DEFAULT_VOCABULARY, build_tokenizer

    tokenizer = build_tokenizer(vocabulary or DEFAULT_VOCABULARY)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = LTXVideoTransformer3DModel(
            in_channels=latent_channels,
            out_channels=latent_channels,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            cross_attention_dim=num_attention_heads * attention_head_dim,
            num_layers=num_layers,
            caption_channels=text_dim,
        )
        vae = AutoencoderKLLTXVideo(
            latent_channels=latent_channels,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False, False, False, False, False),
            upsample_residual=(False, False, False, False),
            upsample_factor=(1, 1, 1, 1),
            timestep_conditioning=False,
            patch_size=1,
            patch_size_t=1,
        )
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=2 * text_dim, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, dropout_rate=0.0,
            )
        )
    # LTX-Video's published scheduler settings: the shift grows with the latent token count.
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096,
        shift_terminal=0.1, time_shift_type="exponential",
    )
    return LTXVideoComponents(transformer, vae, text_encoder, tokenizer, scheduler)


def save_ltx_folder(components: LTXVideoComponents, path: str | Path) -> Path:
    """Write components as a diffusers ``LTXPipeline`` folder that :class:`LTXVideoPolicy` loads."""
    from diffusers import LTXPipeline

    build_pipeline(LTXPipeline, components).save_pretrained(str(path), safe_serialization=True)
    return Path(path)


__all__ = [
    "LTXVideoComponents",
    "LTXVideoPolicy",
    "load_ltx_components",
    "pack_latents",
    "save_ltx_folder",
    "sequence_shift",
    "tiny_ltx_components",
    "unpack_latents",
]
