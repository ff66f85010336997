"""Two processes on the CPU (gloo): global statistics, identical curriculum weights, synchronized weights."""

import json
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


# Every sp_grpo callback in two processes, through on_fit_end, with a logger whose folder (`trainer.log_dir`)
# is a collective: a callback that reads it, or any other collective, on rank 0 alone hangs or crashes here.
SHAPES = ["a red square moving up", "a green ring moving left", "a blue plus moving down", "a yellow x moving right"]
CALLBACKS_CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  strategy: ddp
  devices: 2
  max_steps: 2
  log_every_n_steps: 1  # the curriculum plots its logged rows
  val_check_interval: 1
  limit_val_batches: 1
  num_sanity_val_steps: 0
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {out}, name: logs}}
  callbacks:
{callbacks}
    - class_path: tests.ddp_helpers.RecordCallbackStates
      init_args: {{out_dir: {out}}}
model:
  policy:
    class_path: sp_grpo.toy.ShapesWanPolicy
  rewards:
    class_path: sp_grpo.rewards.RewardSet
    init_args:
      rewards:
        fidelity: {{class_path: sp_grpo.toy.ShapesFidelity}}
        temporal: {{class_path: sp_grpo.toy.ShapesTemporal}}
        semantic: {{class_path: sp_grpo.toy.ShapesSemantic}}
  group_size: 2
  sampler: {{num_steps: 3, num_frames: 4, height: 16, width: 16, guidance_scale: 1.0}}
  micro_batch_size: 8
data:
  prompts: {prompts}
  val_prompts: {prompts}
  batch_size: 1
"""
CURRICULUM_RUN = """
    - class_path: sp_grpo.callbacks.SelfPacedCurriculum
      init_args: {warmup_steps: 1}
    - class_path: sp_grpo.toy.SampleVideos
      init_args: {prompts: [a red plus moving up, a blue x moving right], every_n_steps: 1, scale: 1}
    - class_path: sp_grpo.toy.GoldEvaluation
      init_args: {prompts: [a red plus moving up, a green ring moving down], seeds: 1}
"""
STATIC_RUN = """
    - class_path: sp_grpo.callbacks.StaticWeights
      init_args: {weights: {fidelity: 1.0, temporal: 1.0, semantic: 1.0}}
    - class_path: sp_grpo.callbacks.OverOptimizationGuard
      init_args: {heldout_metric: val/reward_weighted, patience: 1}
"""


def run_callbacks(workdir: Path, callbacks: str) -> tuple[list[dict], subprocess.CompletedProcess]:
    config = workdir / "config.yaml"
    config.write_text(CALLBACKS_CONFIG.format(out=workdir, callbacks=callbacks.strip("\n"), prompts=SHAPES))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "sp_grpo.cli", "fit", "--config", str(config)],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=300)  # a hang fails, too
    assert result.returncode == 0, result.stderr[-4000:]
    # Both ranks got past on_fit_end: the recorder writes in teardown, which comes after it.
    return [torch.load(workdir / f"rank{r}.pt", weights_only=True) for r in (0, 1)], result


@pytest.fixture(scope="module")
def curriculum_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ddp_curriculum")
    return workdir, *run_callbacks(workdir, CURRICULUM_RUN)


@pytest.fixture(scope="module")
def static_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ddp_static")
    return workdir, *run_callbacks(workdir, STATIC_RUN)


def _only_version(workdir: Path) -> Path:
    assert [p.name for p in (workdir / "logs").iterdir()] == ["version_0"]  # rank 1 made no folder of its own
    return workdir / "logs" / "version_0"


def test_self_paced_curriculum_plots_once_and_agrees_across_ranks(curriculum_run):
    workdir, ranks, _ = curriculum_run
    assert list(workdir.rglob("curriculum.png")) == [_only_version(workdir) / "curriculum.png"]
    first, second = (r["callbacks"]["SelfPacedCurriculum"] for r in ranks)
    assert len(first["history"]) == 2 and first["history"] == second["history"]


def test_sample_videos_writes_each_step_once(curriculum_run):
    workdir, ranks, _ = curriculum_run
    written = sorted(p.relative_to(workdir).as_posix() for p in workdir.rglob("*.gif"))
    assert written == [f"logs/version_0/samples/step_00000{s}.gif" for s in (0, 1, 2)]


def test_gold_evaluation_reports_once_with_the_same_numbers_on_both_ranks(curriculum_run):
    workdir, ranks, result = curriculum_run
    (report,) = workdir.rglob("gold.json")
    assert report == _only_version(workdir) / "gold.json"
    first, second = (r["callbacks"]["GoldEvaluation"]["results"] for r in ranks)
    assert sorted(first) == ["0", "2"] and first == second
    assert json.loads(report.read_text()) == first
    assert result.stdout.count("| all_correct |") == 1  # the table is printed by rank 0 only


def test_static_weights_runs_through_fit_end_on_both_ranks(static_run):
    workdir, ranks, _ = static_run
    assert (_only_version(workdir) / "metrics.csv").exists()
    assert ranks[0]["callbacks"]["StaticWeights"] == ranks[1]["callbacks"]["StaticWeights"]
    for name, value in ranks[0]["trainable"].items():
        torch.testing.assert_close(value, ranks[1]["trainable"][name], atol=1e-6, rtol=1e-5, msg=name)


def test_validation_metrics_are_the_mean_over_ranks(static_run):
    workdir, ranks, _ = static_run
    first, second = (r["validation"] for r in ranks)
    # Each rank validates its own prompt; logged with sync_dist, every rank holds the same mean.
    assert "val/reward_weighted" in first and first == second


def test_over_optimization_guard_keeps_one_state_across_ranks(static_run):
    workdir, ranks, _ = static_run
    first, second = (r["callbacks"]["OverOptimizationGuard"] for r in ranks)
    # Each rank validates its own prompt, so its logged `val/reward_weighted` differs; the guard decides on the mean.
    assert first["best_step"] is not None
    for key in ("best_heldout", "train_at_best", "best_step", "diverging", "tripped"):
        assert first[key] == second[key], key


GROUP_WEIGHTING_RUN = """
    - class_path: sp_grpo.callbacks.GroupRewardWeighting
      init_args: {calibrate: true, warmup_steps: 1, window: 2}
    - class_path: tests.ddp_helpers.RecordRanks
      init_args: {out_dir: STEPS_DIR}
