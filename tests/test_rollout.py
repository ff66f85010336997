import dataclasses

import pytest
import torch

from sp_grpo.functional.sde import sde_step
from sp_grpo.policies import TinyWanPolicy, tiny_wan_components
from sp_grpo.rollout import DenoisingConfig, ValDenoisingConfig, sample_ode, sample_rollout, select_steps

SMALL = dict(num_steps=4, num_frames=5, height=32, width=32)


@pytest.fixture(scope="module")
def policy():
    return TinyWanPolicy(seed=0)


def _rollout(policy, seed=0, prompts=("a red square", "a blue circle"), group_size=3, **overrides):
    config = DenoisingConfig(**{**SMALL, **overrides})
    return sample_rollout(policy, list(prompts), group_size, config, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_prompt_order(policy):
    rollout = _rollout(policy)
    assert rollout.prompts == ["a red square"] * 3 + ["a blue circle"] * 3
    assert rollout.latents.shape == (6, 5, 4, 2, 4, 4)
    assert rollout.log_probs.shape == (6, 4) and rollout.train_mask.shape == (6, 4)
    assert rollout.videos.shape == (6, 5, 3, 32, 32)
    assert rollout.embeds.cond.shape[0] == 6
    assert torch.isfinite(rollout.log_probs).all()


def test_same_seed_same_rollout(policy):
    a, b, c = _rollout(policy, seed=5), _rollout(policy, seed=5), _rollout(policy, seed=6)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs) and torch.equal(a.videos, b.videos)
    assert not torch.equal(a.latents, c.latents)


def test_each_unique_prompt_is_encoded_once(policy):
    calls = []
    handle = policy.text_encoder.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        _rollout(policy, prompts=("a red square", "a blue circle", "a green ball"), group_size=4)
    finally:
        handle.remove()
    assert sum(calls) == 3 + 1  # three prompts, one negative prompt


def test_same_noise_in_group(policy):
    rollout = _rollout(policy, same_noise_in_group=True)
    start = rollout.latents[:, 0]
    assert torch.equal(start[0], start[1]) and torch.equal(start[0], start[2])
    assert not torch.equal(start[0], start[3])
    assert not torch.equal(rollout.latents[0, -1], rollout.latents[1, -1])  # the sampler's noise separates them
    different = _rollout(policy)
    assert not torch.equal(different.latents[0, 0], different.latents[1, 0])


@pytest.mark.parametrize("kind, level", [("sde", 0.7), ("dance", 0.3), ("cps", 0.8)])
def test_stored_log_probs_score_the_stored_transitions(policy, kind, level):
    rollout = _rollout(policy, sde_kind=kind, noise_level=level)
    for i in range(4):
        x, x_next = rollout.latents[:, i], rollout.latents[:, i + 1]
        sigma = torch.full((6,), float(rollout.sigmas[i]))
        with torch.no_grad():
            v = policy.velocity(x, sigma, rollout.embeds, 4.5)
        out = sde_step(v, x, rollout.sigmas[i].item(), rollout.sigmas[i + 1].item(), kind=kind, noise_level=level, prev_sample=x_next)
        torch.testing.assert_close(out.log_prob, rollout.log_probs[:, i], atol=1e-4, rtol=1e-4)


def test_cps_last_step_is_deterministic_and_untrained(policy):
    rollout = _rollout(policy, sde_kind="cps", noise_level=0.8)
    assert not rollout.train_mask[:, -1].any() and rollout.train_mask[:, :-1].all()


def test_ode_sampling_matches_wan_pipeline():
    """Independent reference: diffusers' WanPipeline with the Euler scheduler on the same weights."""
    policy = TinyWanPolicy(seed=0)
    components = tiny_wan_components(0)
    pipe = components.pipeline()
    config = DenoisingConfig(**SMALL, guidance_scale=3.0)
    ours = sample_ode(policy, ["a red square moving left"], config, generator=torch.Generator().manual_seed(0))
    noise = torch.randn((1, *policy.latent_shape(5, 32, 32)), generator=torch.Generator().manual_seed(0))
    theirs = pipe(
        "a red square moving left",
        negative_prompt="",
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=4,
        guidance_scale=3.0,
        latents=noise,
        max_sequence_length=16,
        output_type="pt",
    ).frames
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-4)


