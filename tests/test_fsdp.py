"""FSDP in two CPU processes (gloo): the same weights as DDP, LoRA and full fine-tuning, and exact resume.

Both strategies see the same prompts, rollout noise and advantages, and both average gradients
over the ranks, so after a few steps the trained weights must agree up to float rounding. The
runs use what makes FSDP hard: the transformer blocks as nested FSDP units, activation
checkpointing, a KL term (a second, no-grad forward of the reference), gradient accumulation over
micro-batches and clipping by the global norm.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 2
  strategy: {strategy}
  max_steps: {max_steps}
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {out}
  callbacks:
    - class_path: sp_grpo.callbacks.SelfPacedCurriculum
      init_args: {{warmup_steps: 1}}
    - class_path: tests.ddp_helpers.RecordRanks
      init_args: {{out_dir: {out}}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true, every_n_train_steps: 1}}
model:
  policy:
    class_path: sp_grpo.policies.TinyWanPolicy
    init_args: {{lora_rank: {lora_rank}, reference_copy: {reference_copy}, gradient_checkpointing: true}}
  rewards: {rewards}
  group_size: 3
  advantage_scale: batch
  sampler: {{num_steps: 3, num_frames: 5, height: 32, width: 32, guidance_scale: 2.0}}
  micro_batch_size: 2
  learning_rate: 0.01
  max_grad_norm: 0.05
  kl_coef: 0.1
data:
  prompts: [a red square moving left, a blue circle moving right, a green ball moving up, a yellow box moving down]
  batch_size: 2
"""


def fsdp(state_dict_type: str) -> str:
    blocks = "diffusers.models.transformers.transformer_wan.WanTransformerBlock"
    return (f"{{class_path: tests.ddp_helpers.CPUFSDPStrategy, init_args: {{auto_wrap_policy: [{blocks}],"
            f" state_dict_type: {state_dict_type}, process_group_backend: gloo}}}}")


def fit(workdir: Path, strategy: str, lora: bool, max_steps: int = 3, resume: bool = False) -> dict:
    """Run ``sp-grpo fit`` in two processes; returns what rank 0 recorded (``steps``, final ``trainable``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.yaml"
    config.write_text(CONFIG.format(
        out=workdir, strategy=strategy, max_steps=max_steps, lora_rank=4 if lora else "null",
        reference_copy=str(not lora).lower(), rewards=ROOT / "configs/rewards/model_free.yaml",
    ))
    command = [sys.executable, "-m", "sp_grpo.cli", "fit", "--config", str(config)]
    if resume:
        command += ["--ckpt_path", "last"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(workdir / "rank0.pt", weights_only=True)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_fsdp_trains_the_same_weights_as_ddp(tmp_path, lora):
    ddp = fit(tmp_path / "ddp", "ddp", lora)["trainable"]
    sharded = fit(tmp_path / "fsdp", fsdp("full"), lora)["trainable"]
    weights = {name for name in sharded if name.startswith("policy.")}  # the rest are the rewards' buffers
    assert weights == ddp.keys() and ddp
    assert all("lora_" in name for name in weights) == lora  # frozen weights are left out of checkpoints
    for name in ddp:
        torch.testing.assert_close(sharded[name], ddp[name], atol=1e-5, rtol=1e-4, msg=name)
    if lora:
        assert all(ddp[name].abs().sum() > 0 for name in ddp if "lora_B" in name)  # every adapter moved off zero


@pytest.mark.parametrize("state_dict_type", ["sharded", "full"])
def test_fsdp_resumes_exactly(tmp_path, state_dict_type):
    straight = fit(tmp_path / "straight", fsdp(state_dict_type), lora=True, max_steps=3)["trainable"]
    fit(tmp_path / "resumed", fsdp(state_dict_type), lora=True, max_steps=2)
    # sharded: a torch.distributed.checkpoint folder; full: one file gathered on rank 0
    assert (tmp_path / "resumed/checkpoints/last.ckpt").is_dir() == (state_dict_type == "sharded")
    record = fit(tmp_path / "resumed", fsdp(state_dict_type), lora=True, max_steps=3, resume=True)
    assert len(record["steps"]) == 1  # it went on from step 2, not from scratch
    resumed = record["trainable"]
    assert resumed.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=1e-5, msg=name)


def test_shard_wraps_the_large_networks_and_moves_the_rest():
    from sp_grpo.policies import TinyWanPolicy

    policy = TinyWanPolicy(seed=0, lora_rank=4, gradient_checkpointing=True)
    wrapped = []
    policy.shard(lambda network: wrapped.append(network) or network, torch.device("meta"))
    assert wrapped == [policy.transformer, policy.text_encoder]
    assert policy.transformer.is_gradient_checkpointing  # no FSDP units inside: diffusers' checkpointing stays
    tensors = [*policy.named_parameters(), *policy.named_buffers()]
    rest = [(name, t) for name, t in tensors if not name.startswith(("transformer.", "text_encoder."))]
    assert any(name == "latents_mean" for name, _ in rest)  # the policy's own buffers, not only its children
    assert rest and all(t.device.type == "meta" for _, t in rest)


def test_fsdp_refuses_weight_averaging():
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from sp_grpo import SelfPacedGRPO
    from sp_grpo.fsdp import shard_policy
    from sp_grpo.policies import TinyWanPolicy
    from sp_grpo.rewards import RewardSet, Sharpness

    module = SelfPacedGRPO(TinyWanPolicy(seed=0), RewardSet({"sharp": Sharpness()}), group_size=2)
    module.trainer = L.Trainer(callbacks=[EMAWeightAveraging()], logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="WeightAveraging.*strategy: ddp"):
        shard_policy(module, module.trainer.strategy)
