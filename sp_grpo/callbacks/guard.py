"""``OverOptimizationGuard``: notice when the training reward keeps rising while a held-out signal falls.

Reward hacking looks like this: the reward being optimised improves while a signal it does not see
(validation rewards on fixed prompts, or a gold metric where one exists) gets worse. The guard
compares the two at every validation, and after ``patience`` validations of divergence in a row it
warns, and optionally stops training or restores the weights of the best held-out validation.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

GuardAction = Literal["warn", "stop", "restore_best"]
_ACTIONS = ("warn", "stop", "restore_best")


class OverOptimizationGuard(L.Callback):
    """Watch a held-out metric against the training reward; act when they diverge.

    At each validation end, with :math:`h` the held-out metric (sign-flipped when lower is better),
    :math:`h^*` its best value so far and :math:`r^*` the training reward at that validation, the run
    *diverges* when

    .. math:: h < h^* - \\delta \\quad\\text{and}\\quad r > r^* + \\delta.

    After ``patience`` diverging validations in a row the guard trips (once): it logs
    ``guard/tripped`` = 1, warns, and with ``action="stop"`` stops training, with
    ``action="restore_best"`` loads the trainable weights of the best held-out validation and stops.

    Under several processes every rank reaches the same state and decision: the two metrics are
    averaged over ranks before use, and both decisions, a new best and tripping, go through
    ``trainer.strategy.reduce_boolean_decision`` (a new best only when every rank sees one, a trip as
    soon as one rank does, as Lightning's ``EarlyStopping`` stops). So each rank snapshots its
    weights at the same validation and, when tripping, restores that snapshot; the restore is strict,
    so a snapshot that no longer fits the module raises instead of loading part of it.

    Args:
        train_metric: Logged training reward to watch (Lightning's ``callback_metrics`` key).
        heldout_metric: Logged held-out signal, e.g. ``"val/reward_weighted"`` or a gold metric.
        heldout_higher_is_better: Whether a larger held-out value is better.
        patience: Diverging validations in a row before the guard trips.
        min_delta: Margin :math:`\\delta` both changes must exceed to count.
        action: ``"warn"``, ``"stop"`` or ``"restore_best"``.

    Raises:
        ValueError: an unknown ``action``, ``patience`` < 1 or negative ``min_delta``.
    """

    def __init__(
        self,
        train_metric: str = "train/reward_weighted",
        heldout_metric: str = "val/reward_weighted",
        heldout_higher_is_better: bool = True,
        patience: int = 3,
        min_delta: float = 0.0,
        action: GuardAction = "warn",
    ) -> None:
        super().__init__()
        if action not in _ACTIONS:
            raise ValueError(f"OverOptimizationGuard: `action` ({action!r}) must be one of {list(_ACTIONS)}.")
        if patience < 1:
            raise ValueError(f"OverOptimizationGuard: `patience` ({patience}) must be at least 1.")
        if min_delta < 0:
            raise ValueError(f"OverOptimizationGuard: `min_delta` ({min_delta}) must be non-negative.")
        self.train_metric = train_metric
        self.heldout_metric = heldout_metric
        self.sign = 1.0 if heldout_higher_is_better else -1.0
        self.patience = patience
        self.min_delta = min_delta
        self.action = action
        self.best_heldout: float | None = None
        self.train_at_best: float | None = None
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.diverging = 0
        self.tripped = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(train_metric=self.train_metric, heldout_metric=self.heldout_metric)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.tripped:
            return
        metrics = trainer.callback_metrics
        missing = [m for m in (self.train_metric, self.heldout_metric) if m not in metrics]
        # Collective, so that a rank missing a metric does not leave the others waiting in the reductions below.
        if not trainer.strategy.reduce_boolean_decision(not missing, all=True):
            rank_zero_warn(
                f"OverOptimizationGuard: {missing} not logged (logged: {sorted(metrics)[:12]}...); set"
                " `train_metric`/`heldout_metric` to logged keys. The guard is idle until then."
            )
            return
        # Metrics logged without `sync_dist` differ per rank; the mean over ranks keeps the guard's state and
        # decision identical everywhere (a rank that stops alone would leave the others waiting).
        names = (self.heldout_metric, self.train_metric)
        both = torch.stack([torch.as_tensor(metrics[name], dtype=torch.float32) for name in names])
        both = trainer.strategy.reduce(both.to(pl_module.device), reduce_op="mean").cpu()
        heldout, train = self.sign * float(both[0]), float(both[1])
        improved = self.best_heldout is None or heldout > self.best_heldout
        if trainer.strategy.reduce_boolean_decision(improved, all=True):
            self.best_heldout, self.train_at_best, self.best_step = heldout, train, trainer.global_step
            self.diverging = 0
            if self.action == "restore_best":
                # Only trainable weights: sp_grpo policies leave frozen ones out of state_dict.
                self.best_state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
            return
        worse = self.best_heldout is not None and heldout < self.best_heldout - self.min_delta
        if worse and train > self.train_at_best + self.min_delta:
            self.diverging += 1
        else:
            self.diverging = 0
        if trainer.strategy.reduce_boolean_decision(self.diverging >= self.patience, all=False):
            self._trip(trainer, pl_module, heldout, train)

    def _trip(self, trainer: L.Trainer, pl_module: L.LightningModule, heldout: float, train: float) -> None:
        self.tripped = True
        rank_zero_warn(
            f"OverOptimizationGuard: over-optimisation suspected at step {trainer.global_step}: `{self.train_metric}`"
            f" rose from {self.train_at_best:.4g} to {train:.4g} while `{self.heldout_metric}` fell from"
            f" {self.sign * self.best_heldout:.4g} (step {self.best_step}) to {self.sign * heldout:.4g} over"
            f" {self.diverging} validations. Action: {self.action}."
        )
        for logger in trainer.loggers:  # self.log is not allowed in on_validation_end
            logger.log_metrics({"guard/tripped": 1.0}, step=trainer.global_step)
        if self.action in ("stop", "restore_best"):
            trainer.should_stop = True
        if self.action == "restore_best" and self.best_state is not None:
            device_state = {k: v.to(pl_module.device) for k, v in self.best_state.items()}
            pl_module.load_state_dict(device_state, strict=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_heldout": self.best_heldout,
            "train_at_best": self.train_at_best,
            "best_step": self.best_step,
            "best_state": copy.copy(self.best_state),
            "diverging": self.diverging,
            "tripped": self.tripped,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_heldout = state_dict["best_heldout"]
        self.train_at_best = state_dict["train_at_best"]
        self.best_step = state_dict["best_step"]
        self.best_state = state_dict["best_state"]
        self.diverging = state_dict["diverging"]
        self.tripped = state_dict["tripped"]


__all__ = ["GuardAction", "OverOptimizationGuard"]
