"""What every diffusers flow-matching backbone adapter shares: LoRA, the reference model, guidance, decoding.

A backbone file (``hunyuan.py``, ``ltx.py``) subclasses :class:`DiffusersVideoPolicy` and writes only
what differs between model families: how prompts are encoded, how the transformer is called, the
latent layout, the sigma schedule and how one chunk of latents is decoded. Backbones whose
transformer needs more than one text tensor (an attention mask, a pooled embedding) pack them into
the single ``(N, L, D)`` tensor of :class:`~sp_grpo.policies.base.PromptEmbeds` with
:func:`pack_text`, so that the rollout, guidance batching and the training step, which only index,
repeat and concatenate rows, never need to know.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from sp_grpo.policies.base import PromptEmbeds, cfg_batched_on, cfg_velocity, omit_frozen_from_state_dict

DType = Literal["float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``torch_dtype`` setting.

    Raises:
        ValueError: the name is not one of ``float32``, ``bfloat16``, ``float16``.
    """
    if name not in _DTYPES:
        raise ValueError(f"`torch_dtype` ({name!r}) must be one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def check_diffusers_folder(path: str, required: Sequence[str], family: str, example: str) -> Path:
    """Check that ``path`` is a local diffusers pipeline folder with the ``required`` entries.

    Args:
        path: The folder.
        required: Entries that must exist in it (``model_index.json``, subfolders).
        family: Model family, for the message (``"HunyuanVideo"``).
        example: A model id whose downloaded folder would fit, for the message.

    Returns:
        The folder as a :class:`~pathlib.Path`.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: an entry is missing.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(
            f"`pretrained_path` ({path!r}) does not exist: point `model.policy.init_args.pretrained_path` at a"
            f" local diffusers folder (one with model_index.json, e.g. a downloaded {example})."
        )
    missing = [entry for entry in required if not (folder / entry).exists()]
    if missing:
        raise ValueError(
            f"`pretrained_path` ({path!r}) is not a diffusers {family} folder: it lacks {', '.join(missing)}. Point"
            f" `model.policy.init_args.pretrained_path` at the folder that holds {', '.join(required)}."
        )
    return folder


def pack_text(tokens: Tensor, mask: Tensor, pooled: Tensor | None = None) -> Tensor:
    """Pack token embeddings, their attention mask and an optional pooled embedding into one tensor.

    Layout: channel ``D`` of each token row holds the mask; with ``pooled``, one extra row holds
    it in its first ``P`` channels. Masks are 0/1, exact in any float dtype.

    Args:
        tokens: ``(N, L, D)`` token embeddings.
        mask: ``(N, L)`` attention mask (bool or 0/1).
        pooled: ``(N, P)`` pooled embedding with ``P <= D``, or ``None``.

    Returns:
        ``(N, L, D + 1)``, or ``(N, L + 1, D + 1)`` with ``pooled``, in the tokens' dtype.

    Raises:
        ValueError: ``pooled`` is wider than the tokens.
    """
    packed = torch.cat([tokens, mask.unsqueeze(-1).to(tokens.dtype)], dim=-1)
    if pooled is None:
        return packed
    n, _, width = packed.shape
    if pooled.shape[-1] > width - 1:
        raise ValueError(f"The pooled text embedding ({pooled.shape[-1]} wide) must not be wider than the token embeddings ({width - 1}).")
    row = packed.new_zeros(n, 1, width)
    row[:, 0, : pooled.shape[-1]] = pooled.to(packed.dtype)
    return torch.cat([packed, row], dim=1)


def unpack_text(packed: Tensor, pooled_dim: int = 0) -> tuple[Tensor, Tensor, Tensor | None]:
    """Inverse of :func:`pack_text`.

    Args:
        packed: the packed tensor.
        pooled_dim: ``P``, the width of the pooled embedding; 0 when none was packed.

    Returns:
        ``tokens`` ``(N, L, D)``, ``mask`` ``(N, L)`` (in the packed dtype) and ``pooled`` ``(N, P)`` or ``None``.
    """
    if pooled_dim:
        pooled = packed[:, -1, :pooled_dim]
        packed = packed[:, :-1]
    else:
        pooled = None
    return packed[..., :-1], packed[..., -1], pooled


class DiffusersVideoPolicy(nn.Module):
    """Shared machinery of the diffusers backbone adapters behind :class:`~sp_grpo.policies.VideoPolicy`.

    It owns the trainable transformer and the frozen parts, sets up LoRA through peft (the
    reference model is the same network with the adapter disabled) or full fine-tuning (optionally
    with a frozen copy as the reference), gradient checkpointing, batched classifier-free guidance
    and chunked decoding. ``state_dict()`` holds only the trainable weights. Subclasses implement :meth:`encode_prompts`, :meth:`latent_shape`,
    :meth:`sigmas`, :meth:`_forward` and :meth:`_decode_chunk`.

    Args:
        transformer: The denoising network.
        frozen: Name -> frozen module (VAE, text encoders); set as attributes, kept in eval mode
            without gradients. ``None`` values are set as ``None``.
        torch_dtype: Dtype of the transformer's base weights.
        lora_rank: LoRA rank; ``None`` trains the whole transformer.
        lora_alpha: LoRA scaling numerator; defaults to the rank.
        lora_target_modules: Names of the transformer's linear layers that get adapters.
        lora_seed: Seed of the adapters' random initialisation.
        reference_copy: Under full fine-tuning, keep a frozen copy of the transformer as the KL reference.
        gradient_checkpointing: Recompute transformer blocks in the backward pass.
        cfg_batched: Run both halves of classifier-free guidance as one batch (``True``), as two
            passes (``False``), or ``"auto"``: whichever measured faster on this device type
            (:func:`~sp_grpo.policies.base.cfg_batched_on`; batched on CPUs and GPUs so far).
        decode_chunk_size: Decode at most this many videos at once; ``None`` decodes all together.

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(
        self,
        transformer: nn.Module,
        frozen: dict[str, nn.Module | None],
        *,
        torch_dtype: DType = "float32",
        lora_rank: int | None = 32,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
        lora_seed: int = 0,
        reference_copy: bool = False,
        gradient_checkpointing: bool = False,
        cfg_batched: bool | Literal["auto"] = "auto",
        decode_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        dtype = resolve_dtype(torch_dtype)
        if cfg_batched not in ("auto", True, False):
            raise ValueError(f"`cfg_batched` ({cfg_batched!r}) must be true, false or 'auto' (the faster one measured on the device).")
        if lora_rank is not None and lora_rank < 1:
            raise ValueError(f"`lora_rank` ({lora_rank}) must be at least 1, or null to train the whole transformer.")
        if decode_chunk_size is not None and decode_chunk_size < 1:
            raise ValueError(f"`decode_chunk_size` ({decode_chunk_size}) must be at least 1, or null for no chunking.")
        # Only cast when needed: from_pretrained(torch_dtype=...) may keep a few modules in fp32 on purpose.
        self.transformer = transformer if transformer.dtype == dtype else transformer.to(dtype)
        self._frozen_names = tuple(frozen)
        for name, module in frozen.items():
            if module is not None:
                module.requires_grad_(False).eval()
            setattr(self, name, module)
        self.lora_rank = lora_rank
        self.cfg_batched = cfg_batched
        self.decode_chunk_size = decode_chunk_size

        self.reference_transformer: nn.Module | None = None
        if lora_rank is None:
            self.transformer.requires_grad_(True)
            if reference_copy:
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
            # peft creates adapters in the base layer's dtype; the trained weights stay fp32 so that
            # small updates are not rounded away in bf16.
            for name, param in self.transformer.named_parameters():
                is_lora = "lora_" in name
                param.requires_grad_(is_lora)
                if is_lora:
                    param.data = param.data.float()
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        # Checkpoints hold only what training changes; the frozen weights come from the pretrained folder.
        omit_frozen_from_state_dict(self)

    # -- nn.Module ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DiffusersVideoPolicy:
        """Only the transformer follows train/eval; the frozen parts stay in eval (no dropout)."""
        super().train(mode)
        for name in self._frozen_names:
            module = getattr(self, name)
            if module is not None:
                module.eval()
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

    # -- network --------------------------------------------------------------------------------
    def velocity(self, latents: Tensor, sigma: Tensor, embeds: PromptEmbeds, guidance_scale: float) -> Tensor:
        """Guided velocity ``(B, *latent_shape)``; see :func:`~sp_grpo.policies.base.cfg_velocity`."""
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
    def decode(self, latents: Tensor) -> Tensor:
        """Decode latents to ``(B, T, 3, H, W)`` videos in ``[0, 1]``, ``decode_chunk_size`` at a time."""
        chunk = self.decode_chunk_size or latents.shape[0]
        # Under bf16-mixed precision the training step runs in autocast; the VAE must not.
        with torch.autocast(device_type=latents.device.type, enabled=False):
            return torch.cat([self._decode_chunk(part) for part in latents.split(chunk)])

    def _decode_chunk(self, latents: Tensor) -> Tensor:
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


def build_pipeline(pipeline_cls, components):
    """A diffusers pipeline over the modules of a components dataclass (shared, not copied).

    The dataclass's field names are the pipeline's constructor arguments (``WanComponents`` for
    ``WanPipeline``, ``HunyuanVideoComponents`` for ``HunyuanVideoPipeline``, ...).
    """
    return pipeline_cls(**{field.name: getattr(components, field.name) for field in dataclasses.fields(components)})


def flow_sigmas(scheduler, sigmas: Sequence[float], mu: float | None = None) -> Tensor:
    """The scheduler's shifted schedule for the given unshifted ``sigmas``, with a final 0, fp32 on CPU.

    Args:
        scheduler: A diffusers ``FlowMatchEulerDiscreteScheduler``.
        sigmas: Unshifted noise levels, one per step.
        mu: Dynamic shift, for schedulers with ``use_dynamic_shifting``.

    Returns:
        ``(len(sigmas) + 1,)`` sigmas.
    """
    scheduler.set_timesteps(sigmas=list(sigmas), device="cpu", mu=mu)
    return scheduler.sigmas.to(torch.float32).clone()


__all__ = [
    "DType",
    "DiffusersVideoPolicy",
    "build_pipeline",
    "check_diffusers_folder",
    "flow_sigmas",
    "pack_text",
    "resolve_dtype",
    "unpack_text",
]
