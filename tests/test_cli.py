import csv
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sp_grpo.cli import cli_main, expected_warnings_ignored, main

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_config_parses_and_instantiates(tmp_path):
    # Every other YAML in configs/ names real weights; tests/test_configs.py parses those with loading mocked.
    cli = cli_main(["--config", str(ROOT / "configs/tiny.yaml"), "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.model is not None and cli.datamodule is not None


def test_fit_tiny_leaves_checkpoint_and_logs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config writes to runs/tiny relative to the working directory
    main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.max_steps", "2"])
    checkpoints = list(tmp_path.rglob("last.ckpt"))
    assert checkpoints
    state = torch.load(checkpoints[0], weights_only=True, map_location="cpu")
    assert state["global_step"] == 2
    assert state["state_dict"] and all("lora_" in k or k.startswith("rewards.") for k in state["state_dict"])
    (metrics,) = tmp_path.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert any(row.get("train/reward_weighted") for row in rows)


def test_console_script_runs_fit(tmp_path):
    script = Path(sys.executable).with_name("sp-grpo")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sp_grpo.cli"]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}  # warnings as a user sees them
    result = subprocess.run(
        [*command, "fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.max_steps", "2",
         "--trainer.enable_progress_bar", "false"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.rglob("last.ckpt"))
    # Two Lightning warnings the command expects (frozen networks in eval mode; a checkpoint after the
    # updates under manual optimization) are silenced where it runs, not by importing sp_grpo.
    assert "in eval mode at the start of training" not in result.stderr
    assert "ModelCheckpoint with manual optimization" not in result.stderr


def test_expected_warnings_are_ignored_only_inside_the_block():
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with expected_warnings_ignored():  # its filters come before "always"
            warnings.warn("Found 3 module(s) in eval mode at the start of training. This may ...")
            warnings.warn("Using ModelCheckpoint with manual optimization and every_n_train_steps, but no ...")
            warnings.warn("something else")
        warnings.warn("Found 3 module(s) in eval mode at the start of training, after the block")
    assert [str(w.message) for w in caught] == ["something else", "Found 3 module(s) in eval mode at the start of training, after the block"]
    assert warnings.filters == before


def _fit_tiny(*overrides):
    main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.enable_progress_bar", "false", *overrides])


def _training_rows(version: Path) -> list[str]:
    return [row["step"] for row in csv.DictReader((version / "metrics.csv").open()) if row.get("train/reward_weighted")]


def test_resume_only_when_asked_and_say_from_which_file_and_step(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the config writes to runs/tiny relative to the working directory
    logs, checkpoints = tmp_path / "runs/tiny/logs", tmp_path / "runs/tiny/checkpoints"
    _fit_tiny("--trainer.max_steps", "2", "--ckpt_path", "last")  # nothing to continue yet: a fresh start
    assert "[rank 0] sp-grpo fit: starts fresh at step 0 (`--ckpt_path last` found no checkpoint" in capsys.readouterr().out

    # The same config again, edited, without --ckpt_path: a fresh run, which says what it does not continue.
    _fit_tiny("--trainer.max_steps", "4")
    out = capsys.readouterr().out
    assert f"starts fresh at step 0 (no `--ckpt_path`), NOT from what an earlier run left: {checkpoints / 'last.ckpt'} (step 2)" in out
    assert _training_rows(logs / "version_1") == ["0", "1", "2", "3"]  # trained from step 0, not from step 2
    newest = checkpoints / "last-v1.ckpt"  # Lightning keeps the earlier run's last.ckpt
    assert torch.load(newest, weights_only=True)["global_step"] == 4

    _fit_tiny("--trainer.max_steps", "5", "--ckpt_path", "last")
    assert f"[rank 0] sp-grpo fit: RESUMES from {newest} at step 4 (`--ckpt_path last`)." in capsys.readouterr().out
    assert _training_rows(logs / "version_2") == ["4"]
