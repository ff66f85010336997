import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from sp_grpo.functional.losses import clipped_surrogate, gaussian_kl

# Ratios chosen away from the clip edges (0.8 and 1.2), so every element is clearly inside or outside.
RATIOS = [0.5, 0.9, 1.0, 1.1, 1.5, 0.7, 1.3, 1.05]
ADVANTAGES = [1.0, -2.0, 0.5, 1.0, 2.0, -1.0, -0.5, 0.0]


def reference_surrogate(ratios, advantages, low, high):
    """Per-element PPO objective with python floats."""
    losses, clipped, kls = [], 0, []
    for r, a in zip(ratios, advantages):
        losses.append(max(-a * r, -a * min(max(r, 1 - low), 1 + high)))
        clipped += r < 1 - low or r > 1 + high
        kls.append((r - 1) - math.log(r))
    n = len(ratios)
    return sum(losses) / n, clipped / n, sum(kls) / n


@pytest.mark.parametrize("clip_range", [0.2, (0.2, 0.2), (0.4, 0.05)])
def test_clipped_surrogate_matches_reference(clip_range):
    low, high = (clip_range, clip_range) if isinstance(clip_range, float) else clip_range
    log_ratio = torch.log(torch.tensor(RATIOS))
    out = clipped_surrogate(log_ratio, torch.tensor(ADVANTAGES), clip_range)
    loss, clip_frac, approx_kl = reference_surrogate(RATIOS, ADVANTAGES, low, high)
    torch.testing.assert_close(out.loss, torch.tensor(loss))
    torch.testing.assert_close(out.clip_frac, torch.tensor(clip_frac))
    torch.testing.assert_close(out.approx_kl, torch.tensor(approx_kl))
    torch.testing.assert_close(out.ratio_mean, torch.tensor(sum(RATIOS) / len(RATIOS)))
    for stat in (out.clip_frac, out.approx_kl, out.ratio_mean):
        assert not stat.requires_grad


def test_gradient_is_zero_exactly_where_clipped_against_the_advantage():
    log_ratio = torch.log(torch.tensor(RATIOS)).requires_grad_()
    advantages = torch.tensor(ADVANTAGES)
    clipped_surrogate(log_ratio, advantages, 0.2).loss.backward()
    for r, a, g in zip(RATIOS, ADVANTAGES, log_ratio.grad.tolist()):
        if (a > 0 and r > 1.2) or (a < 0 and r < 0.8) or a == 0:
            assert g == 0.0, (r, a)
        else:
            # d/dlog r of -A r / n, the unclipped objective.
            assert g == pytest.approx(-a * r / len(RATIOS), rel=1e-5), (r, a)


def test_zero_log_ratio_gives_minus_mean_advantage():
    advantages = torch.tensor([0.3, -1.2, 2.5, 0.1])
    out = clipped_surrogate(torch.zeros(4), advantages, 1e-4)
    torch.testing.assert_close(out.loss, -advantages.mean())
    assert out.clip_frac == 0 and out.approx_kl == 0 and out.ratio_mean == 1


def test_clipped_surrogate_upcasts_bf16():
    out = clipped_surrogate(torch.zeros(4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16), 0.2)
    assert out.loss.dtype == torch.float32


@pytest.mark.parametrize(
    ("log_ratio", "clip_range", "match"),
    [
        (torch.zeros(3), 0.2, r"`log_ratio` shape \(3,\) must equal `advantages` shape \(4,\)"),
        (torch.zeros(4), 0.0, r"`clip_range` \(0.0\) must be positive"),
        (torch.zeros(4), -0.2, r"`clip_range` \(-0.2\) must be positive"),
        (torch.zeros(4), (0.2, 0.0), r"`clip_range` \(\(0.2, 0.0\)\) must be positive"),
        (torch.zeros(4), (1.0, 0.2), r"`clip_range` \(\(1.0, 0.2\)\) must be positive, with its lower part below 1"),
    ],
)
def test_clipped_surrogate_errors(log_ratio, clip_range, match):
    with pytest.raises(ValueError, match=match):
        clipped_surrogate(log_ratio, torch.zeros(4), clip_range)


def test_gaussian_kl_matches_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    mean, ref_mean = torch.randn(3, 2, 4, generator=generator), torch.randn(3, 2, 4, generator=generator)
    std = torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1)
    expected = kl_divergence(Normal(mean, std.expand_as(mean)), Normal(ref_mean, std.expand_as(mean))).mean(dim=(1, 2))
    torch.testing.assert_close(gaussian_kl(mean, ref_mean, std), expected)


def test_gaussian_kl_zero_std_sample_is_zero_and_finite():
    mean = torch.randn(2, 5, requires_grad=True)
    ref_mean = torch.zeros(2, 5)
    std = torch.tensor([[0.0], [0.5]])
    kl = gaussian_kl(mean, ref_mean, std)
    assert kl[0] == 0
    torch.testing.assert_close(kl[1], (mean[1] ** 2 / (2 * 0.25)).mean())
    kl.sum().backward()
    assert torch.isfinite(mean.grad).all()
    assert torch.equal(mean.grad[0], torch.zeros(5))


def test_gaussian_kl_errors():
    with pytest.raises(ValueError, match=r"`mean` shape \(2, 3\) must equal `ref_mean` shape \(2, 4\)"):
        gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"`std` shape \(3, 1\) does not broadcast to `mean` shape \(2, 3\)"):
        gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"`mean` must have a batch dimension first"):
        gaussian_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0))
