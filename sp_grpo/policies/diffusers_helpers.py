"""Helpers the backbone files share besides the base class: folders, pipelines, schedules, packed text, checkpoints.

Backbones whose transformer needs more than one text tensor (an attention mask, a pooled embedding)
pack them into the single ``(N, L, D)`` tensor of :class:`~sp_grpo.policies.protocol.PromptEmbeds`
with :func:`pack_text`, so that the rollout, guidance batching and the training step, which only
index, repeat and concatenate rows, never need to know.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import torch
from torch import Tensor, nn

C = TypeVar("C")


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


def components_or_load(components: C | None, pretrained_path: str | None, load: Callable[[str], C], family: str, hint: str) -> C:
    """``components`` when given, else ``load(pretrained_path)``: a policy's weights come from one or the other.

    Args:
        components: Already built parts, or ``None``.
        pretrained_path: A local diffusers folder, or ``None``.
        load: Loads the folder.
        family: The policy's class name, for the message.
        hint: Where to find an offline tiny model, for the message.

    Raises:
        ValueError: neither is given.
    """
    if components is not None:
        return components
    if pretrained_path is None:
        raise ValueError(
            f"{family} needs weights: set `model.policy.init_args.pretrained_path` to a local diffusers folder, or pass"
            f" `components` (see {hint} for an offline tiny model)."
        )
    return load(pretrained_path)


def build_pipeline(pipeline_cls, components):
    """A diffusers pipeline over the modules of a components dataclass (shared, not copied).

    The dataclass's field names are the pipeline's constructor arguments (``WanComponents`` for
    ``WanPipeline``, ``HunyuanVideoComponents`` for ``HunyuanVideoPipeline``, ...).
    """
    return pipeline_cls(**{field.name: getattr(components, field.name) for field in dataclasses.fields(components)})


def save_folder(components, path: str | Path) -> Path:
    """Write a backbone's components (``WanComponents``, ...) as the diffusers folder its policy loads.

    Returns:
        The folder.
    """
    components.pipeline().save_pretrained(str(path), safe_serialization=True)
    return Path(path)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Random draws inside come from ``seed``; the global generator is as it was afterwards.

    For random initial weights (tiny models, LoRA adapters) that are the same in every run and
    leave the run's own random stream alone. Only the CPU generator is forked: the weights are
    built on the CPU.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


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


def _unwrapped_name(name: str) -> str:
    """A parameter's name as it appears in a state dict: without FSDP's and checkpointing's wrapper levels."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def omit_frozen_from_state_dict(module: nn.Module) -> None:
    """Leave frozen parameters out of ``module.state_dict()`` and do not require them when loading.

    Frozen weights (text encoder, VAE, the base transformer under LoRA) come from the pretrained
    folder; saving them would make every checkpoint as large as the model. With this, a Lightning
    checkpoint (and Lightning's ``EMAWeightAveraging``, which averages a copy of the module) holds
    only what training changes, and loading it with ``strict=True`` still checks every trainable key.
    Setting ``module.omit_frozen_in_state_dict = False`` turns the omission off. Under FSDP the hook
    runs after FSDP's own state-dict hooks, on the full or sharded tensors they produce.
    """

    def frozen_names() -> set[str]:
        return {
            _unwrapped_name(name) for name, param in module.named_parameters(remove_duplicate=False) if not param.requires_grad
        }

    def drop_frozen(mod: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        if not getattr(module, "omit_frozen_in_state_dict", True):
            return
        for name in frozen_names():
            state_dict.pop(prefix + name, None)

    def allow_missing_frozen(mod: nn.Module, incompatible_keys) -> None:
        # The keys are relative to the module being loaded, of which this one may be a child.
        frozen = frozen_names()
        incompatible_keys.missing_keys[:] = [
            key for key in incompatible_keys.missing_keys if not any(key == n or key.endswith("." + n) for n in frozen)
        ]

    module.register_state_dict_post_hook(drop_frozen)
    module.register_load_state_dict_post_hook(allow_missing_frozen)


__all__ = [
    "build_pipeline",
    "check_diffusers_folder",
    "components_or_load",
    "flow_sigmas",
    "omit_frozen_from_state_dict",
    "pack_text",
    "save_folder",
    "seeded",
    "unpack_text",
]
