import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from sp_grpo.callbacks import OverOptimizationGuard


class Diverging(L.LightningModule):
    """Training reward rises every step; the held-out metric peaks at step `peak`, then falls."""

    def __init__(self, peak: int = 3) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.peak = peak

    def training_step(self, batch, batch_idx):
        self.log("train/reward_weighted", float(self.global_step))
        with torch.no_grad():
            self.weight.add_(1.0)  # the "weights" record how many steps were taken
        return None

    def validation_step(self, batch, batch_idx):
        step = self.global_step
        self.log("val/gold", float(step if step <= self.peak else 2 * self.peak - step))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(range(100), batch_size=1)

    def val_dataloader(self):
        return DataLoader(range(1), batch_size=1)


def run(tmp_path, guard, steps=12):
    module = Diverging()
    trainer = L.Trainer(max_steps=steps, val_check_interval=1, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_checkpointing=False, logger=CSVLogger(tmp_path), callbacks=[guard])
    trainer.fit(module)
    return trainer, module


def test_warns_when_training_reward_rises_and_heldout_falls(tmp_path):
    guard = OverOptimizationGuard(heldout_metric="val/gold", patience=2, action="warn")
    with pytest.warns(UserWarning, match="over-optimisation suspected"):
        trainer, _ = run(tmp_path, guard)
    assert guard.tripped and guard.best_step == 3
    assert trainer.global_step == 12  # warn only: training went on
    assert "guard/tripped" in (tmp_path / "lightning_logs/version_0/metrics.csv").read_text()


def test_stop_and_restore_best(tmp_path):
    guard = OverOptimizationGuard(heldout_metric="val/gold", patience=2, action="restore_best")
    with pytest.warns(UserWarning, match="over-optimisation"):
        trainer, module = run(tmp_path, guard)
    assert trainer.global_step == 5  # best at 3, diverging at 4 and 5: stop
    assert module.weight.item() == 3.0  # the weights of the best held-out validation


def test_no_trip_while_both_improve(tmp_path):
    guard = OverOptimizationGuard(heldout_metric="val/gold", patience=2, action="stop")
    module = Diverging(peak=100)
    trainer = L.Trainer(max_steps=8, val_check_interval=1, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_checkpointing=False, logger=False, callbacks=[guard])
    trainer.fit(module)
    assert not guard.tripped and trainer.global_step == 8


def test_state_round_trip():
    guard = OverOptimizationGuard(patience=2)
    guard.best_heldout, guard.train_at_best, guard.diverging = 1.0, 2.0, 1
    other = OverOptimizationGuard(patience=2)
    other.load_state_dict(guard.state_dict())
    assert (other.best_heldout, other.train_at_best, other.diverging) == (1.0, 2.0, 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"action": "pause"}, r"action.*\['warn', 'stop', 'restore_best'\]"), ({"patience": 0}, "patience"), ({"min_delta": -1}, "min_delta")],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OverOptimizationGuard(**kwargs)


class _OtherRank:
    """A strategy for one rank of two: metrics already averaged, the other rank's decisions given by the test."""

    def __init__(self, other_improved=True, other_trips=False):
        self.other = {True: other_improved, False: other_trips}  # keyed by `all`: the new-best vote, the trip vote
        self.calls = []

    def reduce(self, tensor, reduce_op="mean"):
        return tensor

    def reduce_boolean_decision(self, decision, all=True):
        self.calls.append((decision, all))
        if len(self.calls) == 1:  # the first vote: are the metrics logged on every rank
            return decision
        other = self.other[all]
        return (decision and other) if all else (decision or other)


def _validate(guard, module, strategy, heldout, train, step):
    trainer = type("Trainer", (), {})()
    trainer.sanity_checking, trainer.loggers, trainer.should_stop, trainer.global_step = False, [], False, step
    trainer.strategy = strategy
    trainer.callback_metrics = {"val/gold": torch.tensor(heldout), "train/reward_weighted": torch.tensor(train)}
    guard.on_validation_end(trainer, module)
    return trainer


def test_trips_on_every_rank_when_one_rank_trips():
    guard = OverOptimizationGuard(heldout_metric="val/gold", patience=3, action="stop")
    module = Diverging()
    _validate(guard, module, _OtherRank(), 1.0, 0.0, step=1)  # the best so far, on both ranks
    strategy = _OtherRank(other_improved=False, other_trips=True)
    with pytest.warns(UserWarning, match="over-optimisation suspected"):
        trainer = _validate(guard, module, strategy, 0.5, 1.0, step=2)  # this rank: 1 of 3 diverging validations
    assert guard.tripped and trainer.should_stop
    assert (False, False) in strategy.calls  # this rank voted "no trip"; the other rank's vote decided


def test_new_best_only_when_every_rank_sees_one():
    guard = OverOptimizationGuard(heldout_metric="val/gold", patience=3, action="restore_best")
    module = Diverging()
    _validate(guard, module, _OtherRank(), 1.0, 0.0, step=1)
    with torch.no_grad():
        module.weight.fill_(5.0)
    _validate(guard, module, _OtherRank(other_improved=False), 2.0, 0.0, step=2)  # better here only
    assert guard.best_step == 1 and guard.best_state["weight"].item() == 0.0  # the snapshot all ranks share


def test_restore_best_loads_strictly():
    guard = OverOptimizationGuard(heldout_metric="val/gold", patience=1, action="restore_best")
    module = Diverging()
    _validate(guard, module, _OtherRank(), 1.0, 0.0, step=1)
    guard.best_state["renamed.weight"] = guard.best_state.pop("weight")
    with pytest.raises(RuntimeError, match="Missing key.*weight"), pytest.warns(UserWarning, match="over-optimisation"):
        _validate(guard, module, _OtherRank(other_improved=False), 0.5, 1.0, step=2)


class _RankDiverging(Diverging):
    """Each rank logs its own held-out value (no `sync_dist`): rank 1 peaks one step later than rank 0."""

    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        return (self.weight * 0.0).sum()  # DDP cannot skip a step: a loss with no effect

    def validation_step(self, batch, batch_idx):
        step, peak = self.global_step, self.peak + self.global_rank
        self.log("val/gold", float(step if step <= peak else 2 * peak - step))


class _RecordGuard(L.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        torch.save({"step": trainer.global_step, "weight": pl_module.weight.detach().clone()},
                   f"{self.folder}/rank{trainer.global_rank}.pt")


def test_two_processes_stop_and_restore_together(tmp_path, monkeypatch):
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # spawned processes unpickle this module by name
    here = importlib.import_module("test_guard")
    guard = here.OverOptimizationGuard(heldout_metric="val/gold", patience=2, action="restore_best")
    trainer = L.Trainer(max_steps=12, val_check_interval=1, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, logger=False,
                        accelerator="cpu", strategy="ddp_spawn", devices=2, default_root_dir=tmp_path,
                        callbacks=[guard, here._RecordGuard(str(tmp_path))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(here._RankDiverging())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    # Mean over ranks: 1, 2, 3 (best, step 3), 3, 2, 1: diverging at steps 5 and 6, stop there, restore step 3.
    assert ranks[0]["step"] == ranks[1]["step"] == 6
    assert ranks[0]["weight"].item() == ranks[1]["weight"].item() == 3.0
