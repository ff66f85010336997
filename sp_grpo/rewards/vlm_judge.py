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

:class:`VideoAlignJudge` is VideoAlign's VideoReward (a Qwen2-VL with a linear reward head read at
three reward tokens), built from its released checkpoint folder and a local base model folder.
Both judges show the video the same way (:class:`QwenVideoChat`).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import weakref
from collections.abc import Collection, Mapping, Sequence
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

__all__ = [
    "DEFAULT_QUESTIONS",
    "VIDEOALIGN_TOKENS",
    "FrozenVLM",
    "QwenVLJudge",
    "QwenVideoChat",
    "VideoAlignJudge",
    "answer_token_ids",
    "load_frozen_vlm",
    "load_videoalign",
]

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


class QwenVideoChat(VideoJudge):
    """What every judge on a Qwen2-VL / Qwen2.5-VL chat model shares: its video input and chat prompt.

    Frames are sampled evenly (first and last included), as many as ``num_frames`` rounded down to a
    multiple of the vision tower's temporal patch (:func:`~sp_grpo.functional.judges.video_frame_count`),
    resized within the video processor's pixel limits and patched as Qwen2-VL's video processor does
    (:func:`~sp_grpo.functional.judges.resize_for_patches`, :func:`~sp_grpo.functional.judges.patchify_video`),
    and shown in Qwen's chat format::

        <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<|vision_start|><|video_pad|>...
        <|vision_end|>{text}<|im_end|>\\n<|im_start|>assistant\\n

    Subclasses score the model's output (:class:`QwenVLJudge`, :class:`VideoAlignJudge`).

    Args:
        vlm: the loaded model and tokenizer.
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
        batch_size: sequences per forward pass.

    Raises:
        ValueError: On non-positive sizes, ``num_frames`` not a multiple of the temporal patch size,
            video processor settings that contradict the model, or a tokenizer without Qwen's chat
            and vision tokens.
    """

    def __init__(
        self,
        vlm: FrozenVLM,
        *,
        num_frames: int,
        fps: float,
        min_pixels: int | None,
        max_pixels: int | None,
        system: str,
        batch_size: int,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for setting, value in (("num_frames", num_frames), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name}: `{setting}` ({value}) must be a positive integer.")
        if fps <= 0:
            raise ValueError(f"{name}: `fps` ({fps}) must be positive, e.g. 2.0.")
        self.vlm = vlm
        self.num_frames, self.fps, self.system, self.batch_size = num_frames, float(fps), system, batch_size

        vision = self.vlm.model.config.vision_config
        self.patch_size, self.merge_size = int(vision.patch_size), int(vision.spatial_merge_size)
        self.temporal_patch_size = int(vision.temporal_patch_size)
        if num_frames % self.temporal_patch_size:
            raise ValueError(
                f"{name}: `num_frames` ({num_frames}) must be a multiple of the model's temporal patch size "
                f"({self.temporal_patch_size}): the vision tower reads frames in groups of that size; set `num_frames` "
                f"to {max(self.temporal_patch_size, num_frames - num_frames % self.temporal_patch_size)}."
            )
        pre = self.vlm.preprocessor
        for key, value in (("patch_size", self.patch_size), ("merge_size", self.merge_size),
                           ("temporal_patch_size", self.temporal_patch_size)):
            if key in pre and int(pre[key]) != value:
                raise ValueError(
                    f"{name}: the folder's video processor has {key}={pre[key]} but the model's vision tower "
                    f"{value}; the folder mixes two models."
                )
        size = pre.get("size") or {}
        self.min_pixels = int(min_pixels or pre.get("min_pixels") or size.get("shortest_edge") or QWEN_VIDEO_MIN_PIXELS)
        self.max_pixels = int(max_pixels or pre.get("max_pixels") or size.get("longest_edge") or QWEN_VIDEO_MAX_PIXELS)
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"{name}: `min_pixels` ({self.min_pixels}) must not exceed `max_pixels` ({self.max_pixels})."
            )
        self.image_mean = tuple(pre.get("image_mean", _CLIP_MEAN))
        self.image_std = tuple(pre.get("image_std", _CLIP_STD))

        tokenizer = self.vlm.tokenizer
        for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"):
            if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
                raise ValueError(
                    f"{name}: the tokenizer has no {token!r} token; load a Qwen2-VL or Qwen2.5-VL chat model folder."
                )
        self.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
        if self.video_token_id != self.vlm.model.config.video_token_id:
            raise ValueError(
                f"{name}: the tokenizer's <|video_pad|> id ({self.video_token_id}) differs from the model's "
                f"`video_token_id` ({self.vlm.model.config.video_token_id}); the folder mixes two models."
            )
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.convert_tokens_to_ids("<|im_end|>")

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

    def chat_ids(self, text: str, grid: tuple[int, int, int]) -> list[int]:
        """Token ids of the chat prompt: the system message, the video of ``grid``, then ``text``."""
        pads = "<|video_pad|>" * (grid[0] * grid[1] * grid[2] // self.merge_size**2)
        prompt = (
            f"<|im_start|>system\n{self.system}<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|>{pads}<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"
        )
        return self.vlm.tokenizer.encode(prompt, add_special_tokens=False)

    def model_inputs(
        self, sequences: list[list[int]], videos: list[tuple[Tensor, tuple[int, int, int]]]
    ) -> dict[str, Any]:
        """The keyword arguments of one forward pass over ``sequences``, each with its video.

        Rows are left-padded, so every row's last position is its prompt's last token.
        """
        device, length = self.vlm.device, max(len(s) for s in sequences)
        input_ids = torch.tensor([[self.pad_id] * (length - len(s)) + s for s in sequences], device=device)
        attention_mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in sequences], device=device)
        inputs: dict[str, Any] = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values_videos=torch.cat([patches for patches, _ in videos]).to(self.vlm.dtype),
            video_grid_thw=torch.tensor([grid for _, grid in videos], device=device),
            use_cache=False,
        )
        if self.vlm.takes_seconds:
            seconds = self.temporal_patch_size / self.fps
            inputs["second_per_grid_ts"] = torch.full((len(videos),), seconds, device=device)
        if self.vlm.takes_token_types:
            inputs["mm_token_type_ids"] = (input_ids == self.video_token_id).int() * 2  # 2 marks video tokens
        return inputs


