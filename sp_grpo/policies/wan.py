"""Wan 2.1 / 2.2-style text-to-video generators from diffusers, as a :class:`VideoPolicy`.

Built on diffusers' ``WanTransformer3DModel``, ``AutoencoderKLWan`` and
``FlowMatchEulerDiscreteScheduler`` and transformers' UMT5 encoder. diffusers' ``WanPipeline``
gives no per-step log-probabilities, so the sampling loop lives in :mod:`sp_grpo.rollout`; this
adapter only encodes prompts (the pipeline's recipe: pad to ``max_sequence_length``, zero the
padding), predicts velocities and decodes latents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn

from sp_grpo.policies.base import PromptEmbeds
from sp_grpo.policies.common import DiffusersVideoPolicy, DType, build_pipeline, check_diffusers_folder, resolve_dtype

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class WanComponents:
    """The five parts of a Wan pipeline folder, already built or loaded."""

    transformer: nn.Module
    vae: nn.Module | None  # None: the transformer works on pixels (scaled to [-1, 1]) directly
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any

    def pipeline(self):
        """diffusers' ``WanPipeline`` over these same modules (shared, not copied)."""
        from diffusers import WanPipeline

        return build_pipeline(WanPipeline, self)


def load_wan_components(path: str, torch_dtype: torch.dtype = torch.float32, shift: float | None = None) -> WanComponents:
    """Load a diffusers Wan folder from a local path; nothing is downloaded.

    The VAE stays in fp32 (Wan's VAE is unstable in half precision); the transformer and text
    encoder are loaded in ``torch_dtype``. Wan folders ship a UniPC scheduler config; the flow
    shift is read from it (``flow_shift``) unless ``shift`` is given.

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
    vae = None
    if (folder / "vae").exists():
        vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32, **kwargs)
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
        components: Already built parts (for notebooks and tests); overrides ``pretrained_path``. A
            ``vae`` of ``None`` (or a folder without ``vae/``) makes the transformer work on pixels:
            latents are RGB frames scaled to ``[-1, 1]`` (the shapes world does this).
        torch_dtype: Dtype of the transformer and text encoder weights; the VAE stays fp32.
        lora_rank: LoRA rank through peft; ``None`` trains the whole transformer.
        lora_alpha: LoRA scaling numerator (``alpha / rank`` scales the update); defaults to the rank.
        lora_target_modules: Names of the transformer's linear layers that get LoRA adapters.
        lora_seed: Seed of the LoRA weights' random initialisation (the run is reproducible).
        reference_copy: With full fine-tuning, keep a frozen copy of the initial transformer as the KL
            reference (doubles the transformer's memory). With LoRA the reference is the same network
            with the adapter disabled, at no memory cost.
        gradient_checkpointing: Recompute transformer blocks in the backward pass to save memory.
        negative_prompt: Prompt of the unconditional branch of classifier-free guidance.
        max_sequence_length: Text tokens per prompt (Wan uses 512; shorter is faster and fine for
            short prompts).
        shift: Flow shift of the sigma schedule; ``None`` reads it from the folder's scheduler config.
        cfg_batched: Run the conditional and unconditional passes of guidance as one batch
            (``true``), as two passes (``false``), or ``auto``: whichever measured faster on the
            device type (batched on CPUs and GPUs so far; README, "Performance").
        decode_chunk_size: Decode at most this many videos at once (bounds VAE memory); ``None``
            decodes the whole batch together.
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        *,
        components: WanComponents | None = None,
        torch_dtype: DType = "float32",
        lora_rank: int | None = 32,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
        lora_seed: int = 0,
        reference_copy: bool = False,
        gradient_checkpointing: bool = False,
        negative_prompt: str = "",
        max_sequence_length: int = 226,
        shift: float | None = None,
        cfg_batched: bool | Literal["auto"] = "auto",
        decode_chunk_size: int | None = None,
    ) -> None:
        if max_sequence_length < 1:
            raise ValueError(f"`max_sequence_length` ({max_sequence_length}) must be at least 1.")
        if components is None:
            if pretrained_path is None:
                raise ValueError(
                    "WanPolicy needs weights: set `pretrained_path` to a local diffusers Wan folder, or pass"
                    " `components` (see sp_grpo.policies.tiny for an offline tiny model)."
                )
            components = load_wan_components(pretrained_path, resolve_dtype(torch_dtype), shift)
        elif shift is not None:
            components.scheduler = type(components.scheduler).from_config(components.scheduler.config, shift=shift)
        dtype = resolve_dtype(torch_dtype)
        text_encoder = components.text_encoder
        super().__init__(
            components.transformer,
            {"vae": components.vae, "text_encoder": text_encoder if text_encoder.dtype == dtype else text_encoder.to(dtype)},
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
        if self.vae is None:  # pixel space: "latents" are RGB frames in [-1, 1]
            self._vae_t, self._vae_s, self._z_dim = 1, 1, 3
            mean, std = [0.0] * 3, [1.0] * 3
        else:
            self._vae_t = int(getattr(self.vae.config, "scale_factor_temporal", 4))
            self._vae_s = int(getattr(self.vae.config, "scale_factor_spatial", 8))
            self._z_dim = int(self.vae.config.z_dim)
            mean, std = self.vae.config.latents_mean, self.vae.config.latents_std
        shape = (1, self._z_dim, 1, 1, 1)
        self.register_buffer("latents_mean", torch.tensor(mean, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("latents_std", torch.tensor(std, dtype=torch.float32).view(shape), persistent=False)

    # -- text -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], guidance: bool) -> PromptEmbeds:
        """Encode each prompt once (and the negative prompt once, repeated), as ``WanPipeline`` does.

        Returns:
            :class:`PromptEmbeds` with ``(len(prompts), max_sequence_length, D)`` tensors in the
            transformer's dtype; padding positions are zero.
        """
        texts = [" ".join(p.split()) for p in prompts]
        cond = self._encode(texts)
        uncond = self._encode([" ".join(self.negative_prompt.split())]).expand_as(cond) if guidance else None
        return PromptEmbeds(cond, uncond)

    def _encode(self, texts: list[str]) -> Tensor:
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = self.latents_mean.device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        hidden = self.text_encoder(ids, mask).last_hidden_state
        # WanPipeline trims each prompt to its length and zero-pads; multiplying by the mask is the same.
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return hidden.to(self._compute_dtype(self.transformer))

    # -- latents and sigmas ---------------------------------------------------------------------
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """``(C, F, H / s, W / s)`` for a video of ``num_frames`` frames of ``height x width``.

        Raises:
            ValueError: the size does not fit the VAE's and the transformer's strides.
        """
        patch = self.transformer.config.patch_size
        if num_frames < 1 or (num_frames - 1) % self._vae_t != 0:
            raise ValueError(
                f"`num_frames` ({num_frames}) must be 1 more than a multiple of the VAE's temporal stride"
                f" ({self._vae_t}): set `model.sampler.num_frames` to e.g. {self._vae_t * max(1, num_frames // self._vae_t) + 1}."
            )
        for name, size, p in (("height", height, patch[1]), ("width", width, patch[2])):
            multiple = self._vae_s * p
            if size < multiple or size % multiple != 0:
                raise ValueError(
                    f"`{name}` ({size}) must be a positive multiple of {multiple} (VAE stride {self._vae_s} x patch"
                    f" {p}): set `model.sampler.{name}` to {max(multiple, size // multiple * multiple)}."
                )
        frames = (num_frames - 1) // self._vae_t + 1
        return (self._z_dim, frames, height // self._vae_s, width // self._vae_s)

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
    def _decode_chunk(self, latents: Tensor) -> Tensor:
        # The VAE runs in fp32: its normalisation statistics and decoder are unstable in half precision.
        z = latents.to(torch.float32) * self.latents_std + self.latents_mean
        video = z if self.vae is None else self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return self._to_unit_video(video)


__all__ = ["WanComponents", "WanPolicy", "load_wan_components", "DEFAULT_LORA_TARGETS"]
