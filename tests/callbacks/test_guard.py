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
