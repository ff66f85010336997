"""The base class of the diffusers backbone adapters: LoRA, the reference model, guidance, prompts, decoding.

A backbone file (``wan.py``, ``hunyuan.py``, ``ltx.py``) subclasses :class:`DiffusersVideoPolicy`
and writes only what differs between model families: how one batch of texts is encoded
(``_encode``), how the transformer is called (``_forward``), the latent layout, the sigma schedule
and how one chunk of latents is decoded (``_decode_chunk``). The settings they share are one
:class:`~sp_grpo.policies.settings.PolicySettings`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from sp_grpo.policies.diffusers_helpers import omit_frozen_from_state_dict, seeded
from sp_grpo.policies.guidance import CFGBatching, cfg_batched_on, cfg_velocity
from sp_grpo.policies.protocol import PromptEmbeds
from sp_grpo.policies.settings import PolicySettings


@dataclass(frozen=True)
class LatentLayout:
    """How a backbone's latents relate to the video: what :meth:`DiffusersVideoPolicy.latent_shape` needs.

    Attributes:
        channels: Latent channels ``C``.
        vae_t: The VAE's temporal stride (frames per latent frame, after the first).
        vae_s: The VAE's spatial stride.
        patch: The transformer's patch ``(t, h, w)`` over the latents.
    """

    channels: int
    vae_t: int
    vae_s: int
    patch: tuple[int, int, int]

    @classmethod
    def of(cls, transformer_config: Any, vae_t: int, vae_s: int) -> LatentLayout:
        """The layout of a transformer whose config names ``in_channels``, ``patch_size_t`` and ``patch_size``
        (HunyuanVideo's, LTX-Video's), over a VAE of strides ``vae_t`` and ``vae_s``."""
        config = transformer_config
        return cls(config.in_channels, int(vae_t), int(vae_s), (config.patch_size_t, config.patch_size, config.patch_size))


class DiffusersVideoPolicy(nn.Module):
    """What every diffusers backbone adapter behind :class:`~sp_grpo.policies.VideoPolicy` shares.

    It owns the trainable transformer and the frozen parts, sets up LoRA through peft (the
    reference model is the same network with the adapter disabled) or full fine-tuning (optionally
    with a frozen copy as the reference), gradient checkpointing, batched classifier-free guidance,
    prompt encoding with the negative prompt, the latent-size checks and chunked decoding.
    ``state_dict()`` holds only the trainable weights. Subclasses set :attr:`layout` and implement
    :meth:`_encode`, :meth:`sigmas`, :meth:`_forward` and :meth:`_decode_chunk`.

    Args:
        components: The pipeline's parts, a dataclass whose field names are the diffusers pipeline's
            (``WanComponents``, ...); each becomes an attribute of that name. ``transformer`` is
            trained; the other modules (VAE, text encoders) are frozen, kept in eval mode, and the
            text encoders cast to ``settings.torch_dtype``; the rest (tokenizers, scheduler) are kept.
        settings: The shared settings.
        max_sequence_length: Text tokens per prompt.

    Raises:
        ValueError: ``max_sequence_length`` is below 1.
    """

    #: Set by the subclass: the latent layout :meth:`latent_shape` checks sizes against.
    layout: LatentLayout

    def __init__(self, components: Any, settings: PolicySettings, *, max_sequence_length: int) -> None:
        super().__init__()
        if max_sequence_length < 1:
            raise ValueError(f"`model.policy.init_args.max_sequence_length` ({max_sequence_length}) must be at least 1, e.g. 128.")
        self.settings = settings
        self.max_sequence_length = max_sequence_length
        dtype = settings.dtype
        parts = {field.name: getattr(components, field.name) for field in dataclasses.fields(components)}
        transformer = parts.pop("transformer")
        # Only cast when needed: from_pretrained(torch_dtype=...) may keep a few modules in fp32 on purpose.
        self.transformer = transformer if transformer.dtype == dtype else transformer.to(dtype)
        self._frozen_names = tuple(name for name, part in parts.items() if isinstance(part, nn.Module))
        for name, part in parts.items():
            if isinstance(part, nn.Module):
                if name.startswith("text_encoder") and part.dtype != dtype:
                    part = part.to(dtype)
                part = part.requires_grad_(False).eval()
            setattr(self, name, part)
        # A buffer only to know the device the policy was moved to (prompts are tokenized on the CPU).
        self.register_buffer("_device_marker", torch.zeros(()), persistent=False)

        self.reference_transformer: nn.Module | None = None
        if settings.lora_rank is None:
            self.transformer.requires_grad_(True)
            if settings.reference_copy:
                self.reference_transformer = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        else:
            self._add_lora(settings)
        if settings.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if settings.vae_tiling:
            self.vae.enable_tiling()
        # Checkpoints hold only what training changes; the frozen weights come from the pretrained folder.
        omit_frozen_from_state_dict(self)

    def _add_lora(self, settings: PolicySettings) -> None:
        from peft import LoraConfig

        self.transformer.requires_grad_(False)
        config = LoraConfig(
            r=settings.lora_rank,
            lora_alpha=settings.lora_alpha if settings.lora_alpha is not None else settings.lora_rank,
            target_modules=list(settings.lora_target_modules),
            init_lora_weights=True,
        )
        with seeded(settings.lora_seed):
            self.transformer.add_adapter(config)
        # peft creates adapters in the base layer's dtype; the trained weights stay fp32 so that
        # small updates are not rounded away in bf16.
        for name, param in self.transformer.named_parameters():
            is_lora = "lora_" in name
            param.requires_grad_(is_lora)
            if is_lora:
                param.data = param.data.float()

    # -- settings that may change after construction (benchmarks switch them) -------------------
    @property
    def lora_rank(self) -> int | None:
        """The LoRA rank; ``None`` under full fine-tuning."""
        return self.settings.lora_rank

    @property
    def cfg_batched(self) -> CFGBatching:
        """The ``cfg_batched`` setting; assigning it checks the new value."""
        return self.settings.cfg_batched

    @cfg_batched.setter
    def cfg_batched(self, value: CFGBatching) -> None:
        self.settings = dataclasses.replace(self.settings, cfg_batched=value)

    @property
    def decode_chunk_size(self) -> int | None:
        """The ``decode_chunk_size`` setting; assigning it checks the new value."""
        return self.settings.decode_chunk_size

    @decode_chunk_size.setter
    def decode_chunk_size(self, value: int | None) -> None:
        self.settings = dataclasses.replace(self.settings, decode_chunk_size=value)

    # -- nn.Module ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DiffusersVideoPolicy:
        """Only the transformer follows train/eval; the frozen parts stay in eval (no dropout)."""
        super().train(mode)
        for name in self._frozen_names:
            getattr(self, name).eval()
        if self.reference_transformer is not None:
            self.reference_transformer.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The LoRA weights, or every transformer weight under full fine-tuning."""
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def shard(self, wrap: Callable[[nn.Module], nn.Module], device: torch.device) -> None:
        """Prepare for fully sharded data parallel training (``SelfPacedGRPO`` calls it once under FSDP).

        The transformer, the text encoders and the reference copy are each replaced by
        ``wrap(network)``: its own FSDP root, whose forward and backward passes complete before
        the optimizer steps. The other parts (VAE, the policy's own buffers) stay whole on every
        rank and move to ``device``; the wrapped ones are moved as they are sharded, one unit at a
        time, so a rank never holds the whole transformer.

        Args:
            wrap: Turns a network into an FSDP unit (:class:`~sp_grpo.SelfPacedGRPO` passes the
                strategy's sharding, precision and auto-wrap settings).
            device: This rank's device.
        """
        sharded = ["transformer", "reference_transformer"]
        sharded += [name for name in self._frozen_names if name.startswith("text_encoder")]
        for name, child in self.named_children():
            if name not in sharded:
                child.to(device)
        for name, tensor in self.named_buffers(recurse=False):
            setattr(self, name, tensor.to(device))
        for name in sharded:
            if getattr(self, name, None) is not None:
                setattr(self, name, wrap(getattr(self, name)))
        if getattr(self.transformer, "is_gradient_checkpointing", False):
            _checkpoint_inside_units(self.transformer)

    # -- text -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], guidance: bool) -> PromptEmbeds:
        """Encode each prompt once, and with ``guidance`` the negative prompt once, repeated.

        Returns:
            :class:`PromptEmbeds` with ``len(prompts)`` rows of :meth:`_encode`'s layout.
        """
        cond = self._encode(list(prompts))
        uncond = self._encode([self.settings.negative_prompt]).expand_as(cond) if guidance else None
        return PromptEmbeds(cond, uncond)

    def _encode(self, texts: list[str]) -> Tensor:
        """``(N, L, D)`` conditioning of ``N`` texts, on the policy's device, in the transformer's dtype."""
        raise NotImplementedError

    @property
    def _device(self) -> torch.device:
        """The device the policy was moved to."""
        return self._device_marker.device

    # -- latents ----------------------------------------------------------------------------------
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """``(C, (F - 1) / t + 1, H / s, W / s)`` for a video of ``F`` frames of ``H x W`` (VAE strides ``t``, ``s``).

        Raises:
            ValueError: the size does not fit the VAE's and the transformer's strides.
        """
        layout = self.layout
        step = layout.vae_t * layout.patch[0]
        if num_frames < 1 or (num_frames - 1) % step != 0:
            raise ValueError(
                f"`num_frames` ({num_frames}) must be 1 more than a multiple of {step} (VAE temporal stride {layout.vae_t}"
                f" x patch {layout.patch[0]}): set `num_frames` of `model.sampler` (and `model.val_sampler`) to e.g."
                f" {step * max(1, num_frames // step) + 1}."
            )
        for name, size, patch in (("height", height, layout.patch[1]), ("width", width, layout.patch[2])):
            multiple = layout.vae_s * patch
            if size < multiple or size % multiple != 0:
                raise ValueError(
                    f"`{name}` ({size}) must be a positive multiple of {multiple} (VAE stride {layout.vae_s} x patch {patch}):"
                    f" set `{name}` of `model.sampler` (and `model.val_sampler`) to {max(multiple, size // multiple * multiple)}."
                )
        return (layout.channels, (num_frames - 1) // layout.vae_t + 1, height // layout.vae_s, width // layout.vae_s)

    def sigmas(self, num_steps: int, latent_shape: Sequence[int] | None = None) -> Tensor:
        """``(num_steps + 1,)`` fp32 sigmas on the CPU, from ~1 down to 0; see :class:`~sp_grpo.policies.VideoPolicy`."""
        raise NotImplementedError

    # -- network --------------------------------------------------------------------------------
    def velocity(self, latents: Tensor, sigma: Tensor, embeds: PromptEmbeds, guidance_scale: float) -> Tensor:
        """Guided velocity ``(B, *latent_shape)``; see :func:`~sp_grpo.policies.guidance.cfg_velocity`."""
        batched = cfg_batched_on(latents.device, self.cfg_batched)
        return cfg_velocity(self._forward, latents, sigma, embeds, guidance_scale, batched)

    def _network(self) -> nn.Module:
        """The network :meth:`_forward` calls: the frozen copy inside :meth:`reference`, else the transformer."""
        if self._use_reference and self.reference_transformer is not None:
            return self.reference_transformer
        return self.transformer

    def _compute_dtype(self, network: nn.Module) -> torch.dtype:
        """``network.dtype`` in constant time, for the casts around every network call.

        diffusers' ``ModelMixin.dtype`` walks every submodule and parameter on each read (234
        modules under LoRA on the tiny Wan; 17 % of its update). The first read of a network
        finds the parameter that property reports and keeps it; later reads return that
        parameter's dtype. A cast (``.to``, ``.half``, also with parameter swapping) keeps
        parameter objects, so the answer follows it; a network replaced (FSDP wrapping, a copy) is
        looked up again, being another object.
        """
        cache = self.__dict__.setdefault("_dtype_probes", {})
        entry = cache.get(id(network))
        if entry is None or entry[0] is not network:
            entry = cache[id(network)] = (network, _dtype_probe(network))
        probe = entry[1]
        return probe if isinstance(probe, torch.dtype) else probe.dtype

    def _forward(self, latents: Tensor, sigma: Tensor, text: Tensor) -> Tensor:
        """One unguided network call: ``(B, *latent_shape)`` latents, ``(B,)`` sigmas, ``B`` rows of text."""
        raise NotImplementedError

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
        from peft.tuners.tuners_utils import BaseTunerLayer

        # The adapters are switched off by their flag alone. peft's disable_adapters()/enable_adapters()
        # also flip the adapters' requires_grad, which under FSDP (use_orig_params) corrupts the gradients
        # of the next backward pass (measured: tests/test_fsdp.py against DDP).
        layers = [m for m in self.transformer.modules() if isinstance(m, BaseTunerLayer)] if self.lora_rank is not None else []
        states = [layer._disable_adapters for layer in layers]
        self._use_reference = True
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            self._use_reference = False
            for layer, state in zip(layers, states):
                layer._disable_adapters = state

    # -- pixels ---------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Decode latents to ``(B, T, 3, H, W)`` videos in ``[0, 1]``, ``decode_chunk_size`` at a time.

        ``generator`` feeds decoders that mix noise in (LTX-Video); the others ignore it.
        """
        chunk = self.decode_chunk_size or latents.shape[0]
        # Under bf16-mixed precision the training step runs in autocast; the VAE must not.
        with torch.autocast(device_type=latents.device.type, enabled=False):
            return torch.cat([self._decode_chunk(part, generator) for part in latents.split(chunk)])

    def _decode_chunk(self, latents: Tensor, generator: torch.Generator | None) -> Tensor:
        """Decode ``(b, *latent_shape)`` latents to ``(b, T, 3, H, W)`` in ``[0, 1]``."""
        raise NotImplementedError

    @staticmethod
    def _to_unit_video(video: Tensor) -> Tensor:
        """A VAE's ``(b, 3, T, H, W)`` output in ``[-1, 1]`` to ``(b, T, 3, H, W)`` fp32 in ``[0, 1]``.

        .. math:: v = \\operatorname{clip}((x + 1) / 2, 0, 1)
        """
        return ((video.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 1, 3, 4)


def _dtype_probe(network: nn.Module) -> nn.Parameter | torch.dtype:
    """The parameter whose dtype diffusers reports as ``network.dtype``, or that dtype itself.

    diffusers reports the compute dtype of a layerwise-casting hook when one is set (it does not
    follow the parameters, so it is kept as a dtype), else the first floating-point parameter's
    outside ``_keep_in_fp32_modules``.
    """
    dtype = network.dtype
    if any(getattr(module, "_diffusers_hook", None) is not None for module in network.modules()):
        return dtype
    keep_fp32 = getattr(network, "_keep_in_fp32_modules", None) or ()
    for name, param in network.named_parameters():
        if param.is_floating_point() and not any(keep in name for keep in keep_fp32):
            return param if param.dtype == dtype else dtype
    return dtype


def _checkpoint_inside_units(root: nn.Module) -> None:
    """Move a diffusers model's gradient checkpointing inside its FSDP units.

    diffusers checkpoints each block from the outside; with the blocks as FSDP units the recomputed
    forward then gathers weights again and saves different tensors, which checkpointing rejects.
    Wrapping each unit's block (inside the unit) recomputes the same blocks, the pattern FSDP supports.
    Without nested units (no ``auto_wrap_policy``) the blocks are plain modules and diffusers' own
    checkpointing stays.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.distributed.fsdp import FullyShardedDataParallel

    blocks = {id(unit.module) for unit in FullyShardedDataParallel.fsdp_modules(root) if unit is not root}
    if blocks:
        root.disable_gradient_checkpointing()
        apply_activation_checkpointing(root, check_fn=lambda module: id(module) in blocks)


__all__ = ["DiffusersVideoPolicy", "LatentLayout"]
