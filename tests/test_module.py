import lightning as L
import pytest
import torch

from sp_grpo.data import PromptDataModule
from sp_grpo.functional.advantages import group_advantages
from sp_grpo.module import SelfPacedGRPO
from sp_grpo.policies import TinyWanPolicy
from sp_grpo.rewards import ColorPromptAlignment, RewardSet, Sharpness, TemporalFlickering
from sp_grpo.rollout import DenoisingConfig, sample_rollout

PROMPTS = ["a red square moving left", "a blue circle moving right", "a green ball moving up", "a yellow box"]


def make_module(**overrides):
    kwargs = dict(
        group_size=4,
        sampler=DenoisingConfig(num_steps=4, num_frames=5, height=32, width=32, guidance_scale=2.0),
        micro_batch_size=8,
        learning_rate=1e-2,
        clip_range=0.05,
    )
    kwargs.update(overrides)
    policy = kwargs.pop("policy", None) or TinyWanPolicy(seed=0, lora_rank=4)
    rewards = RewardSet({"sharp": Sharpness(), "flicker": TemporalFlickering(), "colour": ColorPromptAlignment()})
    return SelfPacedGRPO(policy, rewards, **kwargs)


def fit(module, steps=3, batch_size=2):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=PromptDataModule(prompts=PROMPTS, batch_size=batch_size))
    return trainer


def test_fit_changes_every_lora_parameter_and_nothing_frozen():
    module = make_module()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    fit(module, steps=3)
    for name, param in module.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"{name} did not change"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"


def test_first_inner_update_is_on_policy_and_later_ones_are_not():
    module = make_module(num_inner_epochs=3, learning_rate=5e-2)
    trainer = fit(module, steps=3)  # one iteration of three optimizer steps
    metrics = trainer.callback_metrics
    assert metrics["train/first_log_ratio_abs_max"] <= 1e-5
    # The later epochs are off-policy: their ratios move away from 1 (so the check above can fail).
    assert metrics["train/approx_kl"] > 0


def test_training_step_returns_the_curriculum_contract():
    module = make_module()
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(outputs)

    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[Spy()])
    trainer.fit(module, datamodule=PromptDataModule(prompts=PROMPTS, batch_size=2))
    (out,) = seen
    assert out["group_size"] == 4 and len(out["prompts"]) == 8
    assert set(out["aspect_rewards"]) == {"fidelity", "temporal", "semantic"}
    assert all(v.shape == (8,) for v in out["aspect_rewards"].values())


def _rollout_and_advantages(module):
    rollout = sample_rollout(module.policy, PROMPTS[:2], 4, module.sampler, generator=torch.Generator().manual_seed(0))
    advantages = group_advantages(torch.linspace(0.0, 1.0, 8) ** 2, 4)
    return rollout, advantages


