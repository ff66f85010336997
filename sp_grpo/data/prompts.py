"""Prompts for GRPO: a list or a text file, served a few unique prompts per batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

#: A source of sampling weights: prompts -> one non-negative weight each, shape ``(len(prompts),)``.
PromptWeights = Callable[[Sequence[str]], Tensor]


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


class ResumablePromptSampler(DistributedSampler):
    """Prompt order that is a pure function of ``(seed, epoch)``, split over ranks, able to start mid-epoch.

    Lightning calls :meth:`set_epoch` before every epoch; a run resumed from a mid-epoch checkpoint
    calls :meth:`skip` once, so it serves exactly the prompts an uninterrupted run would have served
    next (a plain shuffled sampler restarts the epoch from its first batch). Each rank takes every
    ``world_size``-th index of the epoch's order, so ranks see disjoint prompts; it is a
    ``DistributedSampler``, so Lightning does not wrap it again.

    With ``weights`` (a function returning one non-negative weight per prompt, read once per epoch)
    an epoch is ``num_prompts`` draws with replacement in proportion to the weights, which is how
    difficulty-aware sampling spends more rollouts on prompts that still teach. Every rank draws the
    same sequence and keeps its own slice, so the weights must be identical on every rank (those of
    :class:`~sp_grpo.callbacks.PromptDifficulty` are: it gathers all ranks' groups).

    Args:
        num_prompts: Size of the prompt list.
        shuffle: Permute the prompts every epoch.
        seed: Seed of the permutations.
        rank: This process's rank.
        world_size: Number of processes.
        weights: Optional per-prompt sampling weights.

    Example:
        >>> sampler = ResumablePromptSampler(4, seed=0)
        >>> order = list(sampler)
        >>> sampler.skip(2)
        >>> list(sampler) == order[2:]
        True
    """

    def __init__(
        self,
        num_prompts: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        weights: Callable[[], Tensor] | None = None,
    ) -> None:
        super().__init__(range(num_prompts), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.num_prompts = num_prompts
        self.weights = weights
        self._skip = 0

    def skip(self, num_samples: int) -> None:
        """Leave out the first ``num_samples`` indices of this rank's next iteration only."""
        self._skip = num_samples

    def order(self, epoch: int) -> list[int]:
        """The full index order of ``epoch``, before the split over ranks."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.weights is not None:
            weights = self.weights().double()
            return torch.multinomial(weights, self.num_prompts, replacement=True, generator=generator).tolist()
        if not self.shuffle:
            return list(range(self.num_prompts))
        return torch.randperm(self.num_prompts, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        start, self._skip = self._skip, 0
        mine = self.order(self.epoch)[self.rank :: self.num_replicas][: len(self)]
        return iter(mine[start:])

    def __len__(self) -> int:
        return self.num_prompts // self.num_replicas


class _ResumableLoader(DataLoader):
    """The training loader of :class:`PromptDataModule`: it tells Lightning that it resumes mid-epoch.

    Lightning warns on a mid-epoch resume unless the loader has ``state_dict`` / ``load_state_dict``.
    The position itself comes from Lightning's restored loop counters
    (:meth:`PromptDataModule.train_dataloader` skips what was trained on), which stay exact however
    far a loader prefetched; the loader's state records what the order depends on, so a resumed run
    with other prompts or settings is told that it does not continue the same order.
    """

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        return {
            "num_prompts": sampler.num_prompts,
            "shuffle": sampler.shuffle,
            "seed": sampler.seed,
            "world_size": sampler.num_replicas,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        now = self.state_dict()
        changed = {key: (saved, now.get(key)) for key, saved in state_dict.items() if now.get(key) != saved}
        if changed:
            rank_zero_warn(
                f"PromptDataModule: resuming with other data settings than the checkpoint's ({{setting: (saved, now)}}"
                f" = {changed}); the rest of the epoch does not continue the interrupted order."
            )


def collate_prompts(prompts: list[str]) -> dict[str, list[str]]:
    """Batch of prompts as ``{"prompts": [...]}``, what :class:`~sp_grpo.SelfPacedGRPO` expects.

    Example:
        >>> collate_prompts(["a red square", "a blue circle"])
        {'prompts': ['a red square', 'a blue circle']}
    """
    return {"prompts": list(prompts)}


class PromptDataModule(L.LightningDataModule):
    """Serves ``batch_size`` unique prompts per training step (each sampled ``group_size`` times).

    Every training batch holds exactly ``batch_size`` prompts (an epoch drops the remainder, which
    changes with the shuffle), and a run resumed from a mid-epoch checkpoint continues with exactly
    the prompts an uninterrupted run would have served.

    Args:
        prompts: Training prompts; or use ``prompt_file``.
        prompt_file: Text file with one training prompt per line (``#`` starts a comment line).
        val_prompts: Validation prompts (fixed, evaluated in order); ``null`` for none.
        val_prompt_file: Text file of validation prompts.
        batch_size: Unique prompts per training step (``P``).
        shuffle: Shuffle the training prompts every epoch.
        seed: Seed of the shuffling.
        difficulty_sampling: Draw training prompts in proportion to per-prompt weights, read once
            per epoch: those of the :class:`~sp_grpo.callbacks.PromptDifficulty` callback, which links
            itself to this data module in its ``setup`` (or any source given to
            :meth:`set_prompt_weights`). Prompts whose groups all score the same, mastered or hopeless,
            are drawn less. A run resumed mid-epoch then redraws the rest of that epoch from the
            weights at resume time.
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
        difficulty_sampling: bool = False,
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
        self.difficulty_sampling = difficulty_sampling
        self.prompt_weights: PromptWeights | None = None

    def set_prompt_weights(self, weights: PromptWeights | None) -> None:
        """Link the source of the sampling weights that ``difficulty_sampling`` draws with.

        :class:`~sp_grpo.callbacks.PromptDifficulty` calls this in its ``setup`` with its
        :meth:`~sp_grpo.callbacks.PromptDifficulty.weights_for`, and with ``None`` in its ``teardown``.

        Args:
            weights: Prompts -> ``(len(prompts),)`` non-negative weights, called once per epoch with
                the training prompts; ``None`` unlinks.

        Raises:
            ValueError: If another source is linked already (two trackers would fight over the draw).
        """
        if weights is not None and self.prompt_weights is not None and weights != self.prompt_weights:
            raise ValueError(
                "PromptDataModule already draws with the prompt weights of another source: keep one "
                "sp_grpo.callbacks.PromptDifficulty in `trainer.callbacks`."
            )
        self.prompt_weights = weights

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if len(self.train_prompts) // world_size < self.batch_size:
            raise ValueError(
                f"{len(self.train_prompts)} training prompts over {world_size} processes leave fewer than `data.batch_size`"
                f" ({self.batch_size}) per process: add prompts or lower `data.batch_size`."
            )
        sampler = ResumablePromptSampler(
            len(self.train_prompts), self.shuffle, self.seed, rank, world_size, self._difficulty_weights(trainer)
        )
        if trainer is not None:
            # Resuming mid-epoch: Lightning has restored its loop counters before asking for data;
            # skip the batches of this epoch that the checkpointed run already trained on.
            loop = trainer.fit_loop
            # `processed` counts the batches whose training step finished, whether the checkpoint was
            # written at the end of a batch (before `completed` moves) or on an exception after it.
            done = loop.epoch_loop.batch_progress.current.processed
            if done and done < len(sampler) // self.batch_size:
                sampler.set_epoch(loop.epoch_progress.current.processed)
                sampler.skip(done * self.batch_size)
        return _ResumableLoader(
            PromptDataset(self.train_prompts),
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate_prompts,
            drop_last=True,  # every step sees `batch_size` prompts; the remainder rotates with the shuffle
        )

    def _difficulty_weights(self, trainer) -> Callable[[], Tensor] | None:
        if not self.difficulty_sampling:
            return None
        source = self.prompt_weights
        if source is None:
            raise ValueError(
                "`data.difficulty_sampling` needs per-prompt weights, and none are linked: add"
                " sp_grpo.callbacks.PromptDifficulty to `trainer.callbacks` (it links itself to the data module"
                " in `setup`), or call `datamodule.set_prompt_weights(...)`; or set `data.difficulty_sampling: false`."
            )
        return lambda: source(self.train_prompts)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_prompts:
            return []  # no validation loop
        return DataLoader(PromptDataset(self.val_prompts), batch_size=self.batch_size, shuffle=False, collate_fn=collate_prompts)
