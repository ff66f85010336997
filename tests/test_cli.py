import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sp_grpo.cli import cli_main, main

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
    result = subprocess.run(
        [*command, "fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.max_steps", "1",
         "--trainer.enable_progress_bar", "false"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.rglob("last.ckpt"))