def test_micro_batching_does_not_change_gradients():
    module = make_module()
    with torch.no_grad():  # move off the LoRA zero-init so every weight has a gradient
        for p in module.policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    rollout, advantages = _rollout_and_advantages(module)
    pairs = rollout.train_mask.nonzero()[:4]
    grads = {}
    for size in (1, 4):
        module.micro_batch_size = size
        module.policy.zero_grad(set_to_none=True)
        module.accumulate_gradients(rollout, advantages, pairs)
        grads[size] = [p.grad.clone() for p in module.policy.trainable_parameters()]
    # Independent reference: the mean of the four per-pair losses, backpropagated at once.
    module.policy.zero_grad(set_to_none=True)
    losses = torch.stack([module.pair_loss(rollout, advantages, pairs[i : i + 1])["loss"] for i in range(4)])
    losses.mean().backward()
    reference = [p.grad.clone() for p in module.policy.trainable_parameters()]
    assert any(g.abs().sum() > 0 for g in reference)
    for g1, g4, ref in zip(grads[1], grads[4], reference):
        torch.testing.assert_close(g1, g4, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(g4, ref, atol=1e-6, rtol=1e-5)


def test_kl_to_reference_grows_as_lora_moves():
    module = make_module(kl_coef=0.1)
    rollout, advantages = _rollout_and_advantages(module)
    pairs = rollout.train_mask.nonzero()[:4]
    assert module.pair_loss(rollout, advantages, pairs)["kl_ref"] == 0  # LoRA starts as the identity
    with torch.no_grad():
        for p in module.policy.trainable_parameters():
            p.add_(0.1)
    assert module.pair_loss(rollout, advantages, pairs)["kl_ref"] > 0


def test_compute_advantages_in_one_process_are_the_clipped_group_advantages():
    from sp_grpo.functional import aggregate_advantages, clip_advantages

    module = make_module(advantage_clip=0.5, reward_weights={"fidelity": 0.5, "temporal": 0.3, "semantic": 0.2})
    generator = torch.Generator().manual_seed(0)
    rewards = {aspect: torch.rand(8, generator=generator) for aspect in ("fidelity", "temporal", "semantic")}
    weights = module.aspect_weights(rewards)
    assert weights == {"fidelity": 0.5, "temporal": 0.3, "semantic": 0.2}
    expected = clip_advantages(aggregate_advantages(rewards, weights, 4), 0.5)
    assert expected.abs().max() == 0.5  # the clip is used
    torch.testing.assert_close(module.compute_advantages(rewards, weights), expected, rtol=0, atol=0)


def test_bad_batch_has_a_clear_error():
    module = make_module()
    with pytest.raises(ValueError, match="dict with `prompts`"):
        module.training_step({"text": ["x"]}, 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"group_size": 1}, r"`group_size` \(1\) must be at least 2.*model.group_size"),
        ({"num_inner_epochs": 0}, "num_inner_epochs"),
        ({"num_minibatches": 0}, "num_minibatches"),
        ({"micro_batch_size": 0}, "micro_batch_size"),
        ({"clip_range": 0.0}, "clip_range"),
        ({"advantage_scale": "global"}, r"advantage_scale.*\['group', 'batch', 'none'\]"),
        ({"aggregation": "mean"}, "aggregation"),
        ({"advantage_clip": -1.0}, "advantage_clip"),
        ({"kl_coef": -0.1}, "kl_coef"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"lr_warmup_steps": -1}, "lr_warmup_steps"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"reward_weights": {"style": 1.0}}, r"reward_weights.*\['style'\]"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_module(**kwargs)


def test_kl_needs_a_reference_model():
    with pytest.raises(ValueError, match="reference_copy"):
        make_module(policy=TinyWanPolicy(seed=0, lora_rank=None), kl_coef=0.1)


def test_policy_must_be_a_video_policy():
    with pytest.raises(TypeError, match="VideoPolicy"):
        SelfPacedGRPO(torch.nn.Linear(2, 2), RewardSet({"sharp": Sharpness()}))


def test_validation_is_deterministic_ode_sampling_with_its_own_sampler():
    val_sampler = DenoisingConfig(num_steps=2, num_frames=5, height=32, width=32, guidance_scale=2.0)
    module = make_module(val_sampler=val_sampler)
    data = PromptDataModule(prompts=PROMPTS, val_prompts=PROMPTS[:2], batch_size=2)
    calls = []
    module.policy.transformer.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
    first = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert calls == [4, 4]  # val_sampler's 2 steps, 2 prompts with batched guidance: its own steps
    second = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert first == second and "val/reward_weighted" in first and "val/aspect/semantic" in first


def test_group_weighting_callback_sets_the_advantages_of_selfpacedgrpo():
    from sp_grpo.callbacks import GroupRewardWeighting
    from sp_grpo.functional import aggregate_advantages, clip_advantages, group_reward_weights

    module = make_module(aggregation="sum_then_normalize")
    seen = []

    class Spy(L.Callback):  # runs after the weighting callback, so records the step's own advantages
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(outputs)

    weighting = GroupRewardWeighting(thresholds={"fidelity": 0.6, "temporal": 0.5, "semantic": 0.4}, slope=5.0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[weighting, Spy()],
    )
    trainer.fit(module, datamodule=PromptDataModule(prompts=PROMPTS, batch_size=2))
    assert len(seen) == 2
    for out in seen:
        rewards = out["aspect_rewards"]
        stacked = torch.stack([rewards[a] for a in ("fidelity", "temporal", "semantic")])
        weights = group_reward_weights(stacked, 4, torch.tensor([0.6, 0.5, 0.4]), beta=0.3, slope=5.0)
        per_group = dict(zip(("fidelity", "temporal", "semantic"), weights))
        expected = aggregate_advantages(rewards, per_group, 4, mode="sum_then_normalize", scale="group")
        torch.testing.assert_close(out["advantages"], clip_advantages(expected, 5.0))
        # Not what the module's equal global weights would give: the weighting was really used.
        equal = aggregate_advantages(rewards, {a: 1 / 3 for a in rewards}, 4, mode="sum_then_normalize")
        assert not torch.allclose(out["advantages"], clip_advantages(equal, 5.0), atol=1e-4)
    assert "train/reward_weighted" in trainer.callback_metrics
