"""The settings every backbone adapter shares: precision, LoRA, the reference model, guidance, decoding.

One frozen dataclass, :class:`PolicySettings`, checked in one place. A policy's constructor takes
its fields as keyword arguments (``WanPolicy(path, lora_rank=8)``; in YAML, flat under
``model.policy.init_args``) and hands them to the dataclass; LightningCLI follows that hand-over
and lists the fields, with the help below, under each policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from sp_grpo.policies.guidance import CFGBatching

DType = Literal["float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: The attention projections of diffusers' video transformers, LoRA's usual targets.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_KEY = "model.policy.init_args"


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``torch_dtype`` setting.

    Raises:
        ValueError: the name is not one of ``float32``, ``bfloat16``, ``float16``.
    """
    if name not in _DTYPES:
        raise ValueError(f"`{_KEY}.torch_dtype` ({name!r}) must be one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


@dataclass(frozen=True)
class PolicySettings:
    """How a backbone is trained and run, whatever the backbone.

    Args:
        torch_dtype: Dtype of the transformer's base weights and the text encoders; the VAE stays
            fp32. LoRA weights are always fp32 (small updates would round away in half precision).
        lora_rank: LoRA rank through peft; ``None`` trains the whole transformer.
        lora_alpha: LoRA scaling numerator (``alpha / rank`` scales the update); defaults to the rank.
        lora_target_modules: Names of the transformer's linear layers that get LoRA adapters.
        lora_seed: Seed of the LoRA weights' random initialisation (the run is reproducible).
        reference_copy: With full fine-tuning, keep a frozen copy of the initial transformer as the
            KL reference (doubles the transformer's memory). With LoRA the reference is the same
            network with the adapter disabled, at no memory cost.
        gradient_checkpointing: Recompute transformer blocks in the backward pass to save memory.
        negative_prompt: Prompt of the unconditional branch of classifier-free guidance.
        cfg_batched: Run the conditional and unconditional passes of guidance as one batch
            (``true``), as two passes (``false``), or ``auto``: whichever measured faster on the
            device type (batched on CPUs and GPUs so far; README, "Performance").
        decode_chunk_size: Decode at most this many videos at once (bounds VAE memory); ``None``
            decodes the whole batch together.
        vae_tiling: Decode in overlapping spatial tiles (diffusers' ``enable_tiling``), for long
            high-resolution videos.

    Raises:
        ValueError: a setting is out of range; the message names it as ``model.policy.init_args.<name>``.

    Example:
        >>> PolicySettings(lora_rank=0)
        Traceback (most recent call last):
        ...
        ValueError: `model.policy.init_args.lora_rank` (0) must be at least 1, or null to train the whole transformer.
    """

    torch_dtype: DType = "float32"
    lora_rank: int | None = 32
    lora_alpha: float | None = None
    lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS
    lora_seed: int = 0
    reference_copy: bool = False
    gradient_checkpointing: bool = False
    negative_prompt: str = ""
    cfg_batched: CFGBatching = "auto"
    decode_chunk_size: int | None = None
    vae_tiling: bool = False

    def __post_init__(self) -> None:
        resolve_dtype(self.torch_dtype)
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"`{_KEY}.lora_rank` ({self.lora_rank}) must be at least 1, or null to train the whole transformer.")
        if self.cfg_batched not in ("auto", True, False):
            raise ValueError(
                f"`{_KEY}.cfg_batched` ({self.cfg_batched!r}) must be true, false or 'auto' (the faster one measured on the device)."
            )
        if self.decode_chunk_size is not None and self.decode_chunk_size < 1:
            raise ValueError(f"`{_KEY}.decode_chunk_size` ({self.decode_chunk_size}) must be at least 1, or null for no chunking.")
        # A tuple, so that the settings stay hashable and unchanged when a list is passed.
        object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))

    @property
    def dtype(self) -> torch.dtype:
        """``torch_dtype`` as a :class:`torch.dtype`."""
        return _DTYPES[self.torch_dtype]


__all__ = ["DEFAULT_LORA_TARGETS", "DType", "PolicySettings", "resolve_dtype"]
