"""Checkpoint files that a kill cannot corrupt, loaded without unpickling code.

Lightning's default ``TorchCheckpointIO`` writes straight to the target path, so a process killed
mid-write leaves a truncated ``last.ckpt`` where a good one was. :class:`AtomicCheckpointIO` writes
to a temporary file in the same folder, flushes it to disk and renames it over the target: the
rename is atomic on POSIX file systems, so the target is always either the old or the new
checkpoint. It loads with ``torch.load(weights_only=True)``: a checkpoint holds tensors and plain
containers only, never objects whose unpickling could run code.

:func:`inspect_checkpoint` reads a checkpoint's step and checks that it fits a model *before* a run
starts, so a truncated, corrupt or foreign file fails with one line naming it, and the failed attempt
writes nothing (``OnExceptionCheckpoint`` would otherwise save the untrained model as
``on_exception.ckpt``, over the checkpoint of an earlier crash).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

# What Lightning puts beside the shards of a sharded (FSDP, DeepSpeed-like) checkpoint folder.
_SHARDED_METADATA = "meta.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: missing, unreadable, or written for another model."""


def _unreadable(path: str | os.PathLike, err: BaseException) -> CheckpointError:
    if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
        why = (
            "it holds pickled objects besides tensors and plain containers, which are never unpickled"
            " (they could run code)"
        )
    elif isinstance(err, pickle.UnpicklingError):
        why = "it is truncated, corrupt or not a torch file (unpickling failed)"
    else:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        why = f"it is truncated, corrupt or not a torch file ({first.split('. ')[0][:160]})"
    return CheckpointError(
        f"Checkpoint {str(path)!r} given as `--ckpt_path` cannot be read: {why}. Pass a checkpoint written by"
        " `sp-grpo fit` (e.g. `--ckpt_path last`), or leave `--ckpt_path` out to start fresh."
    )


def _load_file(path: Path, mmap: bool) -> Any:
    # mmap reads only the index (tensors stay on disk until touched); it needs torch's zip format.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:
        raise _unreadable(path, err) from err


def inspect_checkpoint(path: str | os.PathLike, model: torch.nn.Module | None = None) -> int:
    """The global step a checkpoint resumes from, after checking that it is a Lightning checkpoint for ``model``.

    Reads the file memory-mapped, so the tensors are not loaded. A sharded checkpoint (a folder) is
    checked through its ``meta.pt``; its shards are left to the strategy.

    Args:
        path: A checkpoint file, or a sharded checkpoint folder.
        model: When given (and loading is strict), the checkpoint's ``state_dict`` must have exactly
            the model's keys and shapes.

    Returns:
        The checkpoint's ``global_step``.

    Raises:
        CheckpointError: If the path does not exist, cannot be read, is not a Lightning checkpoint, or
            does not fit ``model``; the message names the file and ``--ckpt_path``.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / _SHARDED_METADATA).is_file():
            raise CheckpointError(
                f"Checkpoint folder {str(path)!r} given as `--ckpt_path` has no {_SHARDED_METADATA!r}, so it is not a"
                " sharded Lightning checkpoint: pass a checkpoint file or folder written by `sp-grpo fit`, or leave"
                " `--ckpt_path` out to start fresh."
            )
        checkpoint, model = _load_file(path / _SHARDED_METADATA, mmap=False), None  # the shards hold the weights
    elif path.is_file():
        checkpoint = _load_file(path, mmap=True)
    else:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} given as `--ckpt_path` does not exist: check the path, or leave `--ckpt_path`"
            " out to start fresh."
        )
    needed = ("global_step", "state_dict") if model is not None else ("global_step",)
    if not isinstance(checkpoint, Mapping) or any(key not in checkpoint for key in needed):
        found = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointError(
            f"Checkpoint {str(path)!r} given as `--ckpt_path` is not a Lightning training checkpoint: it has no"
            f" 'global_step'/'state_dict' (it has {found}). Pass a checkpoint written by `sp-grpo fit`, or leave"
            " `--ckpt_path` out to start fresh."
        )
    if model is not None and getattr(model, "strict_loading", True):
        _check_fits(path, checkpoint["state_dict"], model)
    return int(checkpoint["global_step"])


def _check_fits(path: Path, saved: Mapping[str, Any], model: torch.nn.Module) -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    reshaped = [
        f"{k} {tuple(saved[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & saved.keys())
        if hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or reshaped:
        problems = [f"{len(missing)} weights missing (e.g. {missing[0]})"] if missing else []
        problems += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
        problems += [f"{len(reshaped)} of another shape (e.g. {reshaped[0]})"] if reshaped else []
        raise CheckpointError(
            f"Checkpoint {str(path)!r} given as `--ckpt_path` was written for another model: {'; '.join(problems)}."
            f" Resume with the config that wrote it (same policy, LoRA rank and rewards), or leave `--ckpt_path` out"
            " to start fresh."
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Atomic saves (temporary file, fsync, rename) and ``weights_only`` loads.

    Use it as ``trainer.plugins: [sp_grpo.checkpoint.AtomicCheckpointIO]`` (the shipped configs do).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options (got {storage_options!r}).")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist: check `--ckpt_path`.")
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as err:
            raise _unreadable(path, err) from err


__all__ = ["AtomicCheckpointIO", "CheckpointError", "inspect_checkpoint"]
