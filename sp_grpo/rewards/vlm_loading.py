"""Loading a Qwen2-VL / Qwen2.5-VL chat model from a local folder as a frozen judge, shared per folder.

:func:`load_frozen_vlm` reads the folder with ``local_files_only`` (nothing is downloaded) and keeps
one :class:`FrozenVLM` per folder and dtype, so several judges built from the same folder share one
model; :func:`answer_token_ids` finds the answer words' single-token spellings in its tokenizer.
"""

from __future__ import annotations

import inspect
import json
import os
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sp_grpo.functional.judges import (
    answer_spellings,
)
from sp_grpo.rewards.backbones import FrozenModel

__all__ = ["FrozenVLM", "answer_token_ids", "load_frozen_vlm"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FrozenVLM(FrozenModel):
    """A frozen ``transformers`` vision-language model and its tokenizer, shared by judges.

    Held outside the module tree (see :class:`~sp_grpo.rewards.backbones.FrozenModel`): its weights
    never enter the policy's checkpoint nor an optimizer.

    Args:
        model: the loaded model.
        tokenizer: its tokenizer.
        preprocessor: the folder's video preprocessor settings, possibly empty.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, preprocessor: Mapping[str, Any]) -> None:
        super().__init__()
        self._hold(model)
        self.tokenizer = tokenizer
        self.preprocessor = dict(preprocessor)
        parameters = inspect.signature(model.forward).parameters
        # Older transformers find video tokens by id; newer ones want the token types spelled out.
        self.takes_token_types = "mm_token_type_ids" in parameters
        # Qwen2.5-VL spaces temporal positions by time; Qwen2-VL has no such input.
        self.takes_seconds = "second_per_grid_ts" in parameters

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating-point dtype."""
        return next(self.model.parameters()).dtype


_LOADED: weakref.WeakValueDictionary[tuple[str, ...], FrozenVLM] = weakref.WeakValueDictionary()


def _read_video_preprocessor(folder: Path) -> dict[str, Any]:
    """The folder's video processor settings: nested in processor_config.json (transformers 5), or its own file.

    The image processor's preprocessor_config.json is not read: its pixel limits are for still images
    (Qwen2.5-VL's hub folder allows 12.8 M pixels per image), not for video frames.
    """
    nested = folder / "processor_config.json"
    if nested.is_file() and isinstance(video := json.loads(nested.read_text()).get("video_processor"), dict):
        return video
    if (folder / "video_preprocessor_config.json").is_file():
        return json.loads((folder / "video_preprocessor_config.json").read_text())
    return {}


def answer_token_ids(tokenizer: Any, words: Sequence[str], setting: str) -> list[int]:
    """Token ids of every spelling of ``words`` (:func:`~sp_grpo.functional.judges.answer_spellings`) that is one token.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        words: answer words, e.g. ``("Yes",)``.
        setting: the setting's name, for the error message.

    Returns:
        Distinct ids, in spelling order (spellings that encode to the same id count once).

    Raises:
        ValueError: If no spelling of a word is a single known token.
    """
    ids: dict[int, None] = {}
    for word in words:
        found = [
            encoded[0]
            for spelling in answer_spellings([word])
            if len(encoded := tokenizer.encode(spelling, add_special_tokens=False)) == 1
            and encoded[0] != tokenizer.unk_token_id
        ]
        if not found:
            encoded = tokenizer.encode(word, add_special_tokens=False)
            raise ValueError(
                f"QwenVLJudge: {setting} entry {word!r} is {len(encoded)} tokens {encoded}, and none of its spellings "
                f"{list(answer_spellings([word]))} is one known token; give a word the tokenizer has as one token."
            )
        ids.update(dict.fromkeys(found))
    return list(ids)


def _resolve_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":
        # bf16 where the hardware has it; fp32 on CPU (bf16 matmuls there are slow and less exact).
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"QwenVLJudge: `dtype` ({dtype!r}) must be one of {['auto', *_DTYPES]}.")
    return _DTYPES[dtype]


def load_frozen_vlm(folder: str | os.PathLike, dtype: str = "auto", shared: bool = True) -> FrozenVLM:
    """Load a Qwen2.5-VL / Qwen2-VL chat model, its tokenizer and preprocessor settings from a folder.

    One folder and dtype give one shared object while it is alive. Nothing is downloaded
    (``local_files_only=True``).

    Args:
        folder: a local directory saved with ``save_pretrained`` (model, tokenizer, preprocessor).
        dtype: ``"auto"`` (bf16 when a bf16-capable GPU is present, else fp32), ``"float32"``,
            ``"bfloat16"`` or ``"float16"``.
        shared: reuse (and register) the one object per folder and dtype; ``False`` loads a private
            copy for a caller that changes the model.

    Returns:
        The shared :class:`FrozenVLM`.

    Raises:
        FileNotFoundError: If ``folder`` is not a directory.
        ValueError: If the folder's model is not a Qwen2-VL or Qwen2.5-VL.
    """
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"QwenVLJudge: model path {str(folder)!r} is not a directory; point `model` at a local Qwen2.5-VL "
            "folder saved with `save_pretrained` (hub downloads are not made at run time)."
        )
    torch_dtype = _resolve_dtype(dtype)
    key = (str(path), str(torch_dtype))
    loaded = _LOADED.get(key) if shared else None
    if loaded is None:
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model_class = _model_class(config.model_type)
        model = model_class.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        loaded = FrozenVLM(model, tokenizer, _read_video_preprocessor(path))
        if shared:
            _LOADED[key] = loaded
    return loaded


def _model_class(model_type: str) -> type:
    import transformers

    classes = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}
    if model_type not in classes:
        raise ValueError(f"QwenVLJudge: the folder holds a {model_type!r} model; expected one of {sorted(classes)}.")
    return getattr(transformers, classes[model_type])
