"""LTX-Video text-to-video generators from diffusers, as a :class:`~sp_grpo.policies.VideoPolicy`.

Built on diffusers' ``LTXVideoTransformer3DModel``, ``AutoencoderKLLTXVideo`` and
``FlowMatchEulerDiscreteScheduler`` with transformers' T5 encoder, following ``LTXPipeline``. The
transformer works on *packed* latents (a token sequence); this adapter keeps latents unpacked,
``(C, F, H, W)`` like the other backbones, and packs them around each network call. The schedule's
shift depends on the latent sequence length (``use_dynamic_shifting``), so :meth:`LTXVideoPolicy.sigmas`
needs the latent shape.
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


@dataclass
class LTXVideoComponents:
    """The parts of an LTX-Video pipeline folder, already built or loaded."""

    transformer: nn.Module
    vae: nn.Module
    text_encoder: nn.Module  # T5 encoder
    tokenizer: Any
    scheduler: Any

    def pipeline(self):
        """diffusers' ``LTXPipeline`` over these same modules (shared, not copied)."""
        from diffusers import LTXPipeline

        return build_pipeline(LTXPipeline, self)


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
        max_sequence_length: T5 tokens per prompt (the pipeline uses 128).
        frame_rate: Frames per second the video is generated for (scales the temporal RoPE).
        decode_timestep: Timestep of timestep-conditioned VAEs (LTX-Video 0.9.1+ suggest 0.05).
        decode_noise_scale: Noise mixed into the latents before a timestep-conditioned decode;
            ``None`` uses ``decode_timestep``, as the pipeline does. It is drawn from the generator
            given to :meth:`decode` (the rollout's), so a seed gives the same videos.
        **settings: The settings every backbone shares, fields of
            :class:`~sp_grpo.policies.settings.PolicySettings` (``lora_rank``, ``negative_prompt``, ...).

    Raises:
        ValueError: ``frame_rate``, ``decode_timestep`` or ``decode_noise_scale`` is out of range, a
            shared setting is, or neither a path nor components are given.
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        *,
        components: LTXVideoComponents | None = None,
        torch_dtype: DType = "bfloat16",
        max_sequence_length: int = 128,
        frame_rate: float = 25.0,
        decode_timestep: float = 0.0,
        decode_noise_scale: float | None = None,
        **settings: Any,
    ) -> None:
        shared = PolicySettings(torch_dtype=torch_dtype, **settings)
        if frame_rate <= 0:
            raise ValueError(f"`model.policy.init_args.frame_rate` ({frame_rate}) must be positive, e.g. 25.")
        if decode_timestep < 0 or (decode_noise_scale is not None and not 0 <= decode_noise_scale <= 1):
            raise ValueError(
                f"`decode_timestep` ({decode_timestep}) must be non-negative and `decode_noise_scale` ({decode_noise_scale})"
                " in [0, 1] or null; LTX-Video 0.9.1+ suggests 0.05 and 0.025."
            )
        load = functools.partial(load_ltx_components, torch_dtype=shared.dtype)
        components = components_or_load(components, pretrained_path, load, "LTXVideoPolicy", "sp_grpo.policies.ltx.tiny_ltx_components")
        super().__init__(components, shared, max_sequence_length=max_sequence_length)
        self.frame_rate = frame_rate
        self.decode_timestep = decode_timestep
        self.decode_noise_scale = decode_timestep if decode_noise_scale is None else decode_noise_scale
        self.layout = LatentLayout.of(self.transformer.config, self.vae.temporal_compression_ratio, self.vae.spatial_compression_ratio)

    # -- text -----------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> Tensor:
        """``LTXPipeline.encode_prompt``'s embeddings, packed (:func:`~sp_grpo.policies.diffusers_helpers.pack_text`):
        the ``(max_sequence_length, D)`` T5 tokens and their attention mask."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        device = self._device
        # LTXPipeline runs T5 without the mask and hands the mask to the transformer instead.
        hidden = self.text_encoder(tokens.input_ids.to(device))[0]
        return pack_text(hidden.to(self._compute_dtype(self.transformer)), tokens.attention_mask.to(device))

    # -- latents and sigmas ---------------------------------------------------------------------
    def sigmas(self, num_steps: int, latent_shape: Sequence[int] | None = None) -> Tensor:
        """``LTXPipeline``'s schedule: ``linspace(1, 1/S, S)`` shifted by the sequence-length shift, then 0.

        A function of its arguments alone: the same ``num_steps`` and ``latent_shape`` give the same
        schedule whatever was asked before.

        Args:
            num_steps: ``S``.
            latent_shape: ``(C, F, H, W)`` of one sample, as :meth:`latent_shape` returns it.

        Returns:
            ``(S + 1,)`` fp32 sigmas on the CPU.

        Raises:
            RuntimeError: ``latent_shape`` is not given and the scheduler shifts by sequence length.
        """
        config = self.scheduler.config
        mu = None
        if config.get("use_dynamic_shifting", False):
            if latent_shape is None:
                raise RuntimeError(
                    "LTXVideoPolicy.sigmas needs the latent shape: its scheduler shifts the schedule by the video's"
                    " token count. Pass `latent_shape=policy.latent_shape(num_frames, height, width)`."
                )
            mu = sequence_shift(
                int(np.prod(latent_shape[1:])),
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
            rope_interpolation_scale=(self.layout.vae_t / self.frame_rate, self.layout.vae_s, self.layout.vae_s),
            return_dict=False,
        )[0]
        return unpack_latents(out, frames, height, width, p, p_t).to(latents.dtype)

    # -- pixels ---------------------------------------------------------------------------------
    def _decode_chunk(self, latents: Tensor, generator: torch.Generator | None) -> Tensor:
        vae = self.vae
        # Denormalise in fp32: the per-channel statistics are fp32 and half precision would round them.
        mean = vae.latents_mean.view(1, -1, 1, 1, 1).float()
        std = vae.latents_std.view(1, -1, 1, 1, 1).float()
        z = latents.to(torch.float32) * std / vae.config.scaling_factor + mean
        timestep = None
        if vae.config.timestep_conditioning:
            timestep = torch.full((z.shape[0],), self.decode_timestep, device=z.device)
            if self.decode_noise_scale > 0:
                if generator is None:
                    raise ValueError(
                        f"LTXVideoPolicy.decode mixes noise into the latents (`decode_noise_scale` {self.decode_noise_scale}):"
                        " pass `generator` (a torch.Generator on the latents' device) so that the videos are reproducible."
                    )
                noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                z = (1 - self.decode_noise_scale) * z + self.decode_noise_scale * noise
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


def tiny_ltx_components(seed: int = 0, *, vocabulary: Sequence[str] | None = None) -> LTXVideoComponents:
    """A tiny LTX-Video (sizes of diffusers' own test dummies) with random weights, built offline.

    The VAE has strides 4 in time and space (so a ``9 x 32 x 32`` video has ``(8, 3, 8, 8)``
    latents) and the scheduler LTX-Video's sequence-length shift.
    """
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from sp_grpo.policies.tiny import DEFAULT_VOCABULARY, build_tokenizer

    tokenizer = build_tokenizer(vocabulary or DEFAULT_VOCABULARY)
    with seeded(seed):
        transformer = LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
            cross_attention_dim=32, num_layers=1, caption_channels=32,
        )
        vae = AutoencoderKLLTXVideo(
            latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
            upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        )
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, dropout_rate=0.0,
            )
        )
    # LTX-Video's published scheduler settings: the shift grows with the latent token count.
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096,
        shift_terminal=0.1, time_shift_type="exponential",
    )
    return LTXVideoComponents(transformer, vae, text_encoder, tokenizer, scheduler)


#: Write components as the diffusers ``LTXPipeline`` folder that the policy loads.
save_ltx_folder = save_folder


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