class QwenVLJudge(QwenVideoChat):
    """Qwen2.5-VL asked one yes/no question per head; each head's score is P("Yes") in ``[0, 1]``.

    The video is shown as :class:`QwenVideoChat` describes, followed by the question. The next
    token's logits give, summed over every one-token spelling of the yes and no words (``"Yes"``,
    ``" Yes"``, ``"yes"``, ``" yes"``: :func:`~sp_grpo.functional.judges.answer_spellings`),

    .. math:: s = \\frac{\\sum_{y \\in \\text{yes}} e^{\\ell_y}}{\\sum_{y \\in \\text{yes}} e^{\\ell_y}
        + \\sum_{n \\in \\text{no}} e^{\\ell_n}}.

    Sequences are left-padded and run ``batch_size`` (video, question) pairs at a time; the scores do
    not depend on how the batch is split.

    Args:
        model: a local Qwen2.5-VL / Qwen2-VL folder, or a :class:`FrozenVLM`.
        questions: head -> question; ``{prompt}`` is replaced by the sample's prompt. ``None`` uses
            :data:`DEFAULT_QUESTIONS` (``VQ`` visual quality, ``MQ`` motion, ``TA`` text alignment).
        num_frames: frames shown, see :class:`QwenVideoChat`.
        fps: their frame rate.
        min_pixels: the smallest frame area, ``None`` for the folder's video config or Qwen's default.
        max_pixels: the largest frame area, likewise.
        system: the system message.
        yes_tokens: words meaning yes; each counts in every spelling that is one token.
        no_tokens: words meaning no.
        batch_size: (video, question) pairs per forward pass.
        dtype: ``"auto"`` (bf16 on a bf16-capable GPU, else fp32), ``"float32"``, ``"bfloat16"`` or
            ``"float16"``; used when ``model`` is a path.

    Raises:
        ValueError: On an empty question mapping, a yes/no word with no one-token spelling, a word that
            means both, or what :class:`QwenVideoChat` refuses.
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
        questions = dict(DEFAULT_QUESTIONS if questions is None else questions)
        if not questions:
            raise ValueError(
                "QwenVLJudge: `questions` is empty; give head -> question, e.g. {'TA': 'Does this video show \"{prompt}\"?'}."
            )
        vlm = model if isinstance(model, FrozenVLM) else load_frozen_vlm(model, dtype)
        super().__init__(vlm, num_frames=num_frames, fps=fps, min_pixels=min_pixels, max_pixels=max_pixels,
                         system=system, batch_size=batch_size)
        self.questions = questions
        self.heads = tuple(questions)
        self.yes_ids = answer_token_ids(vlm.tokenizer, yes_tokens, "yes_tokens")
        self.no_ids = answer_token_ids(vlm.tokenizer, no_tokens, "no_tokens")
        if both := set(self.yes_ids) & set(self.no_ids):
            raise ValueError(
                f"QwenVLJudge: token ids {sorted(both)} spell both a yes_tokens and a no_tokens word; "
                "keep the two lists apart."
            )
        # Judges that share the model share its memo; this key keeps their questions apart.
        self._memo_kind = "judge" + repr(
            (sorted(questions.items()), num_frames, self.fps, self.min_pixels, self.max_pixels, system,
             self.yes_ids, self.no_ids)
        )

    def judge(self, videos: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        return self.vlm.memoized(self._memo_kind, (videos, tuple(prompts)), lambda: self._score(videos, prompts))

    def _score(self, videos: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        patched = self.video_inputs(videos)
        pairs = [(b, head) for b in range(len(prompts)) for head in self.heads]  # video-major
        scores = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            texts = [self.questions[head].replace("{prompt}", prompts[b]) for b, head in chunk]
            sequences = [self.chat_ids(text, patched[b][1]) for text, (b, _) in zip(texts, chunk)]
            inputs = self.model_inputs(sequences, [patched[b] for b, _ in chunk])
            logits = self.vlm.model(**inputs, logits_to_keep=1).logits[:, -1]
            scores.append(yes_probability(logits, self.yes_ids, self.no_ids))
        return dict(zip(self.heads, torch.cat(scores).view(len(prompts), len(self.heads)).unbind(1)))


VIDEOALIGN_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
"""VideoReward's reward tokens; the hidden state at each is read by its head (VQ, MQ, TA)."""


