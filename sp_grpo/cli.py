"""The ``sp-grpo`` command: LightningCLI's ``fit`` / ``validate``, ``score`` for a folder of videos, and
``sample`` / ``export`` for a trained checkpoint (:mod:`sp_grpo.sample`, :mod:`sp_grpo.export`).

Every setting is an ``__init__`` argument of :class:`~sp_grpo.SelfPacedGRPO`,
:class:`~sp_grpo.data.PromptDataModule`, a policy, a reward or a callback; LightningCLI reads the
typed signatures, so ``sp-grpo fit --help`` (and ``--model.help CLASS``) is the configuration
reference.

``fit`` resumes only when asked. Lightning's own ``fit(ckpt_path=None)`` restores the newest
``last``/``on_exception`` checkpoint whenever an ``OnExceptionCheckpoint`` is configured, as the shipped
configs do, so re-running an edited config would silently continue the old run. Here no
``--ckpt_path`` starts fresh, ``--ckpt_path last`` continues (and starts fresh when there is nothing
to continue, so a job script for preemptible machines can always pass it), and every rank prints one
line saying which it does: the file and the step, or that it starts at step 0.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment

from sp_grpo.checkpoint import CheckpointError, inspect_checkpoint

# Two Lightning warnings that every `sp-grpo fit` run would print and that only confuse: the frozen VAE
# and text encoder are kept in eval mode on purpose, and with manual optimization a checkpoint holds the
# weights after the iteration's updates, which is what resuming needs. Ignored while the command runs.
EXPECTED_WARNINGS = (
    r".*module\(s\) in eval mode at the start of training.*",
    r".*ModelCheckpoint with manual optimization.*",
)


@contextmanager
def expected_warnings_ignored() -> Iterator[None]:
    """Ignore :data:`EXPECTED_WARNINGS` inside the block; the warning filters are restored afterwards."""
    with warnings.catch_warnings():
        for message in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


def last_checkpoints(trainer: pl.Trainer) -> list[Path]:
    """Existing ``last*.ckpt`` and ``on_exception.ckpt`` files of the trainer's checkpoint callbacks, newest first.

    The same candidates as Lightning's ``ckpt_path="last"``, found the same way; a sharded checkpoint
    is a folder.
    """
    found: set[Path] = set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, OnExceptionCheckpoint):
            found.add(Path(callback.ckpt_path))
        elif isinstance(callback, ModelCheckpoint):
            # Lightning's own lookup, which also finds the folder of a callback without `dirpath`.
            found.update(map(Path, callback._find_last_checkpoints(trainer)))  # noqa: SLF001
    return sorted((p for p in found if p.exists()), key=lambda p: p.stat().st_mtime, reverse=True)


def _slurm_requeue_checkpoint(trainer: pl.Trainer) -> str | None:
    # Lightning's SLURM auto-requeue saves `hpc_ckpt_<n>.ckpt` on SIGUSR1, requeues the same command and
    # expects `ckpt_path=None` to pick it up: that is the same job continuing, so it still resumes (loudly).
    if not SLURMEnvironment.detect():
        return None
    return trainer._checkpoint_connector._hpc_resume_path  # noqa: SLF001 - Lightning's own lookup of those files


class SelfPacedCLI(LightningCLI):
    """LightningCLI whose ``fit`` resumes only from ``--ckpt_path``, checks that file first and says what it does."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc") and not ckpt_path.startswith("registry"):
            # LightningCLI reads the file next (for its hyperparameters) with torch's own error; check it first.
            inspect_checkpoint(ckpt_path)

    def fit(self, model: pl.LightningModule, ckpt_path: str | None = None, **kwargs: Any) -> None:
        trainer = self.trainer
        if ckpt_path is None:
            ckpt_path, source = _slurm_requeue_checkpoint(trainer), "Lightning's SLURM requeue checkpoint"
            fresh_because = "no `--ckpt_path`"
        elif ckpt_path == "last":
            newest = last_checkpoints(trainer)
            ckpt_path, source = (str(newest[0]) if newest else None), "`--ckpt_path last`"
            fresh_because = "`--ckpt_path last` found no checkpoint to continue"
        else:
            source = "`--ckpt_path`"
        if ckpt_path is None:
            self._fit_fresh(model, fresh_because, **kwargs)
            return
        if ckpt_path in ("best", "hpc") or ckpt_path.startswith("registry"):
            self._say(f"resumes from `--ckpt_path {ckpt_path}`, as Lightning resolves it.")
        else:
            step = inspect_checkpoint(ckpt_path, model)  # fails here, before any callback can write a file
            self._say(f"RESUMES from {ckpt_path} at step {step} ({source}).")
        trainer.fit(model, ckpt_path=ckpt_path, **kwargs)

    def _fit_fresh(self, model: pl.LightningModule, because: str, **kwargs: Any) -> None:
        left = last_checkpoints(self.trainer)
        if left:
            callbacks = self.trainer.checkpoint_callbacks
            exceptional = {Path(cb.ckpt_path) for cb in callbacks if isinstance(cb, OnExceptionCheckpoint)}
            removed = [p.name for p in left if p in exceptional]
            self._say(
                f"starts fresh at step 0 ({because}), NOT from what an earlier run left: "
                + ", ".join(f"{p} (step {_step_or_unknown(p)})" for p in left)
                + (f"; OnExceptionCheckpoint deletes {removed[0]} when this run ends" if removed else "")
                + ". To continue that run instead, stop now and pass `--ckpt_path last`."
            )
        else:
            self._say(f"starts fresh at step 0 ({because}).")
        # Lightning would turn `ckpt_path=None` into "last" (CheckpointConnector._parse_ckpt_path) because an
        # OnExceptionCheckpoint is configured; a user-managed empty path is how to ask it for no checkpoint.
        connector = self.trainer._checkpoint_connector  # noqa: SLF001
        connector._ckpt_path, connector._user_managed = None, True  # noqa: SLF001
        try:
            self.trainer.fit(model, ckpt_path=None, **kwargs)
        finally:
            connector._user_managed = False  # noqa: SLF001

    def _say(self, message: str) -> None:
        # Every rank is its own process with its own output under DDP: each says what it loads.
        print(f"[rank {self.trainer.global_rank}] sp-grpo fit: {message}", flush=True)


