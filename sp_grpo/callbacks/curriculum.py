"""Callbacks that set a LightningModule's reward weights: the self-paced curriculum and a fixed baseline.

The contract, which any LightningModule can follow:

* the module has a public attribute ``reward_weights: dict[str, float]`` (aspect -> weight), read at
  the start of each ``training_step``;
* ``training_step`` returns a dict with ``"aspect_rewards": dict[str, Tensor]`` (per aspect, the flat
  prompt-major rewards of the batch, shape ``(P*G,)``) and ``"group_size": int``, optionally
  ``"prompts": list[str]`` (length ``P*G``).

The callbacks write ``reward_weights`` in ``on_fit_start`` (the first batch's weights) and in
``on_train_batch_end`` (the next batch's weights). The maths lives in
:mod:`sp_grpo.functional.curriculum`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from sp_grpo.callbacks.plot import plot_curriculum
from sp_grpo.callbacks.prompt_difficulty import PromptDifficulty
from sp_grpo.functional.curriculum import (
    ASPECTS,
    GATES,
    CompetenceState,
    GateName,
    competence,
    ratchet,
    stage_index,
    stage_weights,
    unlock_progress,
    update_competence,
    zero_spread_groups,
)


def _check_aspects(aspects: Sequence[str], setting: str) -> tuple[str, ...]:
    unknown = [a for a in aspects if a not in ASPECTS]
    if unknown:
        raise ValueError(f"`{setting}` has unknown aspects {unknown}; allowed: {list(ASPECTS)}.")
    if len(set(aspects)) != len(aspects):
        raise ValueError(f"`{setting}` ({list(aspects)}) lists an aspect twice; list each once.")
    if not aspects:
        raise ValueError(f"`{setting}` is empty; name at least one of {list(ASPECTS)}.")
    # Curriculum order, whatever order the user wrote.
    return tuple(a for a in ASPECTS if a in aspects)


class _RewardWeightsCallback(Callback):
    """Shared plumbing: read the step outputs, gather them across ranks, write and log weights."""

    def __init__(self, zero_spread_eps: float = 1e-6) -> None:
        if zero_spread_eps < 0:
            raise ValueError(f"`zero_spread_eps` ({zero_spread_eps}) must be non-negative.")
        self.zero_spread_eps = zero_spread_eps
        self.aspects: tuple[str, ...] | None = None

    def current_weights(self) -> dict[str, float]:
        """The weights the module should use for its next batch."""
        raise NotImplementedError

    def _check_module(self, pl_module: pl.LightningModule) -> None:
        if not isinstance(getattr(pl_module, "reward_weights", None), dict):
            raise AttributeError(
                f"{type(pl_module).__name__} has no `reward_weights` dict, which {type(self).__name__} writes: give the "
                "module a public attribute `reward_weights: dict[str, float]` (aspect -> weight) and read it in "
                "`training_step`."
            )

    def _write_weights(self, pl_module: pl.LightningModule) -> None:
        pl_module.reward_weights = dict(self.current_weights())

    def _read_outputs(self, outputs: Any) -> tuple[Tensor, int, list[str] | None] | None:
        """Per-aspect rewards stacked ``(K, P*G)`` in curriculum order, the group size and the prompts."""
        if outputs is None:
            return None  # the step was skipped; nothing to learn from
        if not isinstance(outputs, Mapping) or "aspect_rewards" not in outputs or "group_size" not in outputs:
            keys = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise KeyError(
                f"{type(self).__name__} needs `training_step` to return a dict with 'aspect_rewards' "
                f"(dict aspect -> rewards (P*G,)) and 'group_size' (int); got {keys}. Add them to the returned dict."
            )
        aspect_rewards = outputs["aspect_rewards"]
        missing = [a for a in self.aspects if a not in aspect_rewards]
        if missing:
            raise KeyError(
                f"`aspect_rewards` lacks {missing}, which {type(self).__name__} weighs; it has {sorted(aspect_rewards)}. "
                "Return rewards for every weighted aspect, or set the callback's `aspects`."
            )
        rewards = torch.stack([aspect_rewards[a].detach().reshape(-1).float() for a in self.aspects])
        prompts = outputs.get("prompts")
        return rewards, int(outputs["group_size"]), (list(prompts) if prompts is not None else None)

    @staticmethod
    def _gather(
        trainer: pl.Trainer, rewards: Tensor, prompts: list[str] | None
    ) -> tuple[Tensor, list[str] | None]:
        """Rewards ``(K, N_total)`` and prompts of all ranks, in rank order; identical on every rank."""
        if trainer.world_size <= 1:
            return rewards, prompts
        # Ranks may hold different numbers of samples (uneven last batch): pad to the largest, then cut.
        sizes = trainer.strategy.all_gather(torch.tensor([rewards.shape[1]], device=rewards.device)).reshape(-1)
        longest = int(sizes.max())
        padded = torch.nn.functional.pad(rewards, (0, longest - rewards.shape[1]))
        gathered = trainer.strategy.all_gather(padded)  # (W, K, longest)
        rewards = torch.cat([gathered[r, :, : int(n)] for r, n in enumerate(sizes.tolist())], dim=1)
        if prompts is not None and dist.is_available() and dist.is_initialized():
            every: list[list[str] | None] = [None] * trainer.world_size
            dist.all_gather_object(every, prompts)
            prompts = [p for rank_prompts in every for p in rank_prompts]
        return rewards, prompts

    def _zero_spread_count(self, rewards: Tensor, group_size: int) -> int:
        weights = torch.tensor([self.current_weights()[a] for a in self.aspects])
        return int(zero_spread_groups(rewards.cpu(), group_size, weights, self.zero_spread_eps).sum())


class StaticWeights(_RewardWeightsCallback):
    """Fixed reward weights: the baseline with the same contract as :class:`SelfPacedCurriculum`.

    The weights are normalised to sum to 1, so ``{"fidelity": 2, "temporal": 1, "semantic": 1}`` and
    ``{"fidelity": 0.5, "temporal": 0.25, "semantic": 0.25}`` train identically and compare with the
    curriculum on one scale. Logs ``curriculum/weight_<aspect>`` and ``curriculum/zero_std_groups``.

    Args:
        weights: Aspect -> non-negative weight; aspects from ``fidelity``, ``temporal``, ``semantic``;
            normalised to sum 1.
        zero_spread_eps: Group reward spread at or below which a group counts as teaching nothing.

    Raises:
        ValueError: If an aspect is unknown, a weight negative or the weights sum to 0.

    Example:
        >>> StaticWeights({"fidelity": 2.0, "semantic": 2.0}).current_weights()
        {'fidelity': 0.5, 'semantic': 0.5}
    """

    def __init__(self, weights: dict[str, float], zero_spread_eps: float = 1e-6) -> None:
        super().__init__(zero_spread_eps)
        self.aspects = _check_aspects(list(weights), "weights")
        negative = {a: w for a, w in weights.items() if w < 0}
        if negative:
            raise ValueError(f"`weights` must be non-negative, got {negative}; set them to 0 or more.")
        total = float(sum(weights.values()))
        if total <= 0:
            raise ValueError(f"`weights` ({dict(weights)}) sum to {total}; give at least one aspect a positive weight.")
        self.weights = {a: float(weights[a]) / total for a in self.aspects}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(aspects=self.aspects)

    def current_weights(self) -> dict[str, float]:
        return dict(self.weights)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_module(pl_module)
        self._write_weights(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        read = self._read_outputs(outputs)
        metrics = {f"curriculum/weight_{a}": w for a, w in self.weights.items()}
        if read is not None:
            rewards, group_size, _ = read
            rewards, _ = self._gather(trainer, rewards, None)
            metrics["curriculum/zero_std_groups"] = float(self._zero_spread_count(rewards, group_size))
        # The module might have changed its weights; the baseline keeps them fixed.
        self._write_weights(pl_module)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The configured weights win (one place for each setting); a change is worth a warning.
        if state_dict.get("weights") != self.weights:
            warnings.warn(
                f"StaticWeights: the checkpoint has weights {state_dict.get('weights')} but the callback is configured "
                f"with {self.weights}; continuing with the configured weights.",
                stacklevel=2,
            )


class SelfPacedCurriculum(_RewardWeightsCallback):
    """Self-paced reward curriculum: shifts weight fidelity -> temporal -> semantic as competence grows.

    After every training batch it gathers the per-aspect rewards of all ranks, updates each aspect's
    competence (:func:`~sp_grpo.functional.curriculum.update_competence`,
    :func:`~sp_grpo.functional.curriculum.competence`), unlocks later aspects through smooth gates
    (:func:`~sp_grpo.functional.curriculum.unlock_progress`, never going back when ``monotone``) and
    writes the next batch's weights (:func:`~sp_grpo.functional.curriculum.stage_weights`) to
    ``pl_module.reward_weights``. Every rank computes the same weights from the same gathered rewards.

    Logs each step ``curriculum/weight_<aspect>``, ``curriculum/competence_<aspect>``,
    ``curriculum/level_<aspect>``, ``curriculum/stage``, ``curriculum/progress`` and
    ``curriculum/zero_std_groups``; at the end of fit, rank 0 writes ``plot_filename`` (weights and
    competence over steps) into the log folder. History and statistics are saved in checkpoints, so a
    resumed run continues exactly and plots the whole run.

    To change how competence or progress is computed, subclass and override
    :meth:`compute_competence` or :meth:`compute_progress`.

    Pace: with the defaults, the next aspect unlocks after about 85 steps when the current aspect's
    mean reward rises steadily by 1/100 of its starting std per step (about 50 steps at 2/100,
    115 at 0.5/100), warm-up included. Lower ``target_gain`` (or ``threshold``) for a faster
    curriculum, raise it for a slower one; ``warmup_steps`` and ``decay`` trade noise for delay.

    Args:
        aspects: Aspects to schedule, from ``fidelity``, ``temporal``, ``semantic`` (put in that order);
            ``None`` takes the keys of ``pl_module.reward_weights`` at fit start.
        decay: EMA factor in [0, 1) of the competence statistics; ~1/(1-decay) batches are averaged.
        warmup_steps: Batches that calibrate each aspect's starting level and spread before competence can grow.
        target_gain: Rise of the mean reward, in units of its starting std, that counts as mastering an aspect.
        stall_slope: Rise per step, in starting stds, below which a shrinking spread counts as saturation.
        gate: Shape of the transition between aspects: ``"sigmoid"`` or ``"smoothstep"``.
        threshold: Competence in (0, 1) of an aspect at which the next aspect is half unlocked.
        width: Competence range over which the transition happens.
        floor: Weight in [0, 1/K) that each passed aspect keeps, so it is not forgotten.
        monotone: Never move back to an earlier stage when competence dips.
        zero_spread_eps: Group reward spread at or below which a group counts as teaching nothing.
        track_prompts: Keep per-prompt difficulty statistics (``self.prompt_difficulty``) from the step's ``prompts``.
        prompt_decay: EMA factor in [0, 1) of the per-prompt statistics.
        prompt_min_weight: Sampling weight in (0, 1] of prompts whose groups are always flat (mastered or hopeless).
        plot_filename: PNG written into the log folder at the end of fit; ``None`` writes no plot.

    Raises:
        ValueError: If a setting is out of range; the message names the allowed values.
    """

    def __init__(
        self,
        aspects: list[str] | None = None,
        decay: float = 0.9,
        warmup_steps: int = 20,
        target_gain: float = 1.0,
        stall_slope: float = 0.01,
        gate: GateName = "sigmoid",
        threshold: float = 0.7,
        width: float = 0.2,
        floor: float = 0.15,
        monotone: bool = True,
        zero_spread_eps: float = 1e-6,
        track_prompts: bool = True,
        prompt_decay: float = 0.5,
        prompt_min_weight: float = 0.1,
        plot_filename: str | None = "curriculum.png",
    ) -> None:
        super().__init__(zero_spread_eps)
        self._configured_aspects = _check_aspects(aspects, "aspects") if aspects is not None else None
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"`decay` ({decay}) must be in [0, 1); 0.9 averages about 10 batches.")
        if warmup_steps < 1:
            raise ValueError(f"`warmup_steps` ({warmup_steps}) must be at least 1: the starting level needs a batch.")
        if target_gain <= 0:
            raise ValueError(f"`target_gain` ({target_gain}) must be positive, e.g. 1.0 (one starting std).")
        if stall_slope <= 0:
            raise ValueError(f"`stall_slope` ({stall_slope}) must be positive, e.g. 0.01.")
        if gate not in GATES:
            raise ValueError(f"`gate` ({gate!r}) must be one of {sorted(GATES)}.")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"`threshold` ({threshold}) must be in (0, 1): competence lives in [0, 1].")
        if width <= 0:
            raise ValueError(f"`width` ({width}) must be positive, e.g. 0.2.")
        num = len(self._configured_aspects or ASPECTS)
        if not 0.0 <= floor < 1.0 / num:
            raise ValueError(
                f"`floor` ({floor}) must be in [0, 1/{num}) for {num} aspects, so the current aspect keeps the largest "
                f"weight; set it below {1.0 / num:.3f}."
            )
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.target_gain = target_gain
        self.stall_slope = stall_slope
        self.gate = gate
        self.threshold = threshold
        self.width = width
        self.floor = floor
        self.monotone = monotone
        self.plot_filename = plot_filename
        self.prompt_difficulty = PromptDifficulty(prompt_decay, prompt_min_weight) if track_prompts else None
        self.aspects = self._configured_aspects
        self._state: CompetenceState | None = None
        self._progress: Tensor | None = None
        self._history: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(aspects=self._configured_aspects)

    # -- override points -------------------------------------------------------------------------

    def compute_competence(self, state: CompetenceState) -> Tensor:
        """Competence per aspect in [0, 1], shape ``(K,)``, from the statistics. Override to change it."""
        return competence(state, self.target_gain, self.stall_slope, self.warmup_steps)

    def compute_progress(self, competence: Tensor) -> Tensor:
        """Unlock progress per aspect in [0, 1], non-increasing, shape ``(K,)``. Override to change it."""
        return unlock_progress(competence, self.gate, self.threshold, self.width)

    # -- reading the state -------------------------------------------------------------------------

    def current_weights(self) -> dict[str, float]:
        self._ensure_state()
        weights = stage_weights(self._progress, self.floor)
        return {a: float(w) for a, w in zip(self.aspects, weights)}

    def current_competence(self) -> dict[str, float]:
        """Competence per aspect after the latest batch."""
        self._ensure_state()
        return {a: float(c) for a, c in zip(self.aspects, self.compute_competence(self._state))}

    @property
    def stage(self) -> int:
        """Index of the aspect in focus: 0 fidelity, 1 temporal, 2 semantic (for all three aspects)."""
        self._ensure_state()
        return stage_index(self._progress)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per update: ``step``, ``weights``, ``competence``, ``stage``."""
        return list(self._history)

    def _ensure_state(self) -> None:
        if self.aspects is None:
            raise RuntimeError(
                "SelfPacedCurriculum does not know its aspects yet: pass `aspects`, or let fit start so it reads "
                "them from `pl_module.reward_weights`."
            )
        if self._state is None:
            self._state = CompetenceState.initial(len(self.aspects))
            self._progress = self.compute_progress(torch.zeros(len(self.aspects)))

    # -- Lightning hooks -----------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_module(pl_module)
        if self.aspects is None:
            if not pl_module.reward_weights:
                raise ValueError(
                    f"{type(pl_module).__name__}.reward_weights is empty, so SelfPacedCurriculum cannot infer the "
                    f"aspects: set `aspects` (from {list(ASPECTS)}) or fill `reward_weights` before fit."
                )
            self.aspects = _check_aspects(list(pl_module.reward_weights), "pl_module.reward_weights")
            if not 0.0 <= self.floor < 1.0 / len(self.aspects):
                raise ValueError(f"`floor` ({self.floor}) must be below 1/{len(self.aspects)} for aspects {self.aspects}.")
        self._write_weights(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        read = self._read_outputs(outputs)
        if read is None:
            return
        rewards, group_size, prompts = read
        rewards, prompts = self._gather(trainer, rewards, prompts)
        rewards = rewards.cpu()
        used = torch.tensor([self.current_weights()[a] for a in self.aspects])
        zero_std = self._zero_spread_count(rewards, group_size)
        if self.prompt_difficulty is not None and prompts is not None:
            # The reward the policy optimised this batch: the weighted sum of aspects.
            self.prompt_difficulty.update(prompts, used @ rewards, group_size)

        self._state = update_competence(self._state, rewards, group_size, self.decay, self.warmup_steps)
        competence_now = self.compute_competence(self._state)
        progress = self.compute_progress(competence_now)
        self._progress = ratchet(self._progress, progress) if self.monotone else progress

        self._write_weights(pl_module)
        record = {
            "step": int(trainer.global_step),
            "weights": self.current_weights(),
            "competence": {a: float(c) for a, c in zip(self.aspects, competence_now)},
            "stage": self.stage,
        }
        self._history.append(record)
        metrics = {f"curriculum/weight_{a}": w for a, w in record["weights"].items()}
        metrics |= {f"curriculum/competence_{a}": c for a, c in record["competence"].items()}
        metrics |= {f"curriculum/level_{a}": float(v) for a, v in zip(self.aspects, self._state.level)}
        metrics["curriculum/stage"] = float(record["stage"])
        metrics["curriculum/progress"] = float(self._progress[1:].sum())
        metrics["curriculum/zero_std_groups"] = float(zero_std)
        # Values are already identical on every rank: no sync needed.
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plot_filename is not None and self._history:
            # Every rank reads the folder: `trainer.log_dir` is a broadcast, so it must not run on rank 0 alone.
            folder = trainer.log_dir if trainer.logger is not None and trainer.log_dir else trainer.default_root_dir
            self._plot(Path(folder))

    @rank_zero_only
    def _plot(self, folder: Path) -> None:
        plot_curriculum(self._history, self.aspects, folder / self.plot_filename)

    # -- checkpointing -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.aspects is None or self._state is None:
            return {}
        return {
            "aspects": list(self.aspects),
            "competence": self._state.to_dict(),
            "progress": self._progress.tolist(),
            "history": [dict(record) for record in self._history],
            "prompt_difficulty": self.prompt_difficulty.state_dict() if self.prompt_difficulty is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        saved = tuple(state_dict["aspects"])
        if self._configured_aspects is not None and saved != self._configured_aspects:
            raise ValueError(
                f"The checkpoint's curriculum has aspects {list(saved)} but `aspects` is {list(self._configured_aspects)}; "
                "resume with the same aspects or start a new run."
            )
        self.aspects = saved
        self._state = CompetenceState.from_dict(state_dict["competence"])
        self._progress = torch.tensor(state_dict["progress"], dtype=torch.float32)
        self._history = [dict(record) for record in state_dict["history"]]
        if self.prompt_difficulty is not None and state_dict.get("prompt_difficulty") is not None:
            self.prompt_difficulty.load_state_dict(state_dict["prompt_difficulty"])
