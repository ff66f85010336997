"""Callbacks that fault a training run on purpose; imported by the CLI in subprocesses of test_resume."""

import os
import signal

import lightning as L


class SignalAfterSteps(L.Callback):
    """Send ``signal_name`` to this very process once ``global_step`` reaches ``step``."""

    def __init__(self, step: int, signal_name: str = "SIGKILL") -> None:
        self.step = step
        self.signal_name = signal_name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class RaiseAfterSteps(L.Callback):
    """Raise an error once ``global_step`` reaches ``step`` (a crash inside training)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise RuntimeError(f"planned failure at step {trainer.global_step}")
