"""The on-policy update through the rollout's own forward passes (``model.reuse_rollout_forward``).

The reference is the recomputing update (``accumulate_gradients`` over the trained pairs, which
runs the network again on every pair): both must give the same gradient, loss and KL, for every way
of choosing the trained steps, while the network runs once per trained pair instead of twice.
"""

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from sp_grpo.data import PromptDataModule
from sp_grpo.functional.advantages import group_advantages
from sp_grpo.functional.ppo import rollout_graph_update
from sp_grpo.module import SelfPacedGRPO
from sp_grpo.policies import TinyWanPolicy
from sp_grpo.rewards import RewardSet, Sharpness
from sp_grpo.rollout import DenoisingConfig, sample_rollout

PROMPTS = ["a red square", "a blue circle"]
STEPS = {
    "all": dict(train_steps="all"),
    "random": dict(train_steps="random", train_fraction=0.5),
    "window": dict(train_steps="window", window_size=2, window_placement="fixed", window_start=1),
}


def _module(train_steps="all", kind="sde", guidance=3.0, **overrides):
    sampler = DenoisingConfig(
        num_steps=4, num_frames=5, height=32, width=32, guidance_scale=guidance, sde_kind=kind, **STEPS[train_steps]
    )
    settings = dict(group_size=2, sampler=sampler, kl_coef=0.1, clip_range=0.01) | overrides
    module = SelfPacedGRPO(TinyWanPolicy(seed=0, lora_rank=4), RewardSet({"sharp": Sharpness()}), **settings)
    torch.manual_seed(1)
    with torch.no_grad():  # move LoRA off its zero start, so the KL and every gradient are non-zero
        for weight in module.policy.trainable_parameters():
            weight.add_(0.05 * torch.randn_like(weight))
    return module


def _rollouts(module, seed=0):
    plain = sample_rollout(module.policy, PROMPTS, 2, module.sampler, generator=torch.Generator().manual_seed(seed))
    kept = sample_rollout(module.policy, PROMPTS, 2, module.sampler, generator=torch.Generator().manual_seed(seed), keep_graph=True)
    return plain, kept


def _grads(module):
    grads = [w.grad.clone() for w in module.policy.trainable_parameters()]
    module.policy.zero_grad(set_to_none=True)
    return grads


def _graph_update(module, rollout, advantages):
    settings = dict(sampler=module.sampler, clip_range=module.clip_range, kl_coef=module.kl_coef)
    return rollout_graph_update(module.policy, rollout, advantages, lambda: None, backward=torch.Tensor.backward, **settings)


@pytest.mark.parametrize("train_steps", list(STEPS))
def test_keeping_the_graph_samples_the_same_rollout(train_steps):
    module = _module(train_steps)
    plain, kept = _rollouts(module)
    assert plain.graph is None
    assert torch.equal(plain.train_mask, kept.train_mask)
    # all rows in one pass (all, window) is the same computation; a subset in two passes may round differently
    exact = train_steps != "random"
    torch.testing.assert_close(kept.latents, plain.latents, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-5)
    torch.testing.assert_close(kept.log_probs, plain.log_probs, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-5)
    trained_steps = sorted(plain.train_mask.any(dim=0).nonzero().flatten().tolist())
    assert sorted(kept.graph) == trained_steps
    for step, part in kept.graph.items():
        assert part.rows.tolist() == plain.train_mask[:, step].nonzero().flatten().tolist()
        assert part.log_prob.requires_grad and part.prev_mean.requires_grad and not part.std.requires_grad
        torch.testing.assert_close(part.log_prob.detach(), kept.log_probs[part.rows, step], rtol=0, atol=0)


@pytest.mark.parametrize("train_steps", list(STEPS))
def test_update_through_the_graph_equals_the_recomputed_update(train_steps):
    module = _module(train_steps)
    plain, kept = _rollouts(module)
    advantages = group_advantages(torch.tensor([0.3, 0.9, 0.1, 0.5]), 2)
    module.micro_batch_size = 5
    want = module.accumulate_gradients(plain, advantages, plain.train_mask.nonzero())
    want_grads = _grads(module)
    got = _graph_update(module, kept, advantages)
    got_grads = _grads(module)
    assert kept.graph is None  # spent: the backward freed its activations
    for g, w in zip(got_grads, want_grads):
        assert w.norm() > 0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))
    torch.testing.assert_close(got["kl_ref"], want["kl_ref"], rtol=1e-4, atol=0)
    assert float(got["kl_ref"]) > 0
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-3, atol=1e-7)
    assert got["trained_pairs"] == plain.train_mask.sum() and float(got["first_log_ratio_abs_max"]) == 0.0
    assert float(got["ratio_mean"]) == 1.0 and float(got["clip_frac"]) == 0.0