def test_select_steps():
    gen = torch.Generator().manual_seed(0)
    stochastic, mask = select_steps(DenoisingConfig(num_steps=10), 3, 0, gen)
    assert stochastic.all() and mask.all()
    stochastic, mask = select_steps(DenoisingConfig(num_steps=10, train_steps="random", train_fraction=0.3), 50, 0, gen)
    assert stochastic.all() and (mask.sum(1) == 3).all()
    assert len({tuple(row.tolist()) for row in mask}) > 1  # each sample has its own steps
    fixed = DenoisingConfig(num_steps=10, train_steps="window", window_size=2, window_placement="fixed", window_start=3)
    stochastic, mask = select_steps(fixed, 2, 0, gen)
    assert stochastic.nonzero().flatten().tolist() == [3, 4] and torch.equal(mask[0], stochastic)
    sliding = DenoisingConfig(num_steps=5, train_steps="window", window_size=2, window_placement="sliding", window_slide_every=2)
    starts = [int(select_steps(sliding, 1, it, gen)[0].nonzero()[0]) for it in range(10)]
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]
    random_window = DenoisingConfig(num_steps=10, train_steps="window", window_size=3)
    starts = {int(select_steps(random_window, 1, 0, gen)[0].nonzero()[0]) for _ in range(100)}
    assert starts == set(range(8))


def test_window_steps_alone_are_stochastic(policy):
    rollout = _rollout(policy, train_steps="window", window_size=1, window_placement="fixed", window_start=1)
    assert rollout.stochastic.tolist() == [False, True, False, False]
    assert (rollout.log_probs[:, [0, 2, 3]] == 0).all() and (rollout.log_probs[:, 1] != 0).all()
    # Outside the window the step is exactly Euler: x_next = x + v * (sigma_next - sigma).
    x = rollout.latents[:, 0]
    with torch.no_grad():
        v = policy.velocity(x, torch.full((6,), float(rollout.sigmas[0])), rollout.embeds, 4.5)
    torch.testing.assert_close(rollout.latents[:, 1], x + v * (rollout.sigmas[1] - rollout.sigmas[0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_steps": 0}, "model.sampler.num_steps"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"sde_kind": "ddim"}, r"sde_kind.*\['sde', 'cps', 'dance'\]"),
        ({"noise_level": 0.0}, "noise_level.*positive"),
        ({"sde_kind": "cps", "noise_level": 1.5}, "at most 1"),
        ({"train_steps": "some"}, "train_steps"),
        ({"train_fraction": 0.0}, "train_fraction"),
        ({"train_steps": "window", "window_size": 11}, "window_size"),
        ({"train_steps": "window", "window_size": 4, "window_start": 7}, "window_start"),
        ({"window_placement": "middle"}, "window_placement"),
        ({"window_slide_every": 0}, "window_slide_every"),
    ],
)
def test_sampler_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DenoisingConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"num_steps": 0}, "num_steps"), ({"noise_level": 0.0}, "noise_level"), ({"train_steps": "window", "window_size": 11}, "window_size")],
)
def test_validation_config_errors_name_model_val_sampler(kwargs, field):
    with pytest.raises(ValueError, match=rf"^`model\.val_sampler\.{field}`"):
        ValDenoisingConfig(**kwargs)
    with pytest.raises(ValueError, match=rf"^`model\.sampler\.{field}`"):
        DenoisingConfig(**kwargs)
    # The same check under any other name, for code that builds the settings itself.
    with pytest.raises(ValueError, match=rf"^`my\.settings\.{field}`"):
        _unchecked(**kwargs).check("my.settings")


def _unchecked(**kwargs) -> DenoisingConfig:
    """A DenoisingConfig with ``kwargs`` set, bypassing the check at construction."""
    config = DenoisingConfig()
    for key, value in kwargs.items():
        object.__setattr__(config, key, value)
    return config


def test_validation_config_has_the_same_fields_and_values():
    val = ValDenoisingConfig(num_steps=3, height=32)
    assert isinstance(val, DenoisingConfig)
    assert dataclasses.asdict(val) == dataclasses.asdict(DenoisingConfig(num_steps=3, height=32))
