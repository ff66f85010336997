import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal

from sp_grpo.functional.sde import sde_step

KINDS = ["sde", "cps", "dance"]
SHAPE = (3, 2, 3, 4)  # (B, C, H, W); any rank with batch first


def reference_mean_std(kind, x, v, sigma, sigma_next, eta):
    """Mean and std of one step for a single sample, with python-float sigmas, written from the papers.

    "sde" and "dance" are written as the reverse-time SDE dx = [v - g^2/2 * score] dt + g dW with the
    score of the flow-matching marginal, -(x + (1 - sigma) v) / sigma, rather than in the expanded form
    the implementation uses.
    """
    dt = sigma_next - sigma
    if kind == "cps":
        x0_hat = x - sigma * v
        eps_hat = x + (1 - sigma) * v
        std = sigma_next * math.sin(eta * math.pi / 2)
        return (1 - sigma_next) * x0_hat + math.sqrt(max(sigma_next**2 - std**2, 0.0)) * eps_hat, std
    if kind == "sde":
        denominator = 1 - sigma_next if sigma == 1 else 1 - sigma
        g = eta * math.sqrt(sigma / denominator)
    else:
        g = eta
    score = -(x + (1 - sigma) * v) / sigma
    return x + (v - g**2 / 2 * score) * dt, g * math.sqrt(-dt)


def reference_log_prob(value, mean, std):
    """Mean over non-batch elements of Normal(mean, std).log_prob(value), for one sample."""
    if std == 0:
        return torch.tensor(0.0)
    return Normal(mean.double(), std).log_prob(value.double()).mean().float()


@pytest.mark.parametrize("kind", KINDS)
def test_mean_std_and_log_prob_match_reference(kind):
    torch.manual_seed(0)
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    out = sde_step(v, x, 0.8, 0.6, kind=kind, noise_level=0.7, generator=torch.Generator().manual_seed(1))
    for b in range(SHAPE[0]):
        mean, std = reference_mean_std(kind, x[b].double(), v[b].double(), 0.8, 0.6, 0.7)
        torch.testing.assert_close(out.prev_mean[b], mean.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.std[b].flatten(), torch.tensor([std], dtype=torch.float32))
        torch.testing.assert_close(out.log_prob[b], reference_log_prob(out.prev_sample[b], mean, std))


@pytest.mark.parametrize("kind", KINDS)
def test_scoring_a_given_prev_sample(kind):
    torch.manual_seed(0)
    x, v, given = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    out = sde_step(v, x, 0.5, 0.4, kind=kind, noise_level=0.5, prev_sample=given)
    assert torch.equal(out.prev_sample, given)
    for b in range(SHAPE[0]):
        mean, std = reference_mean_std(kind, x[b].double(), v[b].double(), 0.5, 0.4, 0.5)
        torch.testing.assert_close(out.log_prob[b], reference_log_prob(given[b], mean, std))


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_sigmas(kind):
    # One batch mixing the first step (sigma == 1), a middle step and the last step (sigma_next == 0).
    torch.manual_seed(0)
    sigmas, sigmas_next = [1.0, 0.7, 0.3], [0.9, 0.5, 0.0]
    x, v, given = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    out = sde_step(v, x, torch.tensor(sigmas), torch.tensor(sigmas_next), kind=kind, noise_level=0.7, prev_sample=given)
    for b, (s, s_next) in enumerate(zip(sigmas, sigmas_next)):
        mean, std = reference_mean_std(kind, x[b].double(), v[b].double(), s, s_next, 0.7)
        torch.testing.assert_close(out.prev_mean[b], mean.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.std[b].flatten(), torch.tensor([std], dtype=torch.float32))
        torch.testing.assert_close(out.log_prob[b], reference_log_prob(given[b], mean, std))