def _videoalign_name(name: str, known: Collection[str]) -> str | None:
    """A VideoReward parameter name as this transformers names it, or ``None`` for a PEFT copy to skip.

    VideoReward was trained under PEFT with transformers 4.45, which named the language model
    ``model.*`` and the vision tower ``visual.*``; transformers 5 nests them as ``model.language_model.*``
    and ``model.visual.*``.
    """
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
    if ".original_module." in name:
        return None
    if name in known or name.startswith("rm_head."):
        return name
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name.removeprefix("model.")
    return name


def _lora_deltas(adapter: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """Weight updates of a PEFT LoRA adapter, by (unconverted) weight name: :math:`\\Delta W = s\\,BA`.

    :math:`s = \\alpha / r` (:math:`\\alpha / \\sqrt r` with rsLoRA); embeddings store ``A`` and ``B``
    transposed, so their update is :math:`s\\,(BA)^\\top`.
    """
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(
            "VideoAlignJudge: the adapter uses per-module ranks (`rank_pattern`/`alpha_pattern`), which this loader "
            "does not merge."
        )
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    adapter = {key.replace(".default", ""): value for key, value in adapter.items()}
    deltas = {}
    for key, a in adapter.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            deltas[module + ".weight"] = scale * adapter[module + ".lora_B.weight"].float() @ a.float()
        elif key.endswith(".lora_embedding_A"):
            module = key.removesuffix(".lora_embedding_A")
            deltas[module + ".weight"] = scale * (adapter[module + ".lora_embedding_B"].float() @ a.float()).T
    return deltas


def load_videoalign(
    checkpoint: str | os.PathLike, base_model: str | os.PathLike, dtype: str = "auto", step: int | None = None
) -> tuple[FrozenVLM, dict[str, Any]]:
    """Build VideoAlign's VideoReward from its released folder and a local Qwen2-VL base folder.

    The released folder holds ``model_config.json`` and ``checkpoint-<step>/`` with either a whole
    ``model.pth`` or a PEFT LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``)
    plus ``non_lora_state_dict.pth`` (the trained parameters outside LoRA: ``rm_head``, the reward
    tokens' embeddings). The base model named in ``model_config.json`` (Qwen2-VL-2B-Instruct) gets the
    three :data:`VIDEOALIGN_TOKENS`, its embeddings resized to the tokenizer, the checkpoint's weights
    and the LoRA updates merged in, and a bias-free linear ``rm_head`` (hidden size -> ``output_dim``).

    Args:
        checkpoint: the VideoReward folder.
        base_model: a local folder of the base model named in its ``model_config.json``.
        dtype: as :func:`load_frozen_vlm`.
        step: which ``checkpoint-<step>``; ``None`` takes the highest.

    Returns:
        The model (``rm_head`` attached to it) with its tokenizer, and the parsed ``model_config.json``.

    Raises:
        FileNotFoundError: If a folder or file of that layout is missing.
        ValueError: If the checkpoint is not the three-token layout, or holds weights the model lacks.
    """
    folder = Path(checkpoint).expanduser()
    config_file = folder / "model_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"VideoAlignJudge: {str(config_file)!r} not found; `checkpoint` must be the VideoReward folder "
            "(model_config.json and checkpoint-<step>/)."
        )
    config = json.loads(config_file.read_text())
    model_config = config.get("model_config", {})
    if not model_config.get("use_special_tokens"):
        raise ValueError(
            "VideoAlignJudge: model_config.json has `use_special_tokens` false; only the released layout, a reward "
            f"read at the tokens {list(VIDEOALIGN_TOKENS)}, is supported."
        )
    steps = {int(p.name.split("-")[-1]): p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()}
    if not steps or (step is not None and step not in steps):
        raise FileNotFoundError(
            f"VideoAlignJudge: no checkpoint-{step if step is not None else '<step>'} in {str(folder)!r} "
            f"(found {sorted(steps)}); set `step` to one of them, or None for the highest."
        )
    weights_dir = steps[max(steps) if step is None else step]
    key = (str(weights_dir.resolve()), str(Path(base_model).expanduser().resolve()), str(_resolve_dtype(dtype)))
    if (loaded := _LOADED.get(key)) is not None:  # three YAML blocks for three heads load it once
        return loaded, config

    vlm = load_frozen_vlm(base_model, dtype, shared=False)
    model, tokenizer = vlm.model, vlm.tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": list(VIDEOALIGN_TOKENS)})
    model.resize_token_embeddings(len(tokenizer))
    text_config = getattr(model.config, "text_config", model.config)
    head = nn.Linear(text_config.hidden_size, int(model_config.get("output_dim", 1)), bias=False)
    model.rm_head = head.to(vlm.device, vlm.dtype).requires_grad_(False)

    if (weights_dir / "model.pth").is_file():
        saved, deltas = torch.load(weights_dir / "model.pth", map_location="cpu", weights_only=True), {}
    else:
        from safetensors.torch import load_file

        saved = torch.load(weights_dir / "non_lora_state_dict.pth", map_location="cpu", weights_only=True)
        adapter_config = json.loads((weights_dir / "adapter_config.json").read_text())
        deltas = _lora_deltas(load_file(weights_dir / "adapter_model.safetensors"), adapter_config)
    state = model.state_dict()
    unknown = []
    with torch.no_grad():
        for updates, add in ((saved, False), (deltas, True)):
            for saved_name, value in updates.items():
                name = _videoalign_name(saved_name, state)
                if name is None:
                    continue
                if name not in state or state[name].shape != value.shape:
                    unknown.append(f"{saved_name} {tuple(value.shape)}")
                    continue
                state[name].add_(value.to(state[name])) if add else state[name].copy_(value)
    if unknown:
        raise ValueError(
            f"VideoAlignJudge: {len(unknown)} checkpoint weights have no place in {str(base_model)!r}, "
            f"e.g. {unknown[:3]}; `base_model` must be the model named in model_config.json (`model_name_or_path`)."
        )
    if "rm_head.weight" not in {_videoalign_name(saved_name, state) for saved_name in saved}:
        raise ValueError(
            f"VideoAlignJudge: {str(weights_dir)!r} holds no `rm_head` weights; it is not a VideoReward checkpoint."
        )
    _LOADED[key] = vlm
    return vlm, config


