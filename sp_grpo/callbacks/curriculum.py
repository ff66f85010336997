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
from sp_grpo.functional.competence import check_competence_settings, gain_zscore
from sp_grpo.functional.curriculum import (
    ASPECTS,
    GATES,
    CompetenceState,
    GateName,
    competence,
    ratchet,
    reset_aspects,
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

    After every training batch it gathers the per-aspect rewards (and prompts) of all ranks, updates
    each aspect's competence statistics (:func:`~sp_grpo.functional.competence.update_competence`)
    and reads a competence in [0, 1] per aspect (:func:`~sp_grpo.functional.competence.competence`):
    the largest of

    * **progress**: the groups' mean gain over their prompts' own first scores, in starting stds of
      one reward, counted only once it is ``significance`` standard errors above zero (errors from
      the groups' own statistics, so the draw of prompts is not mistaken for progress);
    * **level**: the estimated level reached the aspect's entry in ``targets`` (when given);
    * **saturation**: the groups' Hoyer sparsity fell by ``saturation`` (relative, clearing its own
      noise) while the level stalled: the aspect no longer separates samples, so it teaches little.

    Later aspects unlock through smooth gates
    (:func:`~sp_grpo.functional.curriculum.unlock_progress`, never going back when ``monotone``) and
    the next batch's weights (:func:`~sp_grpo.functional.curriculum.stage_weights`) are written to
    ``pl_module.reward_weights``. Every rank computes the same weights from the same gathered rewards.

    **Growing strictness (coarse to fine).** With ``strictness_step`` set, each aspect whose rewards
    are graded (:attr:`~sp_grpo.rewards.VideoReward.graded`) starts at ``strictness_start`` and, each
    time it is unlocked and competent, its strictness rises by ``strictness_step`` (up to 1) and its
    competence statistics start afresh (the stricter reward is a new reward). An aspect that has been
    tightened once counts as competent for unlocking the next. The callback writes strictness through
    ``pl_module.rewards.set_strictness(dict)`` (:class:`~sp_grpo.rewards.RewardSet` has it).

    Logs each step ``curriculum/weight_<aspect>``, ``curriculum/competence_<aspect>``,
    ``curriculum/level_<aspect>`` (start level plus gain), ``curriculum/gain_z_<aspect>`` (the gain in
    standard errors), ``curriculum/strictness_<aspect>`` (graded aspects), ``curriculum/stage``,
    ``curriculum/progress`` and ``curriculum/zero_std_groups``; at the end of fit, rank 0 writes
    ``plot_filename`` into the log folder. Statistics, strictness and history are saved in
    checkpoints, so a resumed run continues exactly and plots the whole run.

    To change how competence or progress is computed, subclass and override
    :meth:`compute_competence` or :meth:`compute_progress`.

    Pace (defaults, 4 prompts x 4 samples per batch, rewards with std 0.1): a mean reward that rises by
    0.002 per step (2 % of its std) unlocks the next aspect after about 70 steps, warm-up included;
    pure noise never does (tested over many seeds and 1000 steps, with prompt mixes that move the
    batch mean). Lower ``target_gain`` or ``significance`` for a faster curriculum, raise them for a
    safer one; ``warmup_steps`` and ``decay`` trade noise for delay.

    Args:
        aspects: Aspects to schedule, from ``fidelity``, ``temporal``, ``semantic`` (put in that order);
            ``None`` takes the keys of ``pl_module.reward_weights`` at fit start.
        decay: EMA factor in [0, 1) of the competence statistics; ~1/(1-decay) batches are averaged.
        warmup_steps: Batches that calibrate each aspect's starting level and noise before competence can grow.
        target_gain: Gain of the mean reward, in starting stds of one reward, that counts as mastering an aspect.
        significance: Standard errors a gain (or a sparsity drop) must clear before it counts, e.g. 3.
        targets: Aspect -> reward level that counts as good (an absolute level); ``None``: levels do not count.
        saturation: Relative drop of the groups' Hoyer sparsity, in (0, 1], that counts as saturated.
        stall_slope: Rise per step, in starting stds, below which a saturated aspect counts as stalled.
        gate: Shape of the transition between aspects: ``"sigmoid"`` or ``"smoothstep"``.
        threshold: Competence in (0, 1) of an aspect at which the next aspect is half unlocked.
        width: Competence range over which the transition happens.
        floor: Weight in [0, 1/K) that each passed aspect keeps, so it is not forgotten.
        monotone: Never move back to an earlier stage when competence dips.
        strictness_step: Rise of a graded aspect's strictness each time it becomes competent, in (0, 1];
            ``None`` leaves the rewards' strictness alone.
        strictness_start: Strictness in [0, 1] that graded aspects start from when ``strictness_step`` is set.
        max_prompts: Most per-prompt baselines kept (the oldest are dropped), so the state stays bounded.
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
        significance: float = 3.0,
        targets: dict[str, float] | None = None,
        saturation: float = 0.5,
        stall_slope: float = 0.01,
        gate: GateName = "sigmoid",
        threshold: float = 0.7,
        width: float = 0.2,
        floor: float = 0.15,
        monotone: bool = True,
        strictness_step: float | None = None,
        strictness_start: float = 0.0,
        max_prompts: int = 4096,
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
        check_competence_settings(target_gain, significance, saturation, stall_slope)
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
        if strictness_step is not None and not 0.0 < strictness_step <= 1.0:
            raise ValueError(f"`strictness_step` ({strictness_step}) must be in (0, 1], e.g. 0.5, or null to keep strictness fixed.")
        if not 0.0 <= strictness_start <= 1.0:
            raise ValueError(f"`strictness_start` ({strictness_start}) must be in [0, 1]: 0 is coarse, 1 strict.")
        if max_prompts < 1:
            raise ValueError(f"`max_prompts` ({max_prompts}) must be at least 1.")
        if targets is not None:
            _check_aspects(list(targets), "targets")
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.target_gain = target_gain
        self.significance = significance
        self.targets = dict(targets) if targets is not None else None
        self.saturation = saturation
        self.stall_slope = stall_slope
        self.gate = gate
        self.threshold = threshold
        self.width = width
        self.floor = floor
        self.monotone = monotone
        self.strictness_step = strictness_step
        self.strictness_start = strictness_start
        self.max_prompts = max_prompts
        self.plot_filename = plot_filename
        self.prompt_difficulty = PromptDifficulty(prompt_decay, prompt_min_weight) if track_prompts else None
        self.aspects = self._configured_aspects
        self._state: CompetenceState | None = None
        self._progress: Tensor | None = None
        self._strictness: Tensor | None = None  # (K,), NaN for aspects without a graded reward
        self._passed: Tensor | None = None  # (K,) bool: competent at least once (then tightened)
        self._history: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(aspects=self._configured_aspects)

    # -- override points -------------------------------------------------------------------------

    def compute_competence(self, state: CompetenceState) -> Tensor:
        """Competence per aspect in [0, 1], shape ``(K,)``, from the statistics. Override to change it."""
        targets = None
        if self.targets is not None:
            targets = torch.tensor([self.targets.get(a, float("nan")) for a in self.aspects], dtype=torch.float32)
        return competence(
            state,
            target_gain=self.target_gain,
            significance=self.significance,
            targets=targets,
            saturation=self.saturation,
            stall_slope=self.stall_slope,
            warmup_steps=self.warmup_steps,
            decay=self.decay,
        )

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

    def current_strictness(self) -> dict[str, float]:
        """Strictness per graded aspect (empty unless ``strictness_step`` is set and fit has started)."""
        if self._strictness is None:
            return {}
        return {a: float(v) for a, v in zip(self.aspects, self._strictness) if not torch.isnan(v)}

    @property
    def stage(self) -> int:
        """Index of the aspect in focus: 0 fidelity, 1 temporal, 2 semantic (for all three aspects)."""
        self._ensure_state()
        return stage_index(self._progress)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per update: ``step``, ``weights``, ``competence``, ``stage`` (and ``strictness``)."""
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
            self._passed = torch.zeros(len(self.aspects), dtype=torch.bool)

    # -- strictness ----------------------------------------------------------------------------------

    def _setup_strictness(self, pl_module: pl.LightningModule) -> None:
        if self.strictness_step is None:
            return
        rewards = getattr(pl_module, "rewards", None)
        if not callable(getattr(rewards, "set_strictness", None)) or not hasattr(rewards, "graded_aspects"):
            raise AttributeError(
                f"SelfPacedCurriculum(strictness_step={self.strictness_step}) tightens rewards through "
                f"`pl_module.rewards.set_strictness(dict)`, which {type(pl_module).__name__} lacks: give the module a "
                "`rewards` RewardSet, or set `strictness_step: null`."
            )
        graded = set(rewards.graded_aspects)
        if not graded & set(self.aspects):
            raise ValueError(
                f"SelfPacedCurriculum(strictness_step={self.strictness_step}): none of the aspects {list(self.aspects)} "
                "has a graded reward (`graded = True`, e.g. ShapesSemantic, ShapesFidelity, TextVideoAlignment with "
                "`margin`); use graded rewards or set `strictness_step: null`."
            )
        if self._strictness is None:  # a fresh run; a resumed one keeps its saved strictness
            self._strictness = torch.tensor(
                [self.strictness_start if a in graded else float("nan") for a in self.aspects], dtype=torch.float32
            )
        self._write_strictness(pl_module)

    def _write_strictness(self, pl_module: pl.LightningModule) -> None:
        if self._strictness is not None:
            pl_module.rewards.set_strictness(self.current_strictness())

    def _tighten(self, competence_now: Tensor) -> Tensor:
        """Raise the strictness of unlocked, competent graded aspects; returns which were raised."""
        graded = ~torch.isnan(self._strictness)
        raise_now = graded & (self._progress >= 0.5) & (competence_now >= self.threshold) & (self._strictness < 1.0)
        if raise_now.any():
            self._strictness = torch.where(
                raise_now, (self._strictness + self.strictness_step).clamp(max=1.0), self._strictness
            )
            self._passed = self._passed | raise_now
            # The stricter reward is a new reward: its gains start from a new reference.
            self._state = reset_aspects(self._state, raise_now)
        return raise_now

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
        if self.targets is not None:
            extra = sorted(set(self.targets) - set(self.aspects))
            if extra:
                raise ValueError(f"`targets` names aspects {extra} that the curriculum does not schedule ({list(self.aspects)}).")
        self._ensure_state()
        self._setup_strictness(pl_module)
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

        self._state = update_competence(
            self._state, rewards, group_size, prompts, self.decay, self.warmup_steps, self.max_prompts
        )
        competence_now = self.compute_competence(self._state)
        gain_z = gain_zscore(self._state, self.decay)
        level = self._state.ref_mean + self._state.gain
        # An aspect that was competent once (and then tightened) keeps the next one unlocked.
        progress = self.compute_progress(torch.where(self._passed, torch.ones_like(competence_now), competence_now))
        self._progress = ratchet(self._progress, progress) if self.monotone else progress
        if self._strictness is not None:
            self._tighten(competence_now)
            self._write_strictness(pl_module)

        self._write_weights(pl_module)
        record = {
            "step": int(trainer.global_step),
            "weights": self.current_weights(),
            "competence": {a: float(c) for a, c in zip(self.aspects, competence_now)},
            "stage": self.stage,
        }
        if self._strictness is not None:
            record["strictness"] = self.current_strictness()
        self._history.append(record)
        metrics = {f"curriculum/weight_{a}": w for a, w in record["weights"].items()}
        metrics |= {f"curriculum/competence_{a}": c for a, c in record["competence"].items()}
        metrics |= {f"curriculum/level_{a}": float(v) for a, v in zip(self.aspects, level)}
        metrics |= {f"curriculum/gain_z_{a}": float(z.clamp(-1e3, 1e3)) for a, z in zip(self.aspects, gain_z)}
        metrics |= {f"curriculum/strictness_{a}": v for a, v in record.get("strictness", {}).items()}
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
            "passed": self._passed.tolist(),
            "strictness": self._strictness.tolist() if self._strictness is not None else None,
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
        if "passed" not in state_dict:
            raise ValueError(
                "The checkpoint's curriculum state predates the competence redesign (no per-prompt gains); its "
                "statistics cannot be continued. Start a new run, or resume with the sp_grpo version that wrote it."
            )
        self.aspects = saved
        self._state = CompetenceState.from_dict(state_dict["competence"])
        self._progress = torch.tensor(state_dict["progress"], dtype=torch.float32)
        self._passed = torch.tensor(state_dict["passed"], dtype=torch.bool)
        strictness = state_dict.get("strictness")
        self._strictness = torch.tensor(strictness, dtype=torch.float32) if strictness is not None else None
        self._history = [dict(record) for record in state_dict["history"]]
        if self.prompt_difficulty is not None and state_dict.get("prompt_difficulty") is not None:
            self.prompt_difficulty.load_state_dict(state_dict["prompt_difficulty"])
