"""A Qwen2.5-VL (or Qwen2-VL) chat model as a video judge, in process, from a local folder.

Each head is one yes/no question about the video (visual quality, motion, text alignment with the
prompt). The score is P("Yes") read from the logits of the answer's first token, renormalized over
the yes and no tokens (:func:`~sp_grpo.functional.judges.yes_probability`): nothing is sampled or
parsed, so the score is smooth and deterministic. One forward pass scores every (video, question)
pair of a chunk. Read each head with :class:`~sp_grpo.rewards.JudgeReward`::

    judge = QwenVLJudge("/models/Qwen2.5-VL-7B-Instruct")
    rewards = RewardSet({
        "judge_vq": JudgeReward(judge, "VQ", aspect="fidelity"),
        "judge_mq": JudgeReward(judge, "MQ", aspect="temporal"),
        "judge_ta": JudgeReward(judge, "TA", aspect="semantic"),
    })

Judges built from the same folder and dtype share one loaded model (as backbones do), so a YAML
config that gives each :class:`~sp_grpo.rewards.JudgeReward` its own ``QwenVLJudge`` block still
loads the model once and, inside a :class:`~sp_grpo.rewards.RewardSet`, runs it once per batch.
"""

from __future__ import annotations

import inspect
import json
import os
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sp_grpo.functional.judges import (
    QWEN_VIDEO_MAX_PIXELS,
    QWEN_VIDEO_MIN_PIXELS,
    answer_spellings,
    patchify_video,
    resize_for_patches,
    video_frame_count,
    yes_probability,
)
from sp_grpo.rewards.backbones import FrozenModel
from sp_grpo.rewards.base import evenly_spaced_frames
from sp_grpo.rewards.judges import VideoJudge

__all__ = ["DEFAULT_QUESTIONS", "FrozenVLM", "QwenVLJudge", "answer_token_ids"]

DEFAULT_QUESTIONS: dict[str, str] = {
    "VQ": "Is this video of high visual quality: sharp, clean, well exposed and free of artifacts? Answer Yes or No.",
    "MQ": (
        "Is the motion in this video smooth and coherent over time, with objects keeping their shape? "
        "Answer Yes or No."
    ),
    "TA": 'Does this video show "{prompt}"? Answer Yes or No.',
}
"""Head -> question; ``{prompt}`` is replaced by the sample's prompt."""

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
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


_LOADED: weakref.WeakValueDictionary[tuple[str, str], FrozenVLM] = weakref.WeakValueDictionary()


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


