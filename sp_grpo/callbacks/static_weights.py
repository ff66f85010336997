"""``StaticWeights``: fixed reward weights, the baseline with the curriculum's contract (see :mod:`sp_grpo.callbacks.base`)."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl

from sp_grpo.callbacks.base import RewardWeightsCallback, check_aspects

__all__ = ["StaticWeights"]


class StaticWeights(RewardWeightsCallback):
    """Fixed reward weights: the baseline with the same contract as :class:`~sp_grpo.callbacks.SelfPacedCurriculum`.

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
        self.aspects = check_aspects(list(weights), "weights")
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
        step = self._gathered_step(trainer, outputs, with_prompts=False)
        metrics = {f"curriculum/weight_{a}": w for a, w in self.weights.items()}
        if step is not None:
            rewards, group_size, _ = step
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