class VideoAlignJudge(QwenVideoChat):
    """VideoAlign's VideoReward (Qwen2-VL-2B with a reward head) from local folders; heads ``VQ``, ``MQ``, ``TA``.

    One prompt per video holds the three :data:`VIDEOALIGN_TOKENS`; the last hidden state at each goes
    through the linear ``rm_head`` and gives that head's raw reward :math:`r`, then (``normalize``) the
    released statistics from ``model_config.json``'s ``inference_config``:

    .. math:: s_h = (r_h - \\mu_h) / \\sigma_h

    Scores are unbounded reals (higher is better), not probabilities. Weights come from
    :func:`load_videoalign`; nothing is downloaded.

    Args:
        checkpoint: the VideoReward folder (``model_config.json``, ``checkpoint-<step>/``).
        base_model: a local folder of its base model (Qwen2-VL-2B-Instruct).
        prompt_template: the text VideoReward was trained with, with ``{prompt}`` for the sample's
            prompt and each of the three reward tokens once (VideoAlign's ``detailed_special``
            template in its ``prompt_template.py``; not shipped here, copy it from there).
        step: which ``checkpoint-<step>``; ``None`` takes the highest.
        num_frames: frames shown, see :class:`QwenVideoChat`.
        fps: their frame rate.
        max_pixels: the largest frame area; ``None`` takes ``data_config.max_frame_pixels`` from
            ``model_config.json`` (what it was trained with).
        normalize: standardize each head with the released mean and std.
        batch_size: videos per forward pass.
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Raises:
        ValueError: If ``prompt_template`` lacks ``{prompt}`` or a reward token, or as :func:`load_videoalign`.
    """

    heads = ("VQ", "MQ", "TA")

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        base_model: str | os.PathLike,
        prompt_template: str,
        *,
        step: int | None = None,
        num_frames: int = 8,
        fps: float = 2.0,
        max_pixels: int | None = None,
        normalize: bool = True,
        batch_size: int = 4,
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    ) -> None:
        missing = [part for part in ("{prompt}", *VIDEOALIGN_TOKENS) if prompt_template.count(part) != 1]
        if missing:
            raise ValueError(
                f"VideoAlignJudge: `prompt_template` must hold each of {missing} exactly once; copy VideoAlign's "
                "`detailed_special` template (prompt_template.py) with its text prompt replaced by {prompt}."
            )
        vlm, config = load_videoalign(checkpoint, base_model, dtype, step)
        data = config.get("data_config", {})
        super().__init__(vlm, num_frames=num_frames, fps=fps, min_pixels=None,
                         max_pixels=max_pixels or data.get("max_frame_pixels"), system="You are a helpful assistant.",
                         batch_size=batch_size)
        self.prompt_template = prompt_template
        self.token_ids = [vlm.tokenizer.convert_tokens_to_ids(token) for token in VIDEOALIGN_TOKENS]
        stats = config.get("inference_config") or {}
        self.mean = torch.tensor([float(stats.get(f"{h}_mean", 0.0)) if normalize else 0.0 for h in self.heads])
        self.std = torch.tensor([float(stats.get(f"{h}_std", 1.0)) if normalize else 1.0 for h in self.heads])
        # Judges that share the model share its memo; this key keeps their settings apart.
        self._memo_kind = "videoalign" + repr((prompt_template, num_frames, self.fps, self.max_pixels, normalize))

    def judge(self, videos: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        return self.vlm.memoized(self._memo_kind, (videos, tuple(prompts)), lambda: self._score(videos, prompts))

    def _score(self, videos: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        patched = self.video_inputs(videos)
        rewards = []
        for start in range(0, len(prompts), self.batch_size):
            rows = range(start, min(start + self.batch_size, len(prompts)))
            texts = [self.prompt_template.replace("{prompt}", prompts[b]) for b in rows]
            sequences = [self.chat_ids(text, patched[b][1]) for text, b in zip(texts, rows)]
            inputs = self.model_inputs(sequences, [patched[b] for b in rows])
            hidden = self.vlm.model.model(**inputs).last_hidden_state
            # (rows, 3, D) at the three reward tokens, in VQ, MQ, TA order
            at_tokens = torch.stack([hidden[inputs["input_ids"] == token] for token in self.token_ids], dim=1)
            out = self.vlm.model.rm_head(at_tokens).float()  # fp32: the normalization below
            # output_dim 1: one reward per token; output_dim 3: token h reads output h
            rewards.append(out[..., 0] if out.shape[-1] == 1 else out.diagonal(dim1=1, dim2=2))
        scores = (torch.cat(rewards).cpu() - self.mean) / self.std
        return dict(zip(self.heads, scores.unbind(1)))
