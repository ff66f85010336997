"""VideoAlign's VideoReward as a judge: a Qwen2-VL with a linear reward head read at three reward tokens.

:func:`load_videoalign` builds it from VideoAlign's released checkpoint folder over a local Qwen2-VL
base folder; :class:`VideoAlignJudge` scores videos with its three heads (VQ, MQ, TA). The video is
shown as :class:`~sp_grpo.rewards.vlm_judge.QwenVideoChat` shows it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sp_grpo.rewards.vlm_judge import QwenVideoChat
from sp_grpo.rewards.vlm_loading import (  # one registry of loaded models for both judges
    _LOADED,
    FrozenVLM,
    _resolve_dtype,
    load_frozen_vlm,
)

__all__ = ["VIDEOALIGN_TOKENS", "VideoAlignJudge", "load_videoalign"]

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
