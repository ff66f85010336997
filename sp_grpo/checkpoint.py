"""Checkpoint files that a kill cannot corrupt, loaded without unpickling code.

Lightning's default ``TorchCheckpointIO`` writes straight to the target path, so a process killed
mid-write leaves a truncated ``last.ckpt`` where a good one was. :class:`AtomicCheckpointIO` writes
to a temporary file in the same folder, flushes it to disk and renames it over the target: the
rename is atomic on POSIX file systems, so the target is always either the old or the new
checkpoint. It loads with ``torch.load(weights_only=True)``: a checkpoint holds tensors and plain
containers only, never objects whose unpickling could run code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


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
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


__all__ = ["AtomicCheckpointIO"]