def load_frozen_vlm(folder: str | os.PathLike, dtype: str = "auto") -> FrozenVLM:
    """Load a Qwen2.5-VL / Qwen2-VL chat model, its tokenizer and preprocessor settings from a folder.

    One folder and dtype give one shared object while it is alive. Nothing is downloaded
    (``local_files_only=True``).

    Args:
        folder: a local directory saved with ``save_pretrained`` (model, tokenizer, preprocessor).
        dtype: ``"auto"`` (bf16 when a bf16-capable GPU is present, else fp32), ``"float32"``,
            ``"bfloat16"`` or ``"float16"``.

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
    loaded = _LOADED.get(key)
    if loaded is None:
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model_class = _model_class(config.model_type)
        model = model_class.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        loaded = FrozenVLM(model, tokenizer, _read_video_preprocessor(path))
        _LOADED[key] = loaded
    return loaded


def _model_class(model_type: str) -> type:
    import transformers

    classes = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}
    if model_type not in classes:
        raise ValueError(f"QwenVLJudge: the folder holds a {model_type!r} model; expected one of {sorted(classes)}.")
    return getattr(transformers, classes[model_type])


class QwenVLJudge(VideoJudge):
    """Qwen2.5-VL asked one yes/no question per head; each head's score is P("Yes") in ``[0, 1]``.

    Frames are sampled evenly (first and last included), as many as ``num_frames`` rounded down to a
    multiple of the vision tower's temporal patch (:func:`~sp_grpo.functional.judges.video_frame_count`),
    resized within the video processor's pixel limits and patched as Qwen2-VL's video processor does
    (:func:`~sp_grpo.functional.judges.resize_for_patches`, :func:`~sp_grpo.functional.judges.patchify_video`),
    and shown in Qwen's chat format::

        <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<|vision_start|><|video_pad|>...
        <|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n

    The next token's logits give, summed over every one-token spelling of the yes and no words
    (``"Yes"``, ``" Yes"``, ``"yes"``, ``" yes"``: :func:`~sp_grpo.functional.judges.answer_spellings`),

    .. math:: s = \\frac{\\sum_{y \\in \\text{yes}} e^{\\ell_y}}{\\sum_{y \\in \\text{yes}} e^{\\ell_y}
        + \\sum_{n \\in \\text{no}} e^{\\ell_n}}.

    Sequences are left-padded and run ``batch_size`` (video, question) pairs at a time; the scores do
    not depend on how the batch is split.

    Args:
        model: a local Qwen2.5-VL / Qwen2-VL folder, or a :class:`FrozenVLM`.
        questions: head -> question; ``{prompt}`` is replaced by the sample's prompt. ``None`` uses
            :data:`DEFAULT_QUESTIONS` (``VQ`` visual quality, ``MQ`` motion, ``TA`` text alignment).
        num_frames: frames shown to the judge, evenly spaced; a multiple of the model's temporal patch
            size (2). A shorter video gives its frame count rounded down to that multiple.
        fps: the frame rate of the frames shown (sets the time between temporal positions; Qwen2.5-VL
            was trained on about 2 frames per second).
        min_pixels: the smallest frame area after resizing; ``None`` reads the folder's video
            processor config, else Qwen's video default ``128 * 28 * 28`` (the image processor's
            limits are not used for video).
        max_pixels: the largest frame area; ``None`` reads the video config, else ``768 * 28 * 28``.
            Lower it to make the judge cheaper: tokens per video are ``frames / 2 * area / 28**2``.
        system: the system message.
        yes_tokens: words meaning yes; each counts in every spelling that is one token.
        no_tokens: words meaning no.
        batch_size: (video, question) pairs per forward pass.
        dtype: ``"auto"`` (bf16 on a bf16-capable GPU, else fp32), ``"float32"``, ``"bfloat16"`` or
            ``"float16"``; used when ``model`` is a path.

    Raises:
        ValueError: On an empty question mapping, non-positive sizes, ``num_frames`` not a multiple of
            the temporal patch size, a yes/no word with no one-token spelling, a word that means both,
            video processor settings that contradict the model, or a tokenizer without Qwen's chat
            and vision tokens.
    """

    def __init__(
        self,
        model: str | os.PathLike | FrozenVLM,
        questions: Mapping[str, str] | None = None,
        *,
        num_frames: int = 8,
        fps: float = 2.0,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        system: str = "You are a helpful assistant.",
        yes_tokens: Sequence[str] = ("Yes",),
        no_tokens: Sequence[str] = ("No",),
        batch_size: int = 8,
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    ) -> None:
        super().__init__()
        questions = dict(DEFAULT_QUESTIONS if questions is None else questions)
        if not questions:
            raise ValueError(
                "QwenVLJudge: `questions` is empty; give head -> question, e.g. {'TA': 'Does this video show \"{prompt}\"?'}."
            )
        for name, value in (("num_frames", num_frames), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"QwenVLJudge: `{name}` ({value}) must be a positive integer.")
        if fps <= 0:
            raise ValueError(f"QwenVLJudge: `fps` ({fps}) must be positive, e.g. 2.0.")
        self.vlm = model if isinstance(model, FrozenVLM) else load_frozen_vlm(model, dtype)
        self.questions = questions
        self.heads = tuple(questions)
        self.num_frames, self.fps, self.system, self.batch_size = num_frames, float(fps), system, batch_size

        vision = self.vlm.model.config.vision_config
        self.patch_size, self.merge_size = int(vision.patch_size), int(vision.spatial_merge_size)
        self.temporal_patch_size = int(vision.temporal_patch_size)
        if num_frames % self.temporal_patch_size:
            raise ValueError(
                f"QwenVLJudge: `num_frames` ({num_frames}) must be a multiple of the model's temporal patch size "
                f"({self.temporal_patch_size}): the vision tower reads frames in groups of that size; set `num_frames` "
                f"to {max(self.temporal_patch_size, num_frames - num_frames % self.temporal_patch_size)}."
            )
        pre = self.vlm.preprocessor
        for key, value in (("patch_size", self.patch_size), ("merge_size", self.merge_size),
                           ("temporal_patch_size", self.temporal_patch_size)):
            if key in pre and int(pre[key]) != value:
                raise ValueError(
                    f"QwenVLJudge: the folder's video processor has {key}={pre[key]} but the model's vision tower "
                    f"{value}; the folder mixes two models."
                )
        size = pre.get("size") or {}
        self.min_pixels = int(min_pixels or pre.get("min_pixels") or size.get("shortest_edge") or QWEN_VIDEO_MIN_PIXELS)
        self.max_pixels = int(max_pixels or pre.get("max_pixels") or size.get("longest_edge") or QWEN_VIDEO_MAX_PIXELS)
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"QwenVLJudge: `min_pixels` ({self.min_pixels}) must not exceed `max_pixels` ({self.max_pixels})."
            )
        self.image_mean = tuple(pre.get("image_mean", _CLIP_MEAN))
        self.image_std = tuple(pre.get("image_std", _CLIP_STD))

        tokenizer = self.vlm.tokenizer
        self.yes_ids = answer_token_ids(tokenizer, yes_tokens, "yes_tokens")
        self.no_ids = answer_token_ids(tokenizer, no_tokens, "no_tokens")
        if both := set(self.yes_ids) & set(self.no_ids):
            raise ValueError(
                f"QwenVLJudge: token ids {sorted(both)} spell both a yes_tokens and a no_tokens word; keep the two lists apart."
            )
        for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"):
            if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
                raise ValueError(
                    f"QwenVLJudge: the tokenizer has no {token!r} token; load a Qwen2-VL or Qwen2.5-VL chat model folder."
                )
        self.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
        if self.video_token_id != self.vlm.model.config.video_token_id:
            raise ValueError(
                f"QwenVLJudge: the tokenizer's <|video_pad|> id ({self.video_token_id}) differs from the model's "
                f"`video_token_id` ({self.vlm.model.config.video_token_id}); the folder mixes two models."
            )
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.convert_tokens_to_ids("<|im_end|>")
        # Judges that share the model share its memo; this key keeps their questions apart.
        self._memo_kind = "judge" + repr(
            (sorted(questions.items()), num_frames, self.fps, self.min_pixels, self.max_pixels, system,
             self.yes_ids, self.no_ids)
        )

    def frame_indices(self, total: int) -> list[int]:
        """Evenly spaced frame indices out of ``total``, first and last included, a whole number of temporal patches."""
        return evenly_spaced_frames(total, video_frame_count(total, self.num_frames, self.temporal_patch_size))

    def video_inputs(self, videos: Tensor) -> list[tuple[Tensor, tuple[int, int, int]]]:
        """The vision tower's input for each video: sampled, resized, normalized and patched frames.

        Args:
            videos: ``(B, T, 3, H, W)`` in ``[0, 1]``.

        Returns:
            Per video, ``(patches, (grid_t, grid_h, grid_w))`` as :func:`~sp_grpo.functional.judges.patchify_video`.
        """
        frames = videos[:, self.frame_indices(videos.shape[1])].to(self.vlm.device)
        factor = self.patch_size * self.merge_size
        pixels = resize_for_patches(frames, factor, self.min_pixels, self.max_pixels, self.image_mean, self.image_std)
        return [patchify_video(v, self.patch_size, self.merge_size, self.temporal_patch_size) for v in pixels]

    def judge(self, videos: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        return self.vlm.memoized(self._memo_kind, (videos, tuple(prompts)), lambda: self._score(videos, prompts))

    def _score(self, videos: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        patched = self.video_inputs(videos)
        pairs = [(b, head) for b in range(len(prompts)) for head in self.heads]  # video-major
        scores = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            scores.append(self._forward(chunk, patched, prompts))
        return dict(zip(self.heads, torch.cat(scores).view(len(prompts), len(self.heads)).unbind(1)))

    def _token_ids(self, question: str, video_tokens: int) -> list[int]:
        text = (
            f"<|im_start|>system\n{self.system}<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|>{'<|video_pad|>' * video_tokens}<|vision_end|>"
            f"{question}<|im_end|>\n<|im_start|>assistant\n"
        )
        return self.vlm.tokenizer.encode(text, add_special_tokens=False)

    def _forward(
        self, chunk: list[tuple[int, str]], patched: list[tuple[Tensor, tuple[int, int, int]]], prompts: list[str]
    ) -> Tensor:
        device, merge = self.vlm.device, self.merge_size**2
        sequences = []
        for b, head in chunk:
            grid = patched[b][1]
            question = self.questions[head].replace("{prompt}", prompts[b])
            sequences.append(self._token_ids(question, grid[0] * grid[1] * grid[2] // merge))
        length = max(len(s) for s in sequences)
        # Left padding: the answer's first token is predicted at the last position of every row.
        input_ids = torch.tensor([[self.pad_id] * (length - len(s)) + s for s in sequences], device=device)
        attention_mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in sequences], device=device)
        inputs: dict[str, Any] = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values_videos=torch.cat([patched[b][0] for b, _ in chunk]).to(self.vlm.dtype),
            video_grid_thw=torch.tensor([patched[b][1] for b, _ in chunk], device=device),
            use_cache=False,
            logits_to_keep=1,
        )
        if self.vlm.takes_seconds:
            inputs["second_per_grid_ts"] = torch.full((len(chunk),), self.temporal_patch_size / self.fps, device=device)
        if self.vlm.takes_token_types:
            inputs["mm_token_type_ids"] = (input_ids == self.video_token_id).int() * 2  # 2 marks video tokens
        logits = self.vlm.model(**inputs).logits[:, -1]
        return yes_probability(logits, self.yes_ids, self.no_ids)
