"""``SelfPacedCurriculum``: reward weights that follow the generator's competence, fidelity -> temporal -> semantic.

Contract in :mod:`sp_grpo.callbacks.base`; maths in :mod:`sp_grpo.functional.curriculum` and
:mod:`sp_grpo.functional.competence`.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor

from sp_grpo.callbacks.base import RewardWeightsCallback, check_aspects, graded_aspects
from sp_grpo.callbacks.plot import plot_curriculum
from sp_grpo.callbacks.static_weights import StaticWeights
from sp_grpo.functional.competence import (
    check_competence_settings,
    check_persistence,
    gain_zscore,
    persistent_competence,
)
from sp_grpo.functional.curriculum import (
    ASPECTS,
    CompetenceState,
    GateName,
    check_floor,
    check_unlock_settings,
    competence,
    ratchet,
    reset_aspects,
    stage_index,
    stage_weights,
    tighten_strictness,
    unlock_progress,
    update_competence,
)

__all__ = ["SelfPacedCurriculum", "StaticWeights"]  # StaticWeights lives in static_weights.py; importable here too


class SelfPacedCurriculum(RewardWeightsCallback):
    """Self-paced reward curriculum: shifts weight fidelity -> temporal -> semantic as competence grows.

    After every training batch it gathers the per-aspect rewards and prompts of all ranks, updates
    each aspect's competence statistics (:func:`~sp_grpo.functional.competence.update_competence`)
    and reads a competence in [0, 1] per aspect (:func:`~sp_grpo.functional.competence.competence`):
    the largest of the three parts below, averaged over steps with weight ``persistence``
    (:func:`~sp_grpo.functional.competence.persistent_competence`: a competence must hold for several
    steps, one step moves it by at most ``1 - persistence``, and its curve can be read by eye):

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
    ``curriculum/progress`` and ``curriculum/zero_std_groups``. At the end of fit, with a
    :class:`~lightning.pytorch.loggers.CSVLogger`, rank 0 draws ``plot_filename`` into that logger's
    folder from its ``metrics.csv`` (:func:`~sp_grpo.callbacks.plot_curriculum`; a resumed run's
    logger folder holds the steps since the resume). Statistics, strictness and the last
    ``history_size`` records of :attr:`history` are saved in checkpoints, so a resumed run continues
    exactly and the checkpoint stays bounded.

    To change how competence is computed, subclass and override :meth:`compute_competence`, the one
    override point (the statistics it reads are :class:`~sp_grpo.functional.competence.CompetenceState`).

    Pace (defaults, 4 prompts x 4 samples per batch, rewards with std 0.1): a mean reward that rises by
    0.002 per step (2 % of its std) unlocks the next aspect after 70-90 steps, warm-up included;
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
        persistence: Weight in [0, 1) of the previous competence in its average over steps; 0 uses each step's.
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
        history_size: Most records kept in :attr:`history` (the latest), so checkpoints stay bounded.
        plot_filename: PNG written into the CSV logger's folder at the end of fit; ``None`` writes no plot.

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
        persistence: float = 0.9,
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
        history_size: int = 1000,
        plot_filename: str | None = "curriculum.png",
    ) -> None:
        super().__init__(zero_spread_eps)
        self._configured_aspects = check_aspects(aspects, "aspects") if aspects is not None else None
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"`decay` ({decay}) must be in [0, 1); 0.9 averages about 10 batches.")
        if warmup_steps < 1:
            raise ValueError(f"`warmup_steps` ({warmup_steps}) must be at least 1: the starting level needs a batch.")
        check_competence_settings(target_gain, significance, saturation, stall_slope)
        check_persistence(persistence)
        check_unlock_settings(gate, threshold, width)
        check_floor(floor, len(self._configured_aspects or ASPECTS))
        if strictness_step is not None and not 0.0 < strictness_step <= 1.0:
            raise ValueError(f"`strictness_step` ({strictness_step}) must be in (0, 1], e.g. 0.5, or null to keep strictness fixed.")
        if not 0.0 <= strictness_start <= 1.0:
            raise ValueError(f"`strictness_start` ({strictness_start}) must be in [0, 1]: 0 is coarse, 1 strict.")
        if max_prompts < 1:
            raise ValueError(f"`max_prompts` ({max_prompts}) must be at least 1.")
        if history_size < 1:
            raise ValueError(f"`history_size` ({history_size}) must be at least 1 (records kept for inspection).")
        if targets is not None:
            check_aspects(list(targets), "targets")
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.target_gain = target_gain
        self.significance = significance
        self.persistence = persistence
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
        self.history_size = history_size
        self.plot_filename = plot_filename
        self.aspects = self._configured_aspects
        self._state: CompetenceState | None = None
        self._progress: Tensor | None = None
        self._strictness: Tensor | None = None  # (K,), NaN for aspects without a graded reward
        self._passed: Tensor | None = None  # (K,) bool: competent at least once (then tightened)
        self._competence: Tensor | None = None  # (K,) competence averaged over steps (persistence)
        self._history: deque[dict[str, Any]] = deque(maxlen=history_size)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(aspects=self._configured_aspects)

    # -- the override point --------------------------------------------------------------------------

    def compute_competence(self, state: CompetenceState) -> Tensor:
        """Competence per aspect in [0, 1], shape ``(K,)``, from the statistics; override to change it.

        Args:
            state: The competence statistics after the latest batch, one entry per aspect of :attr:`aspects`.

        Returns:
            ``(K,)`` competence, fp32, in curriculum order; the next aspect unlocks as the previous one's grows.
        """
        targets = None
        if self.targets is not None:
            targets = torch.tensor([self.targets.get(a, float("nan")) for a in self.aspects], dtype=torch.float32)
        return competence(
            state, target_gain=self.target_gain, significance=self.significance, targets=targets,
            saturation=self.saturation, stall_slope=self.stall_slope, warmup_steps=self.warmup_steps, decay=self.decay,
        )

    def _unlock(self, competence: Tensor) -> Tensor:
        """Unlock progress per aspect in [0, 1], non-increasing, shape ``(K,)``."""
        return unlock_progress(competence, self.gate, self.threshold, self.width)

    # -- reading the state -------------------------------------------------------------------------

    def current_weights(self) -> dict[str, float]:
        self._ensure_state()
        weights = stage_weights(self._progress, self.floor)
        return {a: float(w) for a, w in zip(self.aspects, weights)}

    def current_competence(self) -> dict[str, float]:
        """Competence per aspect after the latest batch, averaged over steps (``persistence``)."""
        self._ensure_state()
        return {a: float(c) for a, c in zip(self.aspects, self._competence)}

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
        """The latest ``history_size`` updates: ``step``, ``weights``, ``competence``, ``stage`` (and ``strictness``)."""
        return list(self._history)

    def _ensure_state(self) -> None:
        if self.aspects is None:
            raise RuntimeError(
                "SelfPacedCurriculum does not know its aspects yet: pass `aspects`, or let fit start so it reads "
                "them from `pl_module.reward_weights`."
            )
        if self._state is None:
            self._state = CompetenceState.initial(len(self.aspects))
            self._progress = self._unlock(torch.zeros(len(self.aspects)))
            self._passed = torch.zeros(len(self.aspects), dtype=torch.bool)
            self._competence = torch.zeros(len(self.aspects))

    # -- strictness ----------------------------------------------------------------------------------

    def _setup_strictness(self, pl_module: pl.LightningModule) -> None:
        if self.strictness_step is None:
            return
        graded = graded_aspects(pl_module, self.aspects, f"SelfPacedCurriculum(strictness_step={self.strictness_step})")
        if self._strictness is None:  # a fresh run; a resumed one keeps its saved strictness
            self._strictness = torch.tensor(
                [self.strictness_start if a in graded else float("nan") for a in self.aspects], dtype=torch.float32
            )
        self._write_strictness(pl_module)

    def _write_strictness(self, pl_module: pl.LightningModule) -> None:
        if self._strictness is not None:
            pl_module.rewards.set_strictness(self.current_strictness())

    def _tighten(self, competence_now: Tensor) -> None:
        self._strictness, raised = tighten_strictness(
            self._strictness, self._progress, competence_now, self.threshold, self.strictness_step
        )
        if raised.any():
            self._passed = self._passed | raised
            # The stricter reward is a new reward: its gains start from a new reference.
            self._state = reset_aspects(self._state, raised)
            self._competence = torch.where(raised, 0.0, self._competence)

    # -- Lightning hooks -----------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_module(pl_module)
        if self.aspects is None:
            if not pl_module.reward_weights:
                raise ValueError(
                    f"{type(pl_module).__name__}.reward_weights is empty, so SelfPacedCurriculum cannot infer the "
                    f"aspects: set `aspects` (from {list(ASPECTS)}) or fill `reward_weights` before fit."
                )
            self.aspects = check_aspects(list(pl_module.reward_weights), "pl_module.reward_weights")
            check_floor(self.floor, len(self.aspects))
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
        step = self._gathered_step(trainer, outputs)
        if step is None:
            return
        rewards, group_size, prompts = step
        zero_std = self._zero_spread_count(rewards, group_size)
        self._state = update_competence(
            self._state, rewards, group_size, prompts, self.decay, self.warmup_steps, self.max_prompts
        )
        competence_now = persistent_competence(self._competence, self.compute_competence(self._state), self.persistence)
        self._competence = competence_now
        gain_z = gain_zscore(self._state, self.decay)
        level = self._state.ref_mean + self._state.gain
        # An aspect that was competent once (and then tightened) keeps the next one unlocked.
        progress = self._unlock(torch.where(self._passed, torch.ones_like(competence_now), competence_now))
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
        metrics |= {"curriculum/stage": float(record["stage"]), "curriculum/zero_std_groups": float(zero_std)}
        metrics["curriculum/progress"] = float(self._progress[1:].sum())
        # Values are already identical on every rank: no sync needed.
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, CSVLogger)]
        if self.plot_filename is not None and loggers:
            self._plot(loggers[0], trainer.log_every_n_steps)

    @rank_zero_only
    def _plot(self, logger: CSVLogger, log_every_n_steps: int) -> None:
        # Only the logger's own folder: no Trainer property that broadcasts (rank 0 alone runs this).
        logger.save()  # flush the rows the logger still buffers into metrics.csv
        metrics = Path(logger.log_dir) / "metrics.csv"
        try:
            plot_curriculum(metrics, Path(logger.log_dir) / self.plot_filename, self.aspects)
        except (FileNotFoundError, ValueError) as err:
            rank_zero_warn(
                f"SelfPacedCurriculum: no {self.plot_filename}, nothing to plot in {metrics} (a run shorter than "
                f"`trainer.log_every_n_steps` ({log_every_n_steps}) logs no row): {err}"
            )

    # -- checkpointing -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.aspects is None or self._state is None:
            return {}
        return {
            "aspects": list(self.aspects),
            "competence": self._state.to_dict(),
            "progress": self._progress.tolist(),
            "passed": self._passed.tolist(),
            "competence_average": self._competence.tolist(),
            "strictness": self._strictness.tolist() if self._strictness is not None else None,
            "history": [dict(record) for record in self._history],
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
        self._competence = torch.tensor(state_dict.get("competence_average", [0.0] * len(saved)), dtype=torch.float32)
        strictness = state_dict.get("strictness")
        self._strictness = torch.tensor(strictness, dtype=torch.float32) if strictness is not None else None
        self._history = deque((dict(record) for record in state_dict["history"]), maxlen=self.history_size)
