"""Frozen feature backbones that several rewards share, run once per batch.

A :class:`SharedModel` memoizes its outputs while :meth:`SharedModel.caching` is active.
:class:`~sp_grpo.rewards.RewardSet` activates it around each call, so when two rewards ask the same
backbone for the features of the same frames, the backbone runs once and both get the same tensor.
The memo is keyed by the input itself (exact tensor equality, or the tuple of prompts), so sharing
needs nothing from the rewards except the same frames: give rewards that share a backbone the same
``num_frames`` / ``frame_stride``.

:class:`Backbone` wraps a ``transformers`` image or image-text model (CLIP, SigLIP, DINOv2, ViT):
preprocessing in torch (resize, centre crop, normalize), batched image and text embeddings. A path
string loads with ``from_pretrained(path, local_files_only=True)``; the same path resolves to the
same object, so rewards configured from YAML with one path share one model.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Backbone", "SharedModel", "resolve_backbone"]

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Normalization by model family when the checkpoint has no preprocessor_config.json.
_DEFAULT_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "clip": (_CLIP_MEAN, _CLIP_STD),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "siglip2": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": (_IMAGENET_MEAN, _IMAGENET_STD),
    "vit": (_IMAGENET_MEAN, _IMAGENET_STD),
}


def _same_input(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and torch.equal(a, b)
        )
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same_input(x, y) for x, y in zip(a, b))
    return a == b


class SharedModel(nn.Module):
    """A frozen model whose outputs are memoized per batch while :meth:`caching` is active."""

    def __init__(self) -> None:
        super().__init__()
        self._memo: dict[str, list[tuple[Any, Any]]] | None = None

    @contextmanager
    def caching(self) -> Iterator[None]:
        """Memoize outputs inside the block; nested blocks share the outer memo."""
        outer = self._memo is None
        if outer:
            self._memo = {}
        try:
            yield
        finally:
            if outer:
                self._memo = None

    def memoized(self, kind: str, inputs: Any, compute: Callable[[], Any]) -> Any:
        """Return ``compute()``, reusing an earlier result for equal ``inputs`` while caching.

        Args:
            kind: what is computed (e.g. ``"video"``, ``"text"``), so different outputs never mix.
            inputs: what the result depends on (a tensor, strings, or tuples of them), compared exactly.
            compute: produces the result.

        Returns:
            The (possibly memoized) result.
        """
        if self._memo is None:
            return compute()
        entries = self._memo.setdefault(kind, [])
        for key, value in entries:
            if _same_input(key, inputs):
                return value
        value = compute()
        entries.append((inputs, value))
        return value


class FrozenModel(SharedModel):
    """A shared, frozen model held outside the module tree.

    The model is not a registered submodule, so its weights never enter a ``state_dict`` (the
    policy's checkpoint) nor an optimizer; ``.to()`` / ``.cuda()`` still move it, and it stays in
    eval mode whatever its parent's mode. Subclasses call :meth:`_hold` in ``__init__``.
    """

    def _hold(self, model: nn.Module) -> None:
        model.eval().requires_grad_(False)
        object.__setattr__(self, "model", model)

    def _apply(self, fn: Callable, recurse: bool = True) -> FrozenModel:
        # Moves and casts reach the unregistered model too.
        self.model._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> FrozenModel:
        # Frozen: dropout and norm statistics stay in inference mode whatever the parent does.
        super().train(mode)
        self.model.eval()
        return self

    @property
    def device(self) -> torch.device:
        """Where the wrapped model lives."""
        return next(self.model.parameters()).device


class Backbone(FrozenModel):
    """A frozen ``transformers`` image (and optionally text) encoder with torch preprocessing.

    Image features are the model's ``get_image_features`` when it has one (CLIP, SigLIP: projected
    embeddings), otherwise its ``pooler_output`` or the first (CLS) token of ``last_hidden_state``
    (DINOv2, ViT). Frames are resized so the short side is ``image_size`` (bilinear, antialiased),
    centre-cropped to a square and normalized with ``image_mean`` / ``image_std``.

    The wrapped model is not a registered submodule, so its frozen weights stay out of checkpoints
    (they are reloaded from the path); ``.to()`` / ``.cuda()`` still move it.

    Args:
        model: a local directory for ``AutoModel.from_pretrained(model, local_files_only=True)``, or a
            loaded model object.
        tokenizer: a local directory or tokenizer object for text models; ``None`` loads it from
            ``model`` when ``model`` is a path (only when text is first needed).
        image_size: input resolution; ``None`` reads the model config.
        image_mean: per-channel mean; ``None`` reads ``preprocessor_config.json`` next to the model or
            uses the family default (CLIP, SigLIP, ImageNet for DINOv2/ViT).
        image_std: per-channel standard deviation, same defaults.
        text_padding: ``"longest"`` or ``"max_length"`` (SigLIP was trained with ``"max_length"``);
            ``None`` picks ``"max_length"`` for SigLIP and ``"longest"`` otherwise.
        batch_size: frames per forward pass.

    Raises:
        ValueError: If ``text_padding`` or ``batch_size`` is invalid.
    """

    def __init__(
        self,
        model: str | os.PathLike | nn.Module,
        tokenizer: str | os.PathLike | Any | None = None,
        *,
        image_size: int | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        text_padding: Literal["longest", "max_length"] | None = None,
        batch_size: int = 64,
    ) -> None:
        super().__init__()
        if text_padding not in (None, "longest", "max_length"):
            raise ValueError(f"`text_padding` ({text_padding!r}) must be one of None, 'longest', 'max_length'.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` ({batch_size}) must be a positive integer.")
        self.source = str(model) if isinstance(model, (str, os.PathLike)) else None
        if self.source is not None:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(self.source, local_files_only=True)
        self._hold(model)
        self._tokenizer = tokenizer
        config = model.config
        vision_config = getattr(config, "vision_config", None) or config
        model_type = getattr(config, "model_type", "")
        processor = self._read_preprocessor_config()
        default_mean, default_std = _DEFAULT_STATS.get(model_type, (_CLIP_MEAN, _CLIP_STD))
        self.image_size = int(image_size or vision_config.image_size)
        self.image_mean = tuple(image_mean or processor.get("image_mean", default_mean))
        self.image_std = tuple(image_std or processor.get("image_std", default_std))
        self.text_padding = text_padding or ("max_length" if model_type.startswith("siglip") else "longest")
        self.batch_size = batch_size

    def _read_preprocessor_config(self) -> dict[str, Any]:
        if self.source is None:
            return {}
        path = Path(self.source) / "preprocessor_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def tokenizer(self) -> Any:
        """The tokenizer, loaded on first use."""
        if self._tokenizer is None or isinstance(self._tokenizer, (str, os.PathLike)):
            path = self._tokenizer or self.source
            if path is None:
                raise ValueError(
                    "Backbone: text embeddings need a tokenizer; pass `tokenizer` (a path or object) "
                    "when `model` is an object rather than a path."
                )
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return self._tokenizer

    def preprocess(self, frames: Tensor) -> Tensor:
        """Resize, centre-crop and normalize frames for the model.

        .. math:: \\hat x = (\\operatorname{crop}(\\operatorname{resize}(x)) - \\mu) / \\sigma

        Args:
            frames: ``(N, 3, H, W)`` in ``[0, 1]``.

        Returns:
            ``(N, 3, S, S)`` float32 with ``S = image_size``.
        """
        x = frames.float()  # fp32: interpolation and normalization
        height, width = x.shape[-2:]
        scale = self.image_size / min(height, width)
        new_h, new_w = max(self.image_size, round(height * scale)), max(self.image_size, round(width * scale))
        if (new_h, new_w) != (height, width):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        top, left = (new_h - self.image_size) // 2, (new_w - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size]
        mean = x.new_tensor(self.image_mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.image_std).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def embed_images(self, frames: Tensor) -> Tensor:
        """Image features of a batch of frames.

        Args:
            frames: ``(N, 3, H, W)`` in ``[0, 1]``.

        Returns:
            ``(N, D)`` float32 features.
        """
        dtype = next(self.model.parameters()).dtype
        chunks = []
        for chunk in frames.split(self.batch_size):
            pixels = self.preprocess(chunk.to(self.device)).to(dtype)
            if hasattr(self.model, "get_image_features"):
                out = self.model.get_image_features(pixel_values=pixels)
                feats = out if isinstance(out, Tensor) else out.pooler_output
            else:
                out = self.model(pixel_values=pixels)
                pooled = getattr(out, "pooler_output", None)
                feats = pooled if pooled is not None else out.last_hidden_state[:, 0]
            chunks.append(feats.float())
        return torch.cat(chunks)

    def embed_video(self, videos: Tensor) -> Tensor:
        """Per-frame features of a batch of videos, memoized while caching.

        Args:
            videos: ``(B, T, 3, H, W)`` in ``[0, 1]``.

        Returns:
            ``(B, T, D)`` float32 features.
        """
        batch, frames = videos.shape[:2]
        return self.memoized(
            "video", videos, lambda: self.embed_images(videos.flatten(0, 1)).view(batch, frames, -1)
        )

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> Tensor:
        """Text features of prompts (each distinct prompt encoded once), memoized while caching.

        Args:
            prompts: ``B`` strings.

        Returns:
            ``(B, D)`` float32 features.

        Raises:
            TypeError: If the model has no text tower.
        """
        if not hasattr(self.model, "get_text_features"):
            raise TypeError(
                f"Backbone: {type(self.model).__name__} has no text tower (`get_text_features`); "
                "use a CLIP or SigLIP model for text-video alignment."
            )
        prompts = tuple(prompts)

        def compute() -> Tensor:
            unique = list(dict.fromkeys(prompts))
            max_length = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", None)
            tokens = self.tokenizer(
                unique, padding=self.text_padding, truncation=True, max_length=max_length, return_tensors="pt"
            )
            inputs = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
            out = self.model.get_text_features(**inputs)
            feats = (out if isinstance(out, Tensor) else out.pooler_output).float()
            position = {p: i for i, p in enumerate(unique)}
            return feats[torch.tensor([position[p] for p in prompts], device=feats.device)]

        return self.memoized("text", prompts, compute)


_SHARED: weakref.WeakValueDictionary[str, Backbone] = weakref.WeakValueDictionary()


def resolve_backbone(backbone: Backbone | str | os.PathLike) -> Backbone:
    """A :class:`Backbone` from an object or a path; one path gives one shared object.

    Args:
        backbone: a :class:`Backbone`, or a local model directory.

    Returns:
        The backbone; paths resolve to the same object while it is alive, so rewards configured
        with one path share the model (and its per-batch memo).

    Raises:
        FileNotFoundError: If a path is given that is not a directory.
    """
    if isinstance(backbone, Backbone):
        return backbone
    path = Path(backbone).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"Backbone path {str(backbone)!r} is not a directory; point it at a local model saved with "
            "`save_pretrained` (hub downloads are not made at run time)."
        )
    shared = _SHARED.get(str(path))
    if shared is None:
        shared = Backbone(str(path))
        _SHARED[str(path)] = shared
    return shared
