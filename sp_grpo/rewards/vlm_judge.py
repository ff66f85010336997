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

:class:`~sp_grpo.rewards.videoalign.VideoAlignJudge` is VideoAlign's VideoReward (a Qwen2-VL with a linear reward head read at
three reward tokens), built from its released checkpoint folder and a local base model folder.
Both judges show the video the same way (:class:`QwenVideoChat`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from sp_grpo.functional.judges import (
    QWEN_VIDEO_MAX_PIXELS,
    QWEN_VIDEO_MIN_PIXELS,
    patchify_video,
    resize_for_patches,
    video_frame_count,
    yes_probability,
)
from sp_grpo.rewards.base import evenly_spaced_frames
from sp_grpo.rewards.judges import VideoJudge
from sp_grpo.rewards.vlm_loading import FrozenVLM, answer_token_ids, load_frozen_vlm

__all__ = [
    "DEFAULT_QUESTIONS",
    "FrozenVLM",
    "QwenVLJudge",
    "QwenVideoChat",
    "answer_token_ids",
    "load_frozen_vlm",
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
