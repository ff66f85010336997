"""Prompts for GRPO: a list or a text file, served a few unique prompts per batch."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


def read_prompt_file(path: str | Path, setting: str = "data.prompt_file") -> list[str]:
    """Read one prompt per line; blank lines and lines starting with ``#`` are skipped.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not UTF-8 text, or holds no prompt.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"`{setting}` ({str(path)!r}) does not exist: point it at a text file with one prompt per line.")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"`{setting}` ({str(path)!r}) is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8 with one prompt per line."
        ) from err
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"`{setting}` ({str(path)!r}) holds no prompt: write one prompt per line.")
    return prompts


class PromptDataset(Dataset):
    """A list of prompts; item ``i`` is the ``i``-th prompt."""

    def __init__(self, prompts: Sequence[str]) -> None:
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> str:
        return self.prompts[index]


def collate_prompts(prompts: list[str]) -> dict[str, list[str]]:
    """Batch of prompts as ``{"prompts": [...]}``, what :class:`~sp_grpo.SelfPacedGRPO` expects."""
    return {"prompts": list(prompts)}


class PromptDataModule(L.LightningDataModule):
    """Serves ``batch_size`` unique prompts per training step (each sampled ``group_size`` times).

    Args:
        prompts: Training prompts; or use ``prompt_file``.
        prompt_file: Text file with one training prompt per line (``#`` starts a comment line).
        val_prompts: Validation prompts (fixed, evaluated in order); ``null`` for none.
        val_prompt_file: Text file of validation prompts.
        batch_size: Unique prompts per training step (``P``).
        shuffle: Shuffle the training prompts every epoch.
        seed: Seed of the shuffling.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        prompt_file: str | None = None,
        val_prompts: list[str] | None = None,
        val_prompt_file: str | None = None,
        batch_size: int = 2,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if (prompts is None) == (prompt_file is None):
            raise ValueError("Give exactly one of `data.prompts` (a list) and `data.prompt_file` (a path).")
        if batch_size < 1:
            raise ValueError(f"`data.batch_size` ({batch_size}) must be at least 1 (unique prompts per step).")
        self.train_prompts = list(prompts) if prompts is not None else read_prompt_file(prompt_file)
        if not self.train_prompts or not all(isinstance(p, str) and p.strip() for p in self.train_prompts):
            raise ValueError("`data.prompts` must be a non-empty list of non-empty strings.")
        if val_prompts is not None and val_prompt_file is not None:
            raise ValueError("Give at most one of `data.val_prompts` and `data.val_prompt_file`.")
        self.val_prompts = list(val_prompts) if val_prompts is not None else None
        if val_prompt_file is not None:
            self.val_prompts = read_prompt_file(val_prompt_file, "data.val_prompt_file")
        if batch_size > len(self.train_prompts):
            raise ValueError(
                f"`data.batch_size` ({batch_size}) is larger than the number of training prompts"
                f" ({len(self.train_prompts)}): lower it or add prompts."
            )
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            PromptDataset(self.train_prompts),
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            generator=generator,
            collate_fn=collate_prompts,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(PromptDataset(self.val_prompts or []), batch_size=self.batch_size, shuffle=False, collate_fn=collate_prompts)