@pytest.mark.parametrize("kind", KINDS)
def test_noise_level_zero_is_diffusers_euler_step(kind):
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(6)
    torch.manual_seed(0)
    sample = torch.randn(SHAPE)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(SHAPE)
        expected = scheduler.step(v, t, sample).prev_sample
        sigma, sigma_next = scheduler.sigmas[i].item(), scheduler.sigmas[i + 1].item()
        out = sde_step(v, sample, sigma, sigma_next, kind=kind, noise_level=0.0)
        torch.testing.assert_close(out.prev_sample, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(out.log_prob, torch.zeros(SHAPE[0]))
        sample = expected


@pytest.mark.parametrize("kind", KINDS)
def test_first_and_last_steps_are_finite_with_finite_gradients(kind):
    torch.manual_seed(0)
    x = torch.randn(SHAPE)
    v = torch.randn(SHAPE, requires_grad=True)
    for sigma, sigma_next in [(1.0, 0.95), (1.0, 0.0), (0.05, 0.0)]:
        out = sde_step(v, x, sigma, sigma_next, kind=kind, noise_level=0.7, generator=torch.Generator().manual_seed(0))
        for value in (out.prev_sample, out.prev_mean, out.std, out.log_prob):
            assert torch.isfinite(value).all()
        (grad,) = torch.autograd.grad(out.log_prob.sum(), v)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_zero_std_is_a_deterministic_step_with_zero_log_prob(kind):
    torch.manual_seed(0)
    x, v, given = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    out = sde_step(v, x, 0.6, 0.4, kind=kind, noise_level=0.0)
    assert torch.equal(out.prev_sample, out.prev_mean)
    assert torch.equal(out.std, torch.zeros(SHAPE[0], 1, 1, 1))
    scored = sde_step(v, x, 0.6, 0.4, kind=kind, noise_level=0.0, prev_sample=given)
    assert torch.equal(scored.log_prob, torch.zeros(SHAPE[0]))


def test_log_prob_gradient_flows_through_the_mean():
    # With prev_sample = mean + std * z taken inside the step, the log-density would not depend on the
    # model at all unless the sample is held fixed (detached); the policy gradient needs it to.
    torch.manual_seed(0)
    x = torch.randn(SHAPE)
    v = torch.randn(SHAPE, requires_grad=True)
    out = sde_step(v, x, 0.8, 0.6, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(out.log_prob.sum(), v)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_marginals_are_preserved_for_point_mass_data(kind):
    # Data is a point mass at x0, so the exact velocity is v(x, s) = (x - x0) / s and the true marginal
    # at s is N((1 - s) x0, s^2). Many small SDE steps from 0.9 to 0.5 must land on N(0.5 x0, 0.5^2);
    # dropping the drift correction (naive: mean x + v dt) inflates the std to about 0.59.
    x0, n_particles, n_steps = 0.5, 20_000, 100
    generator = torch.Generator().manual_seed(0)
    sigmas = torch.linspace(0.9, 0.5, n_steps + 1).tolist()
    x = (1 - sigmas[0]) * x0 + sigmas[0] * torch.randn(1, n_particles, generator=generator)
    naive = x.clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = sde_step((x - x0) / s, x, s, s_next, kind=kind, noise_level=0.7, generator=generator).prev_sample
        if kind != "cps":
            _, std = reference_mean_std(kind, 0.0, 0.0, s, s_next, 0.7)
            naive = naive + (naive - x0) / s * (s_next - s) + std * torch.randn(naive.shape, generator=generator)
    assert abs(x.mean().item() - 0.5 * x0) < 0.02
    assert abs(x.std().item() - 0.5) < 0.02
    if kind != "cps":
        assert naive.std().item() - 0.5 > 0.05


def test_same_generator_seed_gives_same_sample():
    torch.manual_seed(0)
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    first = sde_step(v, x, 0.8, 0.6, generator=torch.Generator().manual_seed(7)).prev_sample
    second = sde_step(v, x, 0.8, 0.6, generator=torch.Generator().manual_seed(7)).prev_sample
    other = sde_step(v, x, 0.8, 0.6, generator=torch.Generator().manual_seed(8)).prev_sample
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("kind", KINDS)
def test_given_noise_is_used(kind):
    torch.manual_seed(0)
    x, v, noise = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    out = sde_step(v, x, 0.8, 0.6, kind=kind, noise=noise)
    torch.testing.assert_close(out.prev_sample, out.prev_mean + out.std * noise)


def test_dtypes_bf16_in_fp32_maths():
    torch.manual_seed(0)
    x, v = torch.randn(SHAPE, dtype=torch.bfloat16), torch.randn(SHAPE, dtype=torch.bfloat16)
    out = sde_step(v, x, 0.8, 0.6, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == torch.bfloat16
    assert out.log_prob.dtype == out.prev_mean.dtype == out.std.dtype == torch.float32
    assert out.log_prob.shape == (SHAPE[0],)
    assert out.std.shape == (SHAPE[0], 1, 1, 1)
    # The mean is computed from the upcast inputs, not in bf16.
    mean, _ = reference_mean_std("sde", x[0].double(), v[0].double(), 0.8, 0.6, 0.7)
    torch.testing.assert_close(out.prev_mean[0], mean.float(), rtol=1e-6, atol=1e-6)


def test_one_dimensional_latents():
    torch.manual_seed(0)
    x, v = torch.randn(4), torch.randn(4)
    out = sde_step(v, x, 0.8, 0.6, kind="dance", noise_level=0.5, generator=torch.Generator().manual_seed(0))
    assert out.log_prob.shape == (4,)
    for b in range(4):
        mean, std = reference_mean_std("dance", x[b].double(), v[b].double(), 0.8, 0.6, 0.5)
        torch.testing.assert_close(out.log_prob[b], reference_log_prob(out.prev_sample[b], mean, std))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "ode"}, r"`kind` \('ode'\) is not a known SDE step; choose one of \['sde', 'cps', 'dance'\]"),
        ({"noise_level": -0.1}, r"`noise_level` \(-0.1\) must be at least 0"),
        ({"kind": "cps", "noise_level": 1.5}, r"`noise_level` \(1.5\) must be at most 1 for kind 'cps'"),
        ({"sigma": 1.5}, r"`sigma` must lie in \[0, 1\].*got \[1.5, 1.5, 1.5\]"),
        ({"sigma_next": -0.1}, r"`sigma_next` must lie in \[0, 1\]"),
        ({"sigma": 500.0}, r"not its timesteps"),
        (
            {"sigma": 0.5, "sigma_next": 0.6},
            r"`sigma_next` \[0.6, 0.6, 0.6\] must be smaller than `sigma` \[0.5, 0.5, 0.5\]",
        ),
        ({"sigma": 0.5, "sigma_next": 0.5}, r"must be smaller than `sigma`"),
        ({"sigma": torch.tensor([0.5, 0.4])}, r"`sigma` has shape \(2,\), expected a float or shape \(3,\)"),
        (
            {"model_output": torch.zeros(3, 2)},
            r"`model_output` shape \(3, 2\) must equal `sample` shape \(3, 2, 3, 4\)",
        ),
        ({"prev_sample": torch.zeros(3, 2)}, r"`prev_sample` shape \(3, 2\) must equal `sample` shape"),
        ({"noise": torch.zeros(3, 2)}, r"`noise` shape \(3, 2\) must equal `sample` shape"),
        (
            {"prev_sample": torch.zeros(SHAPE), "noise": torch.zeros(SHAPE)},
            r"`prev_sample` and `noise` were both given",
        ),
    ],
)
def test_errors(kwargs, match):
    arguments = {"model_output": torch.zeros(SHAPE), "sample": torch.zeros(SHAPE), "sigma": 0.8, "sigma_next": 0.6}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sde_step(**arguments)


def test_error_for_zero_dimensional_sample():
    with pytest.raises(ValueError, match=r"`sample` must have a batch dimension first"):
        sde_step(torch.tensor(0.0), torch.tensor(0.0), 0.8, 0.6)
