"""Prompt data (and, in :mod:`sp_grpo.data.video`, video reading)."""

from sp_grpo.data.prompts import PromptDataModule, PromptDataset, collate_prompts, read_prompt_file

__all__ = ["PromptDataModule", "PromptDataset", "collate_prompts", "read_prompt_file"]
