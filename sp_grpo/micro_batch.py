"""How many (sample, step) pairs the policy update pushes through the network at once.

The update accumulates gradients over micro-batches with each one's loss weighted by its share of
the minibatch, so the micro-batch size changes memory and speed, never the result. ``"auto"``
takes the whole minibatch when it fits a memory budget, and otherwise the largest size that does,
split evenly:

* on a CPU the budget is of the activations saved for backward, 0.25 GiB unless stated: measured
  on the shapes model (3.5 MiB per pair), 64 pairs per pass ran about 10 % faster than the whole
  minibatch of 256 (0.9 GiB), which spills out of the caches; the tiny Wan's whole minibatch (48
  pairs, 4 MiB) was fastest, 2.8x faster than 8 pairs (``benchmarks/hot_path.py``). It is
  measured by two small probe forwards (1 and 2 pairs, no backward) on the first update.
* on a GPU the budget is of the peak memory of a forward and backward pass, the free memory unless
  stated, measured on the first update's first two micro-batches (1 and 2 pairs, real work).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch

MicroBatchSize = int | Literal["auto"]

#: Share of a GPU's free memory a micro-batch may use: the measurement is of two small micro-batches,
#: and allocator fragmentation grows with the size.
_MARGIN = 0.9
#: Default budget of the activations one micro-batch saves for backward on a CPU (see above).
CPU_BUDGET_GIB = 0.25


def check_micro_batch_settings(size: MicroBatchSize, memory_gib: float | None) -> None:
    """Raise a ValueError naming the setting for a bad ``micro_batch_size`` or ``micro_batch_memory_gib``."""
    if size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(
            f"`model.micro_batch_size` ({size!r}) must be at least 1, or 'auto' (the whole minibatch, or the"
            " largest part of it that fits `model.micro_batch_memory_gib`)."
        )
    if memory_gib is not None and not memory_gib > 0:
        raise ValueError(f"`model.micro_batch_memory_gib` ({memory_gib}) must be positive, or null for the default (0.25 GiB of saved activations on a CPU, the free memory on a GPU).")


class MicroBatchSizer:
    """Splits a minibatch's pairs into micro-batch sizes; with ``"auto"`` measures memory per pair once.

    The size chosen is agreed across processes (every rank must run the same number of backward
    passes) and kept for the rest of the run.

    Args:
        memory_gib: The budget (see the module docstring); ``None``: 0.25 GiB of saved activations on
            a CPU, the free memory on a GPU.
    """

    def __init__(self, memory_gib: float | None = None) -> None:
        self.memory_gib = memory_gib
        #: Pairs per micro-batch chosen by ``"auto"``; ``None`` until measured.
        self.auto_size: int | None = None
        #: Measured bytes per pair, for logs and tests.
        self.bytes_per_pair: float | None = None

    def split(
        self,
        total: int,
        setting: MicroBatchSize,
        device: torch.device,
        *,
        probe: Callable[[int], object] = lambda pairs: None,
        pending_bytes: Callable[[], int] = lambda: 0,
        agree: Callable[[int], int] = lambda size: size,
    ) -> Iterator[int]:
        """Yield micro-batch sizes that sum to ``total``; the caller runs each before asking for the next.

        Args:
            total: Pairs in the minibatch.
            setting: ``model.micro_batch_size``: a number wins (chunks of that size, the last one
                smaller); ``"auto"`` as described in the module docstring.
            device: Where the update runs.
            probe: On a CPU, runs the forward pass (with grad, no backward) of the first ``n``
                pairs; called twice on the first update.
            pending_bytes: Memory the first optimizer step will still allocate (its states); called
                only when the size is chosen on a GPU.
            agree: Turns this rank's size into the size every rank uses (the minimum over ranks).
        """
        if setting != "auto":
            yield from _chunks(total, setting)
            return
        if self.auto_size is None and total >= 3:
            if device.type == "cuda":
                yield 1  # allocates the gradients, so the next one measures activations only
                torch.cuda.synchronize(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                yield 2
                torch.cuda.synchronize(device)
                self.bytes_per_pair = max(1.0, (torch.cuda.max_memory_allocated(device) - base) / 2)
                budget = self.memory_gib * 2**30 if self.memory_gib is not None else _free_gpu_bytes(device) - pending_bytes()
                total -= 3
            else:
                one, two = _saved_bytes(probe, 1), _saved_bytes(probe, 2)
                self.bytes_per_pair = max(1.0, float(two - one))
                budget = (self.memory_gib if self.memory_gib is not None else CPU_BUDGET_GIB) * 2**30
            self.auto_size = agree(max(1, int(budget // self.bytes_per_pair)))
        yield from _even_chunks(total, self.auto_size or total)

def _chunks(total: int, size: int) -> Iterator[int]:
    while total > 0:
        yield min(size, total)
        total -= size


def _even_chunks(total: int, most: int) -> Iterator[int]:
    """As few chunks of at most ``most`` as possible, their sizes differing by at most 1."""
    if total <= 0:
        return
    count = math.ceil(total / most)
    for i in range(count):
        yield total // count + (1 if i < total % count else 0)


def _free_gpu_bytes(device: torch.device) -> float:
    """What the GPU has free, counting what the caching allocator holds unused, less a margin."""
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return _MARGIN * (free + cached)


def _saved_bytes(probe: Callable[[int], object], pairs: int) -> int:
    """Bytes of the tensors the forward pass of ``pairs`` pairs saves for backward (each storage once)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        probe(pairs)
    return sum(storages.values())


__all__ = ["CPU_BUDGET_GIB", "MicroBatchSize", "MicroBatchSizer", "check_micro_batch_settings"]