def _step_or_unknown(path: Path) -> str:
    try:
        return str(inspect_checkpoint(path))
    except CheckpointError:
        return "unreadable"


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the Lightning CLI.

    Args:
        args: Command-line arguments without the program name; ``None`` reads ``sys.argv``.
        run: Run the subcommand (``fit``, ``validate``); ``False`` only parses and instantiates.

    Two expected Lightning warnings are ignored while it runs (:data:`EXPECTED_WARNINGS`).

    Raises:
        CheckpointError: If ``--ckpt_path`` names a missing, unreadable or foreign checkpoint.
    """
    from sp_grpo.data.prompts import PromptDataModule
    from sp_grpo.module import SelfPacedGRPO

    with expected_warnings_ignored():
        return SelfPacedCLI(
            SelfPacedGRPO,
            PromptDataModule,
            args=args,
            run=run,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sp-grpo`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "score":
        from sp_grpo.scoring import score_main

        return score_main(args[1:])
    if args and args[0] == "export":
        from sp_grpo.export import export_main

        return export_main(args[1:])
    if args and args[0] == "sample":
        from sp_grpo.sample import sample_main

        return sample_main(args[1:])
    try:
        # Given no list, LightningCLI reads sys.argv itself (and warns when given both).
        cli_main(None if argv is None else args)
    except CheckpointError as err:
        print(f"sp-grpo: error: {err}", file=sys.stderr)  # one line, not torch's traceback
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