"""


@pytest.fixture(scope="module")
def group_weighting_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ddp_group_weighting")
    (workdir / "steps").mkdir()
    ranks, _ = run_callbacks(workdir, GROUP_WEIGHTING_RUN.replace("STEPS_DIR", str(workdir / "steps")))
    steps = [torch.load(workdir / "steps" / f"rank{r}.pt", weights_only=True)["steps"] for r in (0, 1)]
    return ranks, steps


def test_group_weighting_calibrates_on_every_rank_and_weighs_each_ranks_own_groups(group_weighting_run):
    from sp_grpo.functional import group_reward_weights

    ranks, steps = group_weighting_run
    first, second = (r["callbacks"]["GroupRewardWeighting"] for r in ranks)
    assert first == second and first["batches"] == 2
    aspects = ("fidelity", "temporal", "semantic")
    history = []
    for step in range(2):
        # Independent reference: tau is the median of both ranks' earlier group means (0.75 before any).
        tau = torch.quantile(torch.cat(history, dim=1), 0.5, dim=1) if history else torch.full((3,), 0.75)
        means = []
        for rank in (0, 1):
            record = steps[rank][step]
            stacked = torch.stack([record["aspect_rewards"][a] for a in aspects])
            weights = dict(zip(aspects, group_reward_weights(stacked, 2, tau)))
            expected = clip_advantages(aggregate_advantages(record["aspect_rewards"], weights, 2), 5.0)
            torch.testing.assert_close(record["advantages"], expected, atol=1e-5, rtol=1e-5)
            means.append(stacked.reshape(3, -1, 2).mean(-1))
        history.append(torch.cat(means, dim=1))
    for name, value in ranks[0]["trainable"].items():
        torch.testing.assert_close(value, ranks[1]["trainable"][name], atol=1e-6, rtol=1e-5, msg=name)


def test_gathers_and_advantages_with_a_different_number_of_samples_on_each_rank(tmp_path):
    from tests.ddp_helpers import UNEVEN_GROUPS, uneven_rewards

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tests.ddp_helpers"]
    ranks = [subprocess.Popen([*command, str(r), str(tmp_path / "init"), str(tmp_path)], cwd=ROOT, env=env,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for rank in ranks:
        _, stderr = rank.communicate(timeout=300)  # a collective with mismatched sizes fails or hangs here
        assert rank.returncode == 0, stderr[-4000:]
    results = [torch.load(tmp_path / f"uneven{r}.pt", weights_only=True) for r in (0, 1)]
    rewards = [uneven_rewards(r) for r in (0, 1)]
    for result in results:  # every rank holds every rank's part, cut to its own length
        assert [p.shape for p in result["parts"]] == [(2, 6), (2, 2)]
        for part, own in zip(result["parts"], rewards):
            torch.testing.assert_close(part, torch.stack([own["fidelity"], own["temporal"]]), rtol=0, atol=0)
        assert result["smallest"] == 3
    # Independent reference: one process holding both ranks' samples, rank-major, then each rank's slice.
    combined = {a: torch.cat([rewards[0][a], rewards[1][a]]) for a in ("fidelity", "temporal")}
    sizes = [2 * g for g in UNEVEN_GROUPS]
    expected = clip_advantages(aggregate_advantages(combined, {"fidelity": 0.7, "temporal": 0.3}, 2, scale="batch"), 5.0)
    torch.testing.assert_close(torch.cat([r["advantages"] for r in results]), expected)
    per_group = {"fidelity": torch.cat([r["per_group"] for r in results]), "temporal": 0.5}
    weighted = clip_advantages(aggregate_advantages(combined, per_group, 2, scale="batch"), 5.0)
    torch.testing.assert_close(torch.cat([r["group_weighted"] for r in results]), weighted)
    assert [len(r["advantages"]) for r in results] == sizes
