"""Each efficiency switch is used when on: counted forward passes, calls and tensor modes."""

import pytest
import torch

from sp_grpo.functional.advantages import group_advantages
from sp_grpo.module import SelfPacedGRPO
from sp_grpo.policies import TinyWanPolicy
from sp_grpo.rewards import RewardSet, Sharpness
from sp_grpo.rollout import DenoisingConfig, sample_rollout

SAMPLER = DenoisingConfig(num_steps=4, num_frames=5, height=32, width=32, guidance_scale=3.0)
PROMPTS = ["a red square", "a blue circle"]


def _spy_forward(policy):
    calls = []
    handle = policy.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((kwargs["hidden_states"].shape[0], torch.is_inference_mode_enabled())), with_kwargs=True
    )
    return calls, handle


@pytest.mark.parametrize("batched, expected_calls", [(True, 4), (False, 8)])
def test_guidance_halves_run_in_one_forward_when_batched(batched, expected_calls):
    policy = TinyWanPolicy(cfg_batched=batched)
    calls, handle = _spy_forward(policy)
    sample_rollout(policy, PROMPTS, 2, SAMPLER, generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert len(calls) == expected_calls
    assert all(batch == (8 if batched else 4) for batch, _ in calls)


@pytest.mark.parametrize("inference_mode", [True, False])
def test_rollout_runs_under_inference_mode(inference_mode):
    policy = TinyWanPolicy()
    calls, handle = _spy_forward(policy)
    rollout = sample_rollout(policy, PROMPTS, 2, SAMPLER, generator=torch.Generator().manual_seed(0), inference_mode=inference_mode)
    handle.remove()
    assert all(mode == inference_mode for _, mode in calls)
    assert not rollout.latents.is_inference() and not rollout.embeds.cond.is_inference()
    reference = sample_rollout(policy, PROMPTS, 2, SAMPLER, generator=torch.Generator().manual_seed(0), inference_mode=not inference_mode)
    torch.testing.assert_close(rollout.latents, reference.latents)


def test_vae_decodes_in_chunks():
    from sp_grpo.policies import tiny_wan_components
    from sp_grpo.policies.wan import WanPolicy

    policy = WanPolicy(components=tiny_wan_components(0), lora_rank=4, max_sequence_length=16, decode_chunk_size=2)
    sizes = []
    original = policy.vae.decode
    policy.vae.decode = lambda z, **kw: sizes.append(z.shape[0]) or original(z, **kw)
    policy.decode(torch.randn(5, *policy.latent_shape(5, 32, 32)))
    assert sizes == [2, 2, 1]


def _module(**sampler):
    config = DenoisingConfig(**{**SAMPLER.__dict__, **sampler})
    policy = TinyWanPolicy(cfg_batched=True)  # the counts below are of batched guidance passes
    return SelfPacedGRPO(policy, RewardSet({"sharp": Sharpness()}), group_size=4, sampler=config, micro_batch_size=3)


def test_step_window_trains_only_its_steps_and_samples_ode_elsewhere():
    module = _module(train_steps="window", window_size=1, window_placement="fixed", window_start=2)
    rollout = sample_rollout(module.policy, PROMPTS, 4, module.sampler, generator=torch.Generator().manual_seed(0))
    assert rollout.stochastic.tolist() == [False, False, True, False]
    calls, handle = _spy_forward(module.policy)
    module.accumulate_gradients(rollout, group_advantages(torch.rand(8), 4), rollout.train_mask.nonzero())
    handle.remove()
    # 8 trained pairs (one step per sample), micro-batches of 3 pairs, guidance batched (x2).
    assert [batch for batch, _ in calls] == [6, 6, 4]


def test_micro_batch_size_is_independent_of_group_size():
    module = _module()
    rollout = sample_rollout(module.policy, PROMPTS, 4, module.sampler, generator=torch.Generator().manual_seed(0))
    calls, handle = _spy_forward(module.policy)
    module.accumulate_gradients(rollout, group_advantages(torch.rand(8), 4), rollout.train_mask.nonzero())
    handle.remove()
    assert max(batch for batch, _ in calls) == 2 * module.micro_batch_size  # 32 pairs, never a whole group at once
    assert sum(batch for batch, _ in calls) == 2 * 8 * 4
