"""``sp-grpo fit`` itself, the console script, in two processes (DDP on gloo) on the shipped configs.

Each run is in a fresh folder with a copy of ``configs/``, so the configs' relative output paths
(``runs/tiny``, ``runs/demo``) land there. A test-only callback saves each rank's trainable weights
in ``teardown``, after ``on_fit_end``, so its two files show that both ranks got through the end.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TWO_PROCESSES = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
                 "--trainer.enable_progress_bar", "false"]


def sp_grpo_fit(workdir: Path, config: str, *overrides: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    shutil.copytree(ROOT / "configs", workdir / "configs")
    script = Path(sys.executable).with_name("sp-grpo")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sp_grpo.cli"]
    record = ["--trainer.callbacks+", "tests.ddp_helpers.RecordCallbackStates", "--trainer.callbacks.out_dir", str(workdir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, "fit", "--config", config, *TWO_PROCESSES, *overrides, *record],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result, [torch.load(workdir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def assert_same_trainable_weights(ranks: list[dict]) -> dict:
    first, second = ranks[0]["trainable"], ranks[1]["trainable"]
    assert first and first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=1e-6, rtol=1e-5, msg=name)
    return first


def test_fit_tiny_config_in_two_processes(tmp_path):
    result, ranks = sp_grpo_fit(tmp_path, "configs/tiny.yaml", "--trainer.max_steps", "4")
    for rank in (0, 1):
        assert result.stdout.count(f"[rank {rank}] sp-grpo fit: starts fresh at step 0") == 1
    trainable = assert_same_trainable_weights(ranks)
    assert any(value.abs().sum() > 0 for name, value in trainable.items() if "lora_B" in name)  # training moved them
    # Each output once: one log version (rank 1 made none), no leftover on_exception.ckpt; one batch per rank
    # and epoch (4 prompts, 2 per batch, 2 ranks), so step 4 ends epoch 3.
    assert files_under(tmp_path / "runs/tiny") == [
        "checkpoints/epoch=3-step=4.ckpt", "checkpoints/last.ckpt",
        "logs/version_0/config.yaml", "logs/version_0/curriculum.png", "logs/version_0/hparams.yaml",
        "logs/version_0/metrics.csv",
    ]
    last = torch.load(tmp_path / "runs/tiny/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    for name, value in trainable.items():  # the checkpoint holds what both ranks trained
        torch.testing.assert_close(last["state_dict"][name], value)


def test_fit_demo_config_shortened_in_two_processes(tmp_path):
    result, ranks = sp_grpo_fit(tmp_path, "configs/demo.yaml", "--trainer.max_steps", "2", "--model.group_size", "2",
                                "--data.batch_size", "2")
    trainable = assert_same_trainable_weights(ranks)
    assert len(trainable) > 10 and not any("lora" in name for name in trainable)  # full fine-tuning
    assert ranks[0]["callbacks"]["GoldEvaluation"] == ranks[1]["callbacks"]["GoldEvaluation"]
    files = files_under(tmp_path / "runs/demo")
    assert [f for f in files if not f.startswith("tensorboard/")] == [
        "checkpoints/last.ckpt", "logs/version_0/config.yaml", "logs/version_0/curriculum.png", "logs/version_0/gold.json",
        "logs/version_0/hparams.yaml", "logs/version_0/metrics.csv",
        "logs/version_0/samples/step_000000.gif", "logs/version_0/samples/step_000002.gif",
    ]
    events = [f for f in files if f.startswith("tensorboard/")]
    assert len(events) == 2 and all(f.startswith("tensorboard/version_0/") for f in events)  # events + hparams
    assert result.stdout.count("| all_correct |") == 1  # the gold table, printed by rank 0
