"""Prompt data for training, and video reading/writing (decord, PyAV) for rewards and ``score``."""

from sp_grpo.data.prompts import PromptDataModule, PromptDataset, collate_prompts, read_prompt_file
from sp_grpo.data.video import VideoDecodeError, VideoFolder, read_video, write_video

__all__ = [
    "PromptDataModule",
    "PromptDataset",
    "VideoDecodeError",
    "VideoFolder",
    "collate_prompts",
    "read_prompt_file",
    "read_video",
    "write_video",
]
