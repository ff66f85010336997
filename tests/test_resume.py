"""Exact resume: a run killed mid-way and resumed equals an uninterrupted run with the same seed."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: {steps}
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: run, name: logs, version: 0, flush_logs_every_n_steps: 1}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: run/checkpoints, save_last: true, every_n_train_steps: 1}}
    - class_path: lightning.pytorch.callbacks.OnExceptionCheckpoint
      init_args: {{dirpath: run/checkpoints}}
    - class_path: lightning.pytorch.callbacks.EMAWeightAveraging
      init_args: {{decay: 0.9}}
{weighting}
{extra}
  plugins:
    - class_path: sp_grpo.checkpoint.AtomicCheckpointIO
model:
  policy:
    class_path: sp_grpo.policies.TinyWanPolicy
  rewards: {rewards}
  group_size: 3
  sampler: {{num_steps: 3, num_frames: 5, height: 32, width: 32, guidance_scale: 2.0}}
  num_minibatches: 1
  micro_batch_size: 4
  learning_rate: 0.01
  lr_warmup_steps: 3
data:
  prompts: [a red square moving left, a blue circle moving right, a green ball moving up, a yellow box moving down, a white ring]
  batch_size: 2
"""


CURRICULUM = """    - class_path: sp_grpo.callbacks.SelfPacedCurriculum
      init_args: {warmup_steps: 2}"""
PAPER_WEIGHTING = """    - class_path: sp_grpo.callbacks.GroupRewardWeighting
      init_args: {calibrate: true, warmup_steps: 2, window: 3}"""


def run_fit(
    workdir: Path, steps: int, extra: str = "", ckpt_path: str | None = None, weighting: str = CURRICULUM
) -> subprocess.CompletedProcess:
    config = workdir / "config.yaml"
    rewards = ROOT / "configs/rewards/model_free.yaml"
    config.write_text(CONFIG.format(steps=steps, extra=extra, rewards=rewards, weighting=weighting))
    command = [sys.executable, "-m", "sp_grpo.cli", "fit", "--config", str(config)]
    if ckpt_path:
        command += ["--ckpt_path", ckpt_path]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, where="") -> None:
    """Recursive equality: tensors and floats allclose, everything else equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, (torch.Tensor, float)):
        torch.testing.assert_close(a, b, msg=lambda m: f"{where}: {m}")
    else:
        assert a == b, where


def assert_same_training_state(a: dict, b: dict, weighting: str = "SelfPacedCurriculum") -> None:
    assert a["global_step"] == b["global_step"]
    for key in ("state_dict", "current_model_state"):  # EMA weights, and the live weights
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], msg=lambda m: f"{key}/{name}: {m}")
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"])
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
    curriculum_a = next(v for k, v in a["callbacks"].items() if weighting in k)
    curriculum_b = next(v for k, v in b["callbacks"].items() if weighting in k)
    # One update per iteration, none lost or repeated (the weighting's history is bounded; it counts batches).
    assert curriculum_a.get("batches", len(curriculum_a["history"])) == b["global_step"]
    assert_same(curriculum_a, curriculum_b, "curriculum")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = run_fit(workdir, STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    return load(workdir / "run/checkpoints/last.ckpt")


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    extra = "    - class_path: tests.resume_helpers.SignalAfterSteps\n      init_args: {step: 4, signal_name: SIGKILL}"
    killed = run_fit(tmp_path, STEPS, extra)
    assert killed.returncode == -signal.SIGKILL
    logged = (tmp_path / "run/logs/version_0/metrics.csv").read_text().splitlines()
    assert len(logged) >= 4  # header + the steps before the kill: logs are flushed every step
    partial = load(tmp_path / "run/checkpoints/last.ckpt")
    assert 0 < partial["global_step"] < STEPS
    resumed = run_fit(tmp_path, STEPS, ckpt_path="last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training_state(load(tmp_path / "run/checkpoints/last.ckpt"), uninterrupted)
    assert (tmp_path / "run/logs/version_0/metrics.csv").exists()


def test_sigkill_then_resume_equals_uninterrupted_with_the_papers_weighting(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "killed").mkdir()
    full = run_fit(tmp_path / "full", STEPS, weighting=PAPER_WEIGHTING)
    assert full.returncode == 0, full.stderr[-3000:]
    extra = "    - class_path: tests.resume_helpers.SignalAfterSteps\n      init_args: {step: 4, signal_name: SIGKILL}"
    killed = run_fit(tmp_path / "killed", STEPS, extra, weighting=PAPER_WEIGHTING)
    assert killed.returncode == -signal.SIGKILL
    resumed = run_fit(tmp_path / "killed", STEPS, ckpt_path="last", weighting=PAPER_WEIGHTING)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = load(tmp_path / "killed/run/checkpoints/last.ckpt")
    assert_same_training_state(final, load(tmp_path / "full/run/checkpoints/last.ckpt"), "GroupRewardWeighting")
    state = next(v for k, v in final["callbacks"].items() if "GroupRewardWeighting" in k)
    assert len(state["history"]) == 3 and state["levels"] != [0.75, 0.75, 0.75]  # calibrated, bounded


def test_sigterm_leaves_a_checkpoint_that_resumes(tmp_path, uninterrupted):
    extra = "    - class_path: tests.resume_helpers.SignalAfterSteps\n      init_args: {step: 3, signal_name: SIGTERM}"
    stopped = run_fit(tmp_path, STEPS, extra)
    assert "Received SIGTERM" in stopped.stderr  # Lightning stops after the batch (and exits with 0)
    assert load(tmp_path / "run/checkpoints/last.ckpt")["global_step"] < STEPS
    assert (tmp_path / "run/checkpoints/on_exception.ckpt").exists()
    assert load(tmp_path / "run/checkpoints/on_exception.ckpt")["global_step"] == 3
    resumed = run_fit(tmp_path, STEPS, ckpt_path=str(tmp_path / "run/checkpoints/on_exception.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training_state(load(tmp_path / "run/checkpoints/last.ckpt"), uninterrupted)


def test_exception_keeps_last_checkpoint_and_logs(tmp_path):
    extra = "    - class_path: tests.resume_helpers.RaiseAfterSteps\n      init_args: {step: 2}"
    crashed = run_fit(tmp_path, STEPS, extra)
    assert crashed.returncode != 0 and "planned failure" in crashed.stderr
    assert load(tmp_path / "run/checkpoints/last.ckpt")["global_step"] >= 1
    assert load(tmp_path / "run/checkpoints/on_exception.ckpt")["global_step"] == 2
    rows = (tmp_path / "run/logs/version_0/metrics.csv").read_text().splitlines()
    assert len(rows) >= 2  # header and at least one logged step survive the crash