def test_pairs_dropped_after_sampling_are_not_trained():
    module = _module()
    plain, kept = _rollouts(module)
    dropped = torch.tensor([True, True, False, False]).unsqueeze(1)  # the first group, as a NaN reward drops it
    plain.train_mask &= dropped
    kept.train_mask &= dropped
    advantages = group_advantages(torch.tensor([0.3, 0.9, 0.1, 0.5]), 2)
    module.accumulate_gradients(plain, advantages, plain.train_mask.nonzero())
    want = _grads(module)
    got = _graph_update(module, kept, advantages)
    for g, w in zip(_grads(module), want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))
    assert got["trained_pairs"] == 8


def test_a_deterministic_last_step_keeps_no_graph_and_nothing_left_takes_no_step():
    module = _module(kind="cps")  # CPS's last step goes to sigma 0: no noise, no likelihood
    _, kept = _rollouts(module)
    assert sorted(kept.graph) == [0, 1, 2] and not kept.train_mask[:, 3].any()
    kept.train_mask[:] = False  # every group dropped
    steps = []
    settings = dict(sampler=module.sampler, clip_range=module.clip_range, kl_coef=module.kl_coef)
    stats = rollout_graph_update(module.policy, kept, torch.zeros(4), lambda: steps.append(1), backward=torch.Tensor.backward, **settings)
    assert steps == [] and float(stats["loss"]) == 0.0 and all(w.grad is None for w in module.policy.trainable_parameters())


def _forward_rows(module, **fit_kwargs):
    rows = []
    module.policy.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: rows.append((torch.is_grad_enabled(), kwargs["hidden_states"].shape[0])), with_kwargs=True
    )
    return rows


def _fit(module, steps=2):
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=PromptDataModule(prompts=PROMPTS, batch_size=2, shuffle=False))
    return trainer


def test_reusing_the_rollout_forward_trains_like_recomputing_it_under_a_trainer():
    reused, recomputed = _module("window", guidance=1.0, reuse_rollout_forward=True), _module("window", guidance=1.0)
    assert reused.reuses_rollout_forward and not recomputed.reuses_rollout_forward  # off unless set
    rows = _forward_rows(reused)
    _fit(reused, steps=1)
    # 4 samples: 4 rollout steps (the 2 window steps with autograd), then the reference on the 2 x 4 trained pairs
    assert rows == [(False, 4), (True, 4), (True, 4), (False, 4), (False, 4), (False, 4)]
    _fit(recomputed, steps=1)
    reused_weights = list(reused.policy.trainable_parameters())
    for got, want in zip(reused_weights, recomputed.policy.trainable_parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    start = _module("window", guidance=1.0)
    assert any(not torch.equal(a, b) for a, b in zip(reused_weights, start.policy.trainable_parameters()))  # it did train


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"reuse_rollout_forward": "auto"}, r"`model.reuse_rollout_forward` \('auto'\) must be true or false"),
        (
            {"reuse_rollout_forward": True, "num_inner_epochs": 2},
            r"`model.reuse_rollout_forward: true` needs an on-policy update \(`model.num_inner_epochs` 1 and `model.num_minibatches` 1, here 2 and 1\)",
        ),
    ],
)
def test_reuse_rollout_forward_setting_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        _module(**overrides)


@pytest.mark.parametrize("inference_mode", [True, False])
def test_a_rollout_without_the_graph_records_no_autograd_graph(inference_mode):
    module = _module()
    rows = _forward_rows(module)
    sampler = module.sampler
    rollout = sample_rollout(module.policy, PROMPTS, 2, sampler, generator=torch.Generator().manual_seed(0), inference_mode=inference_mode)
    assert rows == [(False, 8)] * 4  # guidance batched (2 x 4 rows); `rollout_inference_mode: false` is no_grad, not autograd
    assert rollout.graph is None and not rollout.log_probs.requires_grad


def test_several_processes_recompute_with_a_warning(monkeypatch):
    module = _module(reuse_rollout_forward=True)
    monkeypatch.setattr(SelfPacedGRPO, "_strategy", property(lambda self: SimpleNamespace(world_size=2)))
    with pytest.warns(UserWarning, match=r"`model.reuse_rollout_forward: true` applies in one process without FSDP only"):
        assert module.reuses_rollout_forward is False
