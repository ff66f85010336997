"""Two processes on the CPU (gloo): global statistics, identical curriculum weights, synchronized weights."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sp_grpo.functional.advantages import aggregate_advantages, clip_advantages

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  strategy: ddp
  devices: 2
  max_steps: 3
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: sp_grpo.callbacks.SelfPacedCurriculum
      init_args: {{warmup_steps: 1}}
    - class_path: tests.ddp_helpers.RecordRanks
      init_args: {{out_dir: {out}}}
model:
  policy:
    class_path: sp_grpo.policies.TinyWanPolicy
  rewards: {rewards}
  group_size: 3
  advantage_scale: batch
  sampler: {{num_steps: 3, num_frames: 5, height: 32, width: 32, guidance_scale: 2.0}}
  micro_batch_size: 4
  learning_rate: 0.01
data:
  prompts: [a red square moving left, a blue circle moving right, a green ball moving up, a yellow box moving down]
  batch_size: 2
"""


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ddp")
    config = workdir / "config.yaml"
    config.write_text(CONFIG.format(out=workdir, rewards=ROOT / "configs/rewards/model_free.yaml"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "sp_grpo.cli", "fit", "--config", str(config)],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(workdir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_ranks_see_different_prompts_and_share_global_advantages(ranks):
    for step0, step1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert not set(step0["prompts"]) & set(step1["prompts"])  # groups never span ranks
        assert step0["weights_used"] == step1["weights_used"]
        assert not torch.equal(step0["aspect_rewards"]["fidelity"], step1["aspect_rewards"]["fidelity"])
        # Independent reference: one process holding both ranks' samples, rank-major.
        combined = {a: torch.cat([step0["aspect_rewards"][a], step1["aspect_rewards"][a]]) for a in step0["aspect_rewards"]}
        expected = clip_advantages(aggregate_advantages(combined, step0["weights_used"], 3, scale="batch", eps=1e-4), 5.0)
        torch.testing.assert_close(torch.cat([step0["advantages"], step1["advantages"]]), expected)
        # ... which differs from what either rank would compute from its own samples alone.
        alone = clip_advantages(aggregate_advantages(step0["aspect_rewards"], step0["weights_used"], 3, scale="batch", eps=1e-4), 5.0)
        assert not torch.allclose(alone, step0["advantages"])


def test_curriculum_weights_identical_on_both_ranks(ranks):
    assert [s["weights_next"] for s in ranks[0]["steps"]] == [s["weights_next"] for s in ranks[1]["steps"]]


def test_trainable_parameters_identical_on_both_ranks(ranks):
    first, second = ranks[0]["trainable"], ranks[1]["trainable"]
    assert first.keys() == second.keys() and first
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(v.abs().sum() > 0 for k, v in first.items() if "lora_B" in k)  # training moved the weights
