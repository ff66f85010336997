"""The paper's published weighting (v4, TaRoS) as a Lightning callback: per-group reward weights.

Version 4 of the Self-Paced GRPO paper (arXiv 2511.19356, "Rethinking Reward Signals in Video GRPO:
When Scores Become Targets") replaces global stages with weights computed for each prompt's group
from that group's rewards: a level term (the group's mean score of a component against a target
level tau) and a separation term (its Hoyer sparsity against the next component's). The maths is
:func:`sp_grpo.functional.group_reward_weights`; this callback owns the target levels (fixed, or
calibrated from the history of group means) and installs the weighting on the module.

The contract, which any LightningModule can follow (the curriculum callbacks' contract plus one
attribute):

* the module has ``reward_weights: dict[str, float]`` (the callback writes equal weights there, for
  code that reads it) and ``group_weighting``, initially ``None``: when set, the module calls
  ``group_weighting(aspect_rewards, group_size)`` with the batch's ``(P*G,)`` rewards per aspect and
  uses the returned aspect -> ``(P,)`` per-group weights in place of ``reward_weights``;
* ``training_step`` returns ``"aspect_rewards"`` and ``"group_size"`` as for
  :class:`~sp_grpo.callbacks.SelfPacedCurriculum`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from sp_grpo.callbacks.base import RewardWeightsCallback, check_aspects
from sp_grpo.functional.reward_weighting import group_reward_weights, hoyer_sparsity

__all__ = ["GroupRewardWeighting", "GroupWeighting"]


@dataclasses.dataclass(frozen=True)
class GroupWeighting:
    """The per-group weighting a module calls in its advantage step; frozen, so a batch's setting is fixed.

    Args:
        aspects: Aspects weighed, in curriculum order.
        thresholds: Target level per aspect, same order.
        beta: Weight of the separation term.
        slope: Slope of the sigmoid on the level term.
    """

    aspects: tuple[str, ...]
    thresholds: tuple[float, ...]
    beta: float
    slope: float

    def __call__(self, aspect_rewards: Mapping[str, Tensor], group_size: int) -> dict[str, Tensor]:
        """Aspect -> ``(P,)`` weights of each group; aspects of ``aspect_rewards`` not weighed here get 0.

        Args:
            aspect_rewards: Aspect -> ``(P * G,)`` rewards, prompt-major; must hold every weighed aspect.
            group_size: ``G``.

        Raises:
            KeyError: If a weighed aspect has no rewards.
        """
        missing = [a for a in self.aspects if a not in aspect_rewards]
        if missing:
            raise KeyError(
                f"the per-group weighting weighs {list(self.aspects)} but the batch has no rewards for {missing} "
                f"(it has {sorted(aspect_rewards)}): add rewards of those aspects or set the callback's `aspects`."
            )
        stacked = torch.stack([aspect_rewards[a].detach().reshape(-1) for a in self.aspects])
        weights = group_reward_weights(
            stacked, group_size, torch.tensor(self.thresholds), beta=self.beta, slope=self.slope
        )
        out = {a: w for a, w in zip(self.aspects, weights)}
        zeros = torch.zeros_like(weights[0])
        return {a: out.get(a, zeros) for a in aspect_rewards}


class GroupRewardWeighting(RewardWeightsCallback):
    """The paper's v4 weighting (TaRoS): each prompt group weighs its reward components by level and separation.

    For each group and component :math:`j` (fidelity, temporal, semantic), with group mean
    :math:`\\bar r_j` and Hoyer sparsity :math:`S(r_j)`, the weights are
    :math:`\\mathrm{softmax}_j\\big(\\mathrm{sigmoid}(\\text{slope}(\\bar r_j - \\tau_j)) + \\beta[S(r_j) - S(r_{j+1})]\\big)`
    (:func:`~sp_grpo.functional.group_reward_weights`). The module aggregates the weighted rewards
    and standardises them within each group; the paper does that first sum, then standardisation,
    so use ``model.aggregation: sum_then_normalize`` for the published method (a warning says so
    otherwise).

    Target levels :math:`\\tau_j` are ``thresholds`` (the paper: 0.75 for Wan2.1 1.3B), or, with
    ``calibrate``, the paper's "calibrated from the historical distribution of group-wise rewards":
    here the ``quantile`` of the group means of the last ``window`` batches (all ranks), used once
    ``warmup_steps`` batches have been seen; until then ``thresholds``. Override
    :meth:`compute_thresholds` to calibrate differently.

    After every batch it logs, per aspect, ``curriculum/weight_<aspect>`` (mean weight over the
    batch's groups), ``curriculum/sparsity_<aspect>`` (mean Hoyer sparsity),
    ``curriculum/saturated_<aspect>`` (share of groups whose mean reached its target,
    :math:`\\bar r_j \\ge \\tau_j`) and ``curriculum/threshold_<aspect>`` (the :math:`\\tau_j` used), and
    ``curriculum/zero_std_groups``. Its state (target levels and the bounded history) is saved in
    checkpoints, so a resumed run continues exactly; every rank computes it from the same gathered
    rewards, so all ranks use the same target levels.

    Args:
        aspects: Aspects to weigh, from ``fidelity``, ``temporal``, ``semantic`` (put in that order);
            ``None`` takes the keys of ``pl_module.reward_weights`` at fit start.
        thresholds: Target level :math:`\\tau`, one for all aspects or aspect -> level.
        beta: Weight of the separation term, non-negative (the paper: 0.1 to 0.5).
        slope: Slope of the sigmoid on the level term, positive (1.0 is the paper's literal sigmoid).
        calibrate: Replace ``thresholds`` by a quantile of the history of group means.
        quantile: Quantile in (0, 1) of the group means that becomes :math:`\\tau` when calibrating.
        window: Batches of group means kept for calibration (the state is bounded by it).
        warmup_steps: Batches seen before calibrated levels replace ``thresholds``.
        zero_spread_eps: Group reward spread at or below which a group counts as teaching nothing.

    Raises:
        ValueError: If a setting is out of range; the message names the allowed values.

    Example:
        >>> GroupRewardWeighting(thresholds={"fidelity": 0.8, "temporal": 0.7, "semantic": 0.75}).current_thresholds()
        {'fidelity': 0.8, 'temporal': 0.7, 'semantic': 0.75}
    """

    def __init__(
        self,
        aspects: list[str] | None = None,
        thresholds: float | dict[str, float] = 0.75,
        beta: float = 0.3,
        slope: float = 1.0,
        calibrate: bool = False,
        quantile: float = 0.5,
        window: int = 50,
        warmup_steps: int = 10,
        zero_spread_eps: float = 1e-6,
    ) -> None:
        super().__init__(zero_spread_eps)
        self._configured_aspects = check_aspects(aspects, "aspects") if aspects is not None else None
        if isinstance(thresholds, Mapping):
            check_aspects(list(thresholds), "thresholds")
            if self._configured_aspects is not None and set(thresholds) != set(self._configured_aspects):
                raise ValueError(
                    f"`thresholds` names {sorted(thresholds)} but `aspects` is {list(self._configured_aspects)}; give "
                    "one threshold per aspect, or a single number for all."
                )
            bad = {a: t for a, t in thresholds.items() if not isinstance(t, (int, float)) or t != t}
            if bad:
                raise ValueError(f"`thresholds` must be numbers, got {bad}.")
        elif not isinstance(thresholds, (int, float)) or thresholds != thresholds:
            raise ValueError(f"`thresholds` ({thresholds!r}) must be a number or a dict aspect -> number, e.g. 0.75.")
        if not beta >= 0:
            raise ValueError(f"`beta` ({beta}) must be non-negative; the paper uses 0.1, 0.3 or 0.5.")
        if not slope > 0:
            raise ValueError(f"`slope` ({slope}) must be positive; 1.0 is the paper's literal sigmoid.")
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"`quantile` ({quantile}) must be in (0, 1); 0.5 calibrates each target to the median group mean.")
        if window < 1:
            raise ValueError(f"`window` ({window}) must be at least 1 batch.")
        if warmup_steps < 1 or warmup_steps > window:
            raise ValueError(
                f"`warmup_steps` ({warmup_steps}) must be in [1, `window`] ({window}): calibration needs at least one "
                "batch and can only use the batches it keeps."
            )
        self.thresholds = thresholds
        self.beta = float(beta)
        self.slope = float(slope)
        self.calibrate = calibrate
        self.quantile = quantile
        self.window = window
        self.warmup_steps = warmup_steps
        self.aspects = self._configured_aspects
        self._levels: Tensor | None = None  # tau per aspect, in self.aspects order; fp64 so 0.7 reads back as 0.7
        self._history: list[Tensor] = []  # per batch, (K, P) group means; at most `window` batches
        self._batches = 0
        self._last_weights: dict[str, float] | None = None
        self._warned_negative: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(aspects=self._configured_aspects)

    # -- override point ------------------------------------------------------------------------------

    def compute_thresholds(self, history: Tensor, batches_seen: int) -> Tensor:
        """Target level per aspect, ``(K,)``, from the kept group means ``history`` ``(K, N)``.

        The default: with ``calibrate``, after ``warmup_steps`` batches, the ``quantile`` of each
        aspect's group means; otherwise the configured ``thresholds``. Override to calibrate differently.
        """
        if self.calibrate and batches_seen >= self.warmup_steps and history.numel():
            return torch.quantile(history.double(), self.quantile, dim=1)
        return self._configured_levels()

    # -- reading the state -----------------------------------------------------------------------------

    def current_thresholds(self) -> dict[str, float]:
        """Target level per aspect used for the next batch."""
        self._ensure_state()
        return {a: float(t) for a, t in zip(self.aspects, self._levels)}

    def current_weights(self) -> dict[str, float]:
        """Mean per-group weight of each aspect in the latest batch (``1/K`` before the first batch)."""
        self._ensure_state()
        if self._last_weights is None:
            return {a: 1.0 / len(self.aspects) for a in self.aspects}
        return dict(self._last_weights)

    def weighting(self) -> GroupWeighting:
        """The frozen weighting the module uses for its next batch."""
        self._ensure_state()
        return GroupWeighting(self.aspects, tuple(float(t) for t in self._levels), self.beta, self.slope)

    def _configured_levels(self) -> Tensor:
        if isinstance(self.thresholds, Mapping):
            missing = [a for a in self.aspects if a not in self.thresholds]
            if missing:
                raise ValueError(
                    f"`thresholds` has no level for {missing} (it names {sorted(self.thresholds)}); give every weighed "
                    "aspect a threshold, or a single number for all."
                )
            return torch.tensor([float(self.thresholds[a]) for a in self.aspects], dtype=torch.float64)
        return torch.full((len(self.aspects),), float(self.thresholds), dtype=torch.float64)

    def _ensure_state(self) -> None:
        if self.aspects is None:
            if isinstance(self.thresholds, Mapping):
                self.aspects = check_aspects(list(self.thresholds), "thresholds")
            else:
                raise RuntimeError(
                    "GroupRewardWeighting does not know its aspects yet: pass `aspects`, or let fit start so it reads "
                    "them from `pl_module.reward_weights`."
                )
        if self._levels is None:
            self._levels = self._configured_levels()

    # -- Lightning hooks -------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_module(pl_module)
        if not hasattr(pl_module, "group_weighting"):
            raise AttributeError(
                f"{type(pl_module).__name__} has no `group_weighting` attribute, which GroupRewardWeighting sets: give "
                "the module `self.group_weighting = None` and, when it is set, weigh each aspect's rewards per group "
                "with `self.group_weighting(aspect_rewards, group_size)` (see sp_grpo.SelfPacedGRPO.aspect_weights)."
            )
        if self.aspects is None:
            if not pl_module.reward_weights:
                raise ValueError(
                    f"{type(pl_module).__name__}.reward_weights is empty, so GroupRewardWeighting cannot infer the "
                    "aspects: set `aspects` or fill `reward_weights` before fit."
                )
            self.aspects = check_aspects(list(pl_module.reward_weights), "pl_module.reward_weights")
        self._ensure_state()
        if getattr(pl_module, "aggregation", "sum_then_normalize") != "sum_then_normalize":
            rank_zero_warn(
                f"GroupRewardWeighting: the paper sums the weighted rewards, then standardises them within each group, "
                f"but `model.aggregation` is {pl_module.aggregation!r}; set `model.aggregation: sum_then_normalize` for "
                "the published method."
            )
        pl_module.reward_weights = {a: 1.0 / len(self.aspects) for a in self.aspects}
        pl_module.group_weighting = self.weighting()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = self._gathered_step(trainer, outputs, with_prompts=False)
        if step is None:
            return
        rewards, group_size, _ = step
        self._warn_negative(rewards)
        # The weights this batch was trained with: same rewards, same target levels as the module used.
        used = self.weighting()
        weights = group_reward_weights(rewards, group_size, torch.tensor(used.thresholds), beta=self.beta, slope=self.slope)
        sparsity = hoyer_sparsity(rewards, group_size)
        means = rewards.reshape(len(self.aspects), -1, group_size).mean(dim=-1)
        self._last_weights = {a: float(w) for a, w in zip(self.aspects, weights.mean(dim=1))}
        metrics = {f"curriculum/weight_{a}": w for a, w in self._last_weights.items()}
        for k, a in enumerate(self.aspects):
            metrics[f"curriculum/sparsity_{a}"] = float(sparsity[k].mean())
            metrics[f"curriculum/saturated_{a}"] = float((means[k] >= self._levels[k]).float().mean())
            metrics[f"curriculum/threshold_{a}"] = float(self._levels[k])
        metrics["curriculum/zero_std_groups"] = float(self._zero_spread_count(rewards, group_size))

        # Calibration for the next batch.
        self._history = (self._history + [means])[-self.window :]
        self._batches += 1
        self._levels = self.compute_thresholds(torch.cat(self._history, dim=1), self._batches).double()
        pl_module.group_weighting = self.weighting()
        # Values are identical on every rank (computed from gathered rewards): no sync needed.
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def _zero_spread_count(self, rewards: Tensor, group_size: int) -> int:
        # A group teaches nothing when every weighed aspect is flat in it (each has positive weight).
        spread = rewards.reshape(rewards.shape[0], -1, group_size)
        flat = (spread.amax(dim=-1) - spread.amin(dim=-1) <= self.zero_spread_eps).all(dim=0)
        return int(flat.sum())

    def _warn_negative(self, rewards: Tensor) -> None:
        for k, aspect in enumerate(self.aspects):
            if aspect not in self._warned_negative and bool((rewards[k] < 0).any()):
                self._warned_negative.add(aspect)
                rank_zero_warn(
                    f"GroupRewardWeighting: the {aspect!r} rewards have negative values (min {float(rewards[k].min()):.4g}). "
                    "The Hoyer sparsity counts them by magnitude and the target levels compare raw means, as the paper's "
                    "scores in [0, 1] assume; map this reward into [0, 1] for the published weighting."
                )

    # -- checkpointing ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.aspects is None or self._levels is None:
            return {}
        return {
            "aspects": list(self.aspects),
            "levels": self._levels.tolist(),
            "history": [means.tolist() for means in self._history],
            "batches": self._batches,
            "last_weights": self._last_weights,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        saved = tuple(state_dict["aspects"])
        if self._configured_aspects is not None and saved != self._configured_aspects:
            raise ValueError(
                f"The checkpoint's weighting has aspects {list(saved)} but `aspects` is {list(self._configured_aspects)}; "
                "resume with the same aspects or start a new run."
            )
        self.aspects = saved
        self._history = [torch.tensor(means, dtype=torch.float32) for means in state_dict["history"]][-self.window :]
        self._batches = int(state_dict["batches"])
        self._last_weights = state_dict.get("last_weights")
        # Recomputed rather than read back: equal to the saved levels when the settings are unchanged,
        # and the configured settings win when they changed (one place for each setting).
        history = torch.cat(self._history, dim=1) if self._history else torch.zeros(len(saved), 0)
        self._levels = self.compute_thresholds(history, self._batches).double()
