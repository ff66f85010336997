"""Wan 2.1 / 2.2-style text-to-video generators from diffusers, as a :class:`VideoPolicy`.

Built on diffusers' ``WanTransformer3DModel``, ``AutoencoderKLWan`` and
``FlowMatchEulerDiscreteScheduler`` and transformers' UMT5 encoder. diffusers' ``WanPipeline``
gives no per-step log-probabilities, so the sampling loop lives in :mod:`sp_grpo.rollout`; this
adapter only encodes prompts (the pipeline's recipe: pad to ``max_sequence_length``, zero the
padding), predicts velocities and decodes latents.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from sp_grpo.policies.base import PromptEmbeds, cfg_velocity, omit_frozen_from_state_dict

DType = Literal["float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class WanComponents:
    """The five parts of a Wan pipeline folder, already built or loaded."""

    transformer: nn.Module
    vae: nn.Module | None  # None: the transformer works on pixels (scaled to [-1, 1]) directly
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any


def _check_diffusers_folder(path: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(
            f"`pretrained_path` ({path!r}) does not exist: point `model.policy.init_args.pretrained_path` at a"
            " local diffusers folder (one with model_index.json, e.g. a downloaded Wan-AI/Wan2.1-T2V-1.3B-Diffusers)."
        )
    missing = [p for p in ("model_index.json", "transformer", "text_encoder", "tokenizer") if not (folder / p).exists()]
    if missing:
        raise ValueError(
            f"`pretrained_path` ({path!r}) is not a diffusers Wan folder: it lacks {', '.join(missing)}. Point"
            " `model.policy.init_args.pretrained_path` at the folder that holds model_index.json and the"
            " transformer/, vae/ (optional), text_encoder/, tokenizer/ and scheduler/ subfolders."
        )
    return folder


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

    folder = _check_diffusers_folder(path)
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


class WanPolicy(nn.Module):
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
        cfg_batched: Run the conditional and unconditional passes of guidance as one batch.
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
        cfg_batched: bool = True,
        decode_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if torch_dtype not in _DTYPES:
            raise ValueError(f"`torch_dtype` ({torch_dtype!r}) must be one of {sorted(_DTYPES)}.")
        if lora_rank is not None and lora_rank < 1:
            raise ValueError(f"`lora_rank` ({lora_rank}) must be at least 1, or null to train the whole transformer.")
        if max_sequence_length < 1:
            raise ValueError(f"`max_sequence_length` ({max_sequence_length}) must be at least 1.")
        if decode_chunk_size is not None and decode_chunk_size < 1:
            raise ValueError(f"`decode_chunk_size` ({decode_chunk_size}) must be at least 1, or null for no chunking.")
        if components is None:
            if pretrained_path is None:
                raise ValueError(
                    "WanPolicy needs weights: set `pretrained_path` to a local diffusers Wan folder, or pass"
                    " `components` (see sp_grpo.policies.tiny for an offline tiny model)."
                )
            components = load_wan_components(pretrained_path, _DTYPES[torch_dtype], shift)
        elif shift is not None:
            components.scheduler = type(components.scheduler).from_config(components.scheduler.config, shift=shift)

        dtype = _DTYPES[torch_dtype]
        # Only cast what is not already in the dtype: from_pretrained(torch_dtype=...) keeps the few
        # modules Wan needs in fp32, and a blanket .to() would undo that.
        self.transformer = components.transformer if components.transformer.dtype == dtype else components.transformer.to(dtype)
        self.vae = components.vae
        self.text_encoder = components.text_encoder if components.text_encoder.dtype == dtype else components.text_encoder.to(dtype)
        self.tokenizer = components.tokenizer
        self.scheduler = components.scheduler
        self.negative_prompt = negative_prompt
        self.max_sequence_length = max_sequence_length
        self.cfg_batched = cfg_batched
        self.decode_chunk_size = decode_chunk_size
        self.lora_rank = lora_rank

        for module in (self.vae, self.text_encoder):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        self.reference_transformer: nn.Module | None = None
        if lora_rank is None:
            self.transformer.requires_grad_(True)
            if reference_copy:
                import copy

                self.reference_transformer = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        else:
            from peft import LoraConfig

            self.transformer.requires_grad_(False)
            config = LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha if lora_alpha is not None else lora_rank,
                target_modules=list(lora_target_modules),
                init_lora_weights=True,
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(lora_seed)
                self.transformer.add_adapter(config)
            # peft creates adapters in the base layer's dtype; keep the trained weights in fp32 so that
            # small updates are not rounded away in bf16.
            for name, param in self.transformer.named_parameters():
                is_lora = "lora_" in name
                param.requires_grad_(is_lora)
                if is_lora:
                    param.data = param.data.float()
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        omit_frozen_from_state_dict(self)

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

    # -- nn.Module ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> WanPolicy:
        """Only the transformer follows train/eval; the frozen encoders stay in eval (no dropout)."""
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        self.text_encoder.eval()
        if self.reference_transformer is not None:
            self.reference_transformer.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The LoRA weights, or every transformer weight under full fine-tuning."""
        return [p for p in self.transformer.parameters() if p.requires_grad]

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
        return hidden.to(self.transformer.dtype)

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

    def sigmas(self, num_steps: int) -> Tensor:
        """The scheduler's ``(num_steps + 1,)`` shifted sigma schedule, ending at 0, in fp32 on CPU."""
        self.scheduler.set_timesteps(num_steps, device="cpu")
        return self.scheduler.sigmas.to(torch.float32).clone()

    # -- network --------------------------------------------------------------------------------
    def velocity(self, latents: Tensor, sigma: Tensor, embeds: PromptEmbeds, guidance_scale: float) -> Tensor:
        """Guided velocity ``(B, *latent_shape)``; see :func:`~sp_grpo.policies.base.cfg_velocity`."""
        return cfg_velocity(self._forward, latents, sigma, embeds, guidance_scale, self.cfg_batched)

    def _forward(self, latents: Tensor, sigma: Tensor, text: Tensor) -> Tensor:
        network = self.transformer
        if self._use_reference and self.reference_transformer is not None:
            network = self.reference_transformer
        timestep = sigma.to(torch.float32) * self.scheduler.config.num_train_timesteps
        out = network(
            hidden_states=latents.to(network.dtype),
            timestep=timestep,
            encoder_hidden_states=text.to(network.dtype),
            return_dict=False,
        )[0]
        return out.to(latents.dtype)

    _use_reference = False

    @property
    def has_reference(self) -> bool:
        """True with LoRA (adapter disabled) or with ``reference_copy`` under full fine-tuning."""
        return self.lora_rank is not None or self.reference_transformer is not None

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within this context :meth:`velocity` is the frozen reference model.

        Raises:
            RuntimeError: full fine-tuning without ``reference_copy``: there is no reference.
        """
        if not self.has_reference:
            raise RuntimeError(
                "No reference model: full fine-tuning keeps none unless `reference_copy` is true. Set"
                " `model.policy.init_args.reference_copy: true`, use LoRA, or set `model.kl_coef: 0`."
            )
        self._use_reference = True
        if self.lora_rank is not None:
            self.transformer.disable_adapters()
        try:
            yield
        finally:
            self._use_reference = False
            if self.lora_rank is not None:
                self.transformer.enable_adapters()

    # -- pixels ---------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Decode latents to ``(B, T, 3, H, W)`` videos in ``[0, 1]``, ``decode_chunk_size`` at a time."""
        chunk = self.decode_chunk_size or latents.shape[0]
        videos = []
        for part in latents.split(chunk):
            # The VAE runs in fp32: its normalisation statistics and decoder are unstable in half precision.
            z = part.to(torch.float32) * self.latents_std + self.latents_mean
            video = z if self.vae is None else self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
            videos.append(((video.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 1, 3, 4))
        return torch.cat(videos)


def num_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = ["WanComponents", "WanPolicy", "load_wan_components", "num_parameters", "DEFAULT_LORA_TARGETS"]
