"""Collectives across processes that the module and the callbacks share.

Lightning's ``all_gather`` stacks tensors of one shape. Ranks may hold different numbers of samples
(an uneven last batch), so :func:`all_gather_uneven` pads each rank's tensor to the longest and
cuts every part back to its own length. With one process, or outside a ``Trainer``, the gathers
return their input unchanged and call no collective. :func:`mix_seed` makes seeds that agree
across processes.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = ["all_gather_uneven", "min_over_ranks", "mix_seed", "world_size"]


class Gatherer(Protocol):
    """What the helpers need of a Lightning ``Strategy`` (``trainer.strategy``)."""

    def all_gather(self, tensor: Tensor) -> Tensor: ...


def all_gather_uneven(strategy: Gatherer | None, tensor: Tensor) -> list[Tensor]:
    """Every rank's ``tensor`` in rank order, the same list on every rank; the last dimension may differ.

    Two collectives: the lengths, then the tensors padded with zeros to the longest. Values are
    copied, never combined, so the parts equal what each rank holds bit for bit.

    Args:
        strategy: ``trainer.strategy``, or ``None`` outside a ``Trainer`` (one process).
        tensor: ``(..., N_r)`` this rank's values; every dimension but the last must agree across ranks.

    Returns:
        ``world_size`` tensors ``(..., N_r)``, one per rank; ``[tensor]`` itself with one process.

    Example:
        >>> all_gather_uneven(None, torch.arange(3.0))
        [tensor([0., 1., 2.])]
    """
    if world_size(strategy) == 1:
        return [tensor]
    sizes = strategy.all_gather(torch.tensor([tensor.shape[-1]], device=tensor.device)).reshape(-1).tolist()
    padded = torch.nn.functional.pad(tensor, (0, max(sizes) - tensor.shape[-1]))
    gathered = strategy.all_gather(padded)  # (world_size, ..., longest)
    return [gathered[rank, ..., :size] for rank, size in enumerate(sizes)]


def min_over_ranks(strategy: Gatherer | None, value: int, device: torch.device | str = "cpu") -> int:
    """The smallest ``value`` over all processes, e.g. a micro-batch size that every rank can run.

    Args:
        strategy: ``trainer.strategy``, or ``None`` outside a ``Trainer`` (one process).
        value: This rank's value.
        device: Where the collective's tensor lives (the module's device: NCCL gathers GPU tensors only).

    Returns:
        The minimum over the ranks; ``value`` itself with one process.
    """
    if world_size(strategy) == 1:
        return value
    return int(strategy.all_gather(torch.tensor(value, device=device)).min())


def world_size(strategy: Gatherer | None) -> int:
    """The number of processes, read as ``trainer.world_size`` does; 1 for ``None`` (no ``Trainer``)."""
    return 1 if strategy is None else getattr(strategy, "world_size", 1)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers, the same in every process (unlike ``hash`` of a tuple with strings).

    Example:
        >>> mix_seed(0, 3, 1) == mix_seed(0, 3, 1) != mix_seed(0, 3, 0)
        True
    """
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
