"""Wan 2.1 / 2.2-style text-to-video generators from diffusers, as a :class:`VideoPolicy`.

Built on diffusers' ``WanTransformer3DModel``, ``AutoencoderKLWan`` and
``FlowMatchEulerDiscreteScheduler`` and transformers' UMT5 encoder. diffusers' ``WanPipeline``
gives no per-step log-probabilities, so the sampling loop lives in :mod:`sp_grpo.rollout`; this
adapter only encodes prompts (the pipeline's recipe: pad to ``max_sequence_length``, zero the
padding), predicts velocities and decodes latents.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from sp_grpo.policies.diffusers_base import DiffusersVideoPolicy, LatentLayout
from sp_grpo.policies.diffusers_helpers import build_pipeline, check_diffusers_folder, components_or_load
from sp_grpo.policies.settings import DEFAULT_LORA_TARGETS, PolicySettings


@dataclass
class WanComponents:
    """The five parts of a Wan pipeline folder, already built or loaded.

    ``vae`` is :class:`~sp_grpo.toy.pixel_vae.PixelSpaceVAE` for a transformer that works on pixels
    (the shapes world's), whose folder has no ``vae/``.
    """

    transformer: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any

    def pipeline(self):
        """diffusers' ``WanPipeline`` over these same modules (shared, not copied); a pixel-space one has ``vae=None``."""
        from diffusers import WanPipeline

        from sp_grpo.toy.pixel_vae import pipeline_vae

        return build_pipeline(WanPipeline, dataclasses.replace(self, vae=pipeline_vae(self.vae)))


def load_wan_components(path: str, torch_dtype: torch.dtype = torch.float32, shift: float | None = None) -> WanComponents:
    """Load a diffusers Wan folder from a local path; nothing is downloaded.

    The VAE stays in fp32 (Wan's VAE is unstable in half precision); the transformer and text
    encoder are loaded in ``torch_dtype``. A folder without ``vae/`` holds a pixel-space model (the
    shapes world's): its VAE is the identity, :class:`~sp_grpo.toy.pixel_vae.PixelSpaceVAE`. Wan
    folders ship a UniPC scheduler config; the flow shift is read from it (``flow_shift``) unless
    ``shift`` is given.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the path is not a diffusers Wan folder.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    folder = check_diffusers_folder(
        path, ("model_index.json", "transformer", "text_encoder", "tokenizer"), "Wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    )
    kwargs = {"local_files_only": True}
    transformer = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch_dtype, **kwargs)
    if (folder / "vae").exists():
        vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32, **kwargs)
    else:
        from sp_grpo.toy.pixel_vae import PixelSpaceVAE

        vae = PixelSpaceVAE()
    text_encoder = UMT5EncoderModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch_dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", **kwargs)
    scheduler_cfg: dict[str, Any] = {}
    if (folder / "scheduler" / "scheduler_config.json").exists():
        scheduler_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if shift is None:
        shift = float(scheduler_cfg.get("shift", scheduler_cfg.get("flow_shift", 1.0)))
    num_train = int(scheduler_cfg.get("num_train_timesteps", 1000))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train, shift=shift)
    return WanComponents(transformer, vae, text_encoder, tokenizer, scheduler)


class WanPolicy(DiffusersVideoPolicy):
    """A diffusers Wan text-to-video model behind the :class:`~sp_grpo.policies.VideoPolicy` protocol.

    ``state_dict()`` holds only the trainable weights (LoRA, or the transformer under full
    fine-tuning): the frozen ones are the pretrained folder's, so checkpoints stay small.

    Args:
        pretrained_path: Local diffusers folder (``model_index.json``, ``transformer/``, ``vae/``,
            ``text_encoder/``, ``tokenizer/``, ``scheduler/``). Required unless ``components`` is given.
        components: Already built parts (for notebooks and tests); overrides ``pretrained_path``.
        max_sequence_length: Text tokens per prompt (Wan uses 512; shorter is faster and fine for
            short prompts).
        shift: Flow shift of the sigma schedule; ``None`` reads it from the folder's scheduler config.
        **settings: The settings every backbone shares, fields of
            :class:`~sp_grpo.policies.settings.PolicySettings` (``torch_dtype``, ``lora_rank``, ...).
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        *,
        components: WanComponents | None = None,
        max_sequence_length: int = 226,
        shift: float | None = None,
        **settings: Any,
    ) -> None:
        shared = PolicySettings(**settings)
        if components is not None and shift is not None:
            components.scheduler = type(components.scheduler).from_config(components.scheduler.config, shift=shift)
        load = functools.partial(load_wan_components, torch_dtype=shared.dtype, shift=shift)
        components = components_or_load(components, pretrained_path, load, "WanPolicy", "sp_grpo.policies.tiny")
        super().__init__(components, shared, max_sequence_length=max_sequence_length)
        vae_config = self.vae.config
        self.layout = LatentLayout(
            channels=int(vae_config.z_dim),
            vae_t=int(getattr(vae_config, "scale_factor_temporal", 4)),
            vae_s=int(getattr(vae_config, "scale_factor_spatial", 8)),
            patch=tuple(self.transformer.config.patch_size),
        )
        shape = (1, self.layout.channels, 1, 1, 1)
        self.register_buffer("latents_mean", torch.tensor(vae_config.latents_mean, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("latents_std", torch.tensor(vae_config.latents_std, dtype=torch.float32).view(shape), persistent=False)

    # -- text -----------------------------------------------------------------------------------
    def _encode(self, texts: list[str]) -> Tensor:
        """UMT5 embeddings as ``WanPipeline`` makes them: whitespace collapsed, padded to
        ``max_sequence_length``, the padding zeroed; ``(N, max_sequence_length, D)``."""
        tokens = self.tokenizer(
            [" ".join(text.split()) for text in texts],
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self._device), tokens.attention_mask.to(self._device)
        hidden = self.text_encoder(ids, mask).last_hidden_state
        # WanPipeline trims each prompt to its length and zero-pads; multiplying by the mask is the same.
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return hidden.to(self._compute_dtype(self.transformer))

    # -- sigmas ---------------------------------------------------------------------------------
    def sigmas(self, num_steps: int, latent_shape: Sequence[int] | None = None) -> Tensor:
        """The scheduler's ``(num_steps + 1,)`` shifted sigma schedule, ending at 0, in fp32 on CPU.

        Wan's shift does not depend on the video size, so ``latent_shape`` is ignored.
        """
        self.scheduler.set_timesteps(num_steps, device="cpu")
        return self.scheduler.sigmas.to(torch.float32).clone()

    # -- network --------------------------------------------------------------------------------
    def _forward(self, latents: Tensor, sigma: Tensor, text: Tensor) -> Tensor:
        network = self._network()
        dtype = self._compute_dtype(network)
        timestep = sigma.to(torch.float32) * self.scheduler.config.num_train_timesteps
        out = network(
            hidden_states=latents.to(dtype),
            timestep=timestep,
            encoder_hidden_states=text.to(dtype),
            return_dict=False,
        )[0]
        return out.to(latents.dtype)

    # -- pixels ---------------------------------------------------------------------------------
    def _decode_chunk(self, latents: Tensor, generator: torch.Generator | None) -> Tensor:
        # The VAE runs in fp32: its normalisation statistics and decoder are unstable in half precision.
        z = latents.to(torch.float32) * self.latents_std + self.latents_mean
        video = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return self._to_unit_video(video)


__all__ = ["DEFAULT_LORA_TARGETS", "WanComponents", "WanPolicy", "load_wan_components"]
