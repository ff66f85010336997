"""How many (sample, step) pairs the policy update pushes through the network at once.

The update accumulates gradients over micro-batches with each one's loss weighted by its share of
the minibatch, so the micro-batch size changes memory and speed, never the result. ``"auto"``
chooses it: the whole minibatch on a CPU (per-call overhead dominates small models there, and host
memory is rarely the limit at the sizes a CPU can train), and on a GPU the largest size whose
training step fits a memory budget, measured on the first update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import torch

MicroBatchSize = int | Literal["auto"]

#: Share of the budget a micro-batch may use: the measurement is of two small micro-batches, and
#: allocator fragmentation grows with the size.
_MARGIN = 0.9


def check_micro_batch_settings(size: MicroBatchSize, memory_gib: float | None) -> None:
    """Raise a ValueError naming the setting for a bad ``micro_batch_size`` or ``micro_batch_memory_gib``."""
    if size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(
            f"`model.micro_batch_size` ({size!r}) must be at least 1, or 'auto' (the whole minibatch on a CPU, the"
            " largest that fits `model.micro_batch_memory_gib` on a GPU)."
        )
    if memory_gib is not None and not memory_gib > 0:
        raise ValueError(f"`model.micro_batch_memory_gib` ({memory_gib}) must be positive, or null for the GPU's free memory.")


class MicroBatchSizer:
    """Splits a minibatch's pairs into micro-batch sizes, measuring the GPU memory per pair once.

    With ``"auto"`` on a CUDA device, the first minibatch large enough starts with two probe
    micro-batches of 1 and 2 pairs. The second (gradient buffers already exist by then) gives the
    peak memory per pair of a forward and backward pass; the size is then the budget over that,
    agreed across processes (every rank must run the same number of backward passes), and kept
    for the rest of the run. The probes are real micro-batches of the update, not extra work.

    Args:
        memory_gib: Budget of one micro-batch's forward and backward pass; ``None``: the memory free
            on the device when the probes are done (what the caching allocator holds unused
            counts as free), less what the optimizer will still allocate.
    """

    def __init__(self, memory_gib: float | None = None) -> None:
        self.memory_gib = memory_gib
        #: Pairs per micro-batch chosen on the GPU; ``None`` until measured.
        self.auto_size: int | None = None
        #: Measured peak bytes per pair, for logs and tests.
        self.bytes_per_pair: float | None = None

    def split(
        self,
        total: int,
        setting: MicroBatchSize,
        device: torch.device,
        *,
        pending_bytes: Callable[[], int] = lambda: 0,
        agree: Callable[[int], int] = lambda size: size,
    ) -> Iterator[int]:
        """Yield micro-batch sizes that sum to ``total``; the caller runs each before asking for the next.

        Args:
            total: Pairs in the minibatch.
            setting: ``model.micro_batch_size``: a number wins; ``"auto"`` as described above.
            device: Where the update runs.
            pending_bytes: Memory the first optimizer step will still allocate (its states); called
                only when the size is chosen.
            agree: Turns this rank's size into the size every rank uses (the minimum over ranks).
        """
        if setting != "auto":
            yield from _chunks(total, setting)
            return
        if device.type != "cuda":
            yield total
            return
        if self.auto_size is None and total >= 3:
            yield 1
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            yield 2
            torch.cuda.synchronize(device)
            self.bytes_per_pair = max(1.0, (torch.cuda.max_memory_allocated(device) - base) / 2)
            self.auto_size = agree(max(1, int(self._budget(device, pending_bytes) // self.bytes_per_pair)))
            total -= 3
        yield from _chunks(total, self.auto_size or total)

    def _budget(self, device: torch.device, pending_bytes: Callable[[], int]) -> float:
        if self.memory_gib is not None:
            return self.memory_gib * 2**30
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return max(0.0, _MARGIN * (free + cached) - pending_bytes())


def _chunks(total: int, size: int) -> Iterator[int]:
    while total > 0:
        yield min(size, total)
        total -= size


__all__ = ["MicroBatchSize", "MicroBatchSizer", "check_micro_batch_settings"]
