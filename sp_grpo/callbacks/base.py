"""What the reward-weight callbacks share: the module contract, reading a step's outputs, the cross-rank gather.

The contract, which any LightningModule can follow:

* the module has a public attribute ``reward_weights: dict[str, float]`` (aspect -> weight), read at
  the start of each ``training_step``;
* ``training_step`` returns a dict with ``"aspect_rewards": dict[str, Tensor]`` (per aspect, the flat
  prompt-major rewards of the batch, shape ``(P*G,)``) and ``"group_size": int``, optionally
  ``"prompts": list[str]`` (length ``P*G``).

The callbacks (:class:`~sp_grpo.callbacks.SelfPacedCurriculum`,
:class:`~sp_grpo.callbacks.StaticWeights`, :class:`~sp_grpo.callbacks.GroupRewardWeighting`) write
``reward_weights`` in ``on_fit_start`` (the first batch's weights) and in ``on_train_batch_end`` (the
next batch's weights); :class:`~sp_grpo.callbacks.PromptDifficulty` reads the same outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from sp_grpo.distributed import all_gather_uneven
from sp_grpo.functional.aspects import ASPECTS
from sp_grpo.functional.curriculum import zero_spread_groups

__all__ = ["RewardWeightsCallback", "check_aspects", "gather_step", "graded_aspects", "read_step_outputs"]


def check_aspects(aspects: Sequence[str], setting: str) -> tuple[str, ...]:
    """The aspects in curriculum order, after checking that each is known and listed once.

    Raises:
        ValueError: If an aspect is unknown or repeated, or none is given; the message names ``setting``.
    """
    unknown = [a for a in aspects if a not in ASPECTS]
    if unknown:
        raise ValueError(f"`{setting}` has unknown aspects {unknown}; allowed: {list(ASPECTS)}.")
    if len(set(aspects)) != len(aspects):
        raise ValueError(f"`{setting}` ({list(aspects)}) lists an aspect twice; list each once.")
    if not aspects:
        raise ValueError(f"`{setting}` is empty; name at least one of {list(ASPECTS)}.")
    # Curriculum order, whatever order the user wrote.
    return tuple(a for a in ASPECTS if a in aspects)


def graded_aspects(pl_module: pl.LightningModule, aspects: Sequence[str], owner: str) -> set[str]:
    """Aspects of ``aspects`` whose rewards the module can tighten: ``pl_module.rewards.set_strictness(dict)``.

    Raises:
        AttributeError: If the module has no ``rewards`` with ``set_strictness`` and ``graded_aspects``.
        ValueError: If none of ``aspects`` has a graded reward.
    """
    rewards = getattr(pl_module, "rewards", None)
    if not callable(getattr(rewards, "set_strictness", None)) or not hasattr(rewards, "graded_aspects"):
        raise AttributeError(
            f"{owner} tightens rewards through `pl_module.rewards.set_strictness(dict)`, which "
            f"{type(pl_module).__name__} lacks: give the module a `rewards` RewardSet, or set `strictness_step: null`."
        )
    graded = set(rewards.graded_aspects) & set(aspects)
    if not graded:
        raise ValueError(
            f"{owner}: none of the aspects {list(aspects)} has a graded reward (`graded = True`, e.g. ShapesSemantic, "
            "ShapesFidelity, TextVideoAlignment with `margin`); use graded rewards or set `strictness_step: null`."
        )
    return graded


def read_step_outputs(
    outputs: Any, aspects: Sequence[str], owner: str
) -> tuple[Tensor, int, list[str] | None] | None:
    """Per-aspect rewards stacked ``(K, P*G)`` fp32 in the order of ``aspects``, the group size and the prompts.

    Args:
        outputs: What ``training_step`` returned; ``None`` for a skipped step.
        aspects: The aspects to read.
        owner: The callback's name, for error messages.

    Returns:
        ``None`` for a skipped step, else ``(rewards, group_size, prompts or None)``.

    Raises:
        KeyError: If the contract's keys or an aspect are missing.
    """
    if outputs is None:
        return None  # the step was skipped; nothing to learn from
    if not isinstance(outputs, Mapping) or "aspect_rewards" not in outputs or "group_size" not in outputs:
        keys = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
        raise KeyError(
            f"{owner} needs `training_step` to return a dict with 'aspect_rewards' "
            f"(dict aspect -> rewards (P*G,)) and 'group_size' (int); got {keys}. Add them to the returned dict."
        )
    aspect_rewards = outputs["aspect_rewards"]
    missing = [a for a in aspects if a not in aspect_rewards]
    if missing:
        raise KeyError(
            f"`aspect_rewards` lacks {missing}, which {owner} weighs; it has {sorted(aspect_rewards)}. "
            "Return rewards for every weighted aspect, or set the callback's `aspects`."
        )
    rewards = torch.stack([aspect_rewards[a].detach().reshape(-1).float() for a in aspects])
    prompts = outputs.get("prompts")
    return rewards, int(outputs["group_size"]), (list(prompts) if prompts is not None else None)


def gather_step(trainer: pl.Trainer, rewards: Tensor, prompts: list[str] | None) -> tuple[Tensor, list[str] | None]:
    """Rewards ``(K, N_total)`` and prompts of all ranks, in rank order; identical on every rank."""
    if trainer.world_size <= 1:
        return rewards, prompts
    # Ranks may hold different numbers of samples (uneven last batch): the module gathers the same way.
    rewards = torch.cat(all_gather_uneven(trainer.strategy, rewards), dim=1)
    if prompts is not None and dist.is_available() and dist.is_initialized():
        every: list[list[str] | None] = [None] * trainer.world_size
        dist.all_gather_object(every, prompts)
        prompts = [p for rank_prompts in every for p in rank_prompts]
    return rewards, prompts


class RewardWeightsCallback(Callback):
    """Shared plumbing of the callbacks that write ``reward_weights``: checks, reading outputs, counting flat groups.

    Args:
        zero_spread_eps: Group reward spread at or below which a group counts as teaching nothing.

    Raises:
        ValueError: If ``zero_spread_eps`` is negative.
    """

    def __init__(self, zero_spread_eps: float = 1e-6) -> None:
        if zero_spread_eps < 0:
            raise ValueError(f"`zero_spread_eps` ({zero_spread_eps}) must be non-negative.")
        self.zero_spread_eps = zero_spread_eps
        self.aspects: tuple[str, ...] | None = None

    def current_weights(self) -> dict[str, float]:
        """The weights the module should use for its next batch."""
        raise NotImplementedError(f"{type(self).__name__} must define `current_weights`.")

    def _check_module(self, pl_module: pl.LightningModule) -> None:
        if not isinstance(getattr(pl_module, "reward_weights", None), dict):
            raise AttributeError(
                f"{type(pl_module).__name__} has no `reward_weights` dict, which {type(self).__name__} writes: give the "
                "module a public attribute `reward_weights: dict[str, float]` (aspect -> weight) and read it in "
                "`training_step`."
            )

    def _write_weights(self, pl_module: pl.LightningModule) -> None:
        pl_module.reward_weights = dict(self.current_weights())

    def _gathered_step(
        self, trainer: pl.Trainer, outputs: Any, with_prompts: bool = True
    ) -> tuple[Tensor, int, list[str] | None] | None:
        """The step's rewards ``(K, N_total)`` on the CPU, group size and prompts of every rank; ``None`` if absent."""
        read = read_step_outputs(outputs, self.aspects, type(self).__name__)
        if read is None:
            return None
        rewards, group_size, prompts = read
        rewards, prompts = gather_step(trainer, rewards, prompts if with_prompts else None)
        return rewards.cpu(), group_size, prompts

    def _zero_spread_count(self, rewards: Tensor, group_size: int) -> int:
        weights = torch.tensor([self.current_weights()[a] for a in self.aspects])
        return int(zero_spread_groups(rewards.cpu(), group_size, weights, self.zero_spread_eps).sum())
