import math

import pytest
import torch

from sp_grpo.functional.video import (
    clipped_fraction,
    dynamic_degree,
    feature_consistency,
    laplacian_variance,
    luma,
    motion_smoothness,
    noise_sigma,
    rms_contrast,
    temporal_flickering,
)


def _videos(b=2, t=5, h=8, w=9, seed=0):
    return torch.rand(b, t, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _grey(frame):  # (3, H, W) -> (H, W), written out per channel
    return 0.299 * frame[0] + 0.587 * frame[1] + 0.114 * frame[2]


def test_temporal_flickering_matches_vbench_loop():
    videos = _videos()
    expected = []
    for video in videos:
        frames = (video * 255).double()
        maes = [(frames[i] - frames[i + 1]).abs().mean().item() for i in range(len(frames) - 1)]
        expected.append((255.0 - sum(maes) / len(maes)) / 255.0)
    torch.testing.assert_close(temporal_flickering(videos), torch.tensor(expected, dtype=torch.float32))


def test_temporal_flickering_static_is_one_and_bf16_input_gives_fp32():
    static = _videos(t=1).repeat(1, 4, 1, 1, 1)
    assert torch.equal(temporal_flickering(static), torch.ones(2))
    assert temporal_flickering(static.bfloat16()).dtype == torch.float32


def test_feature_consistency_matches_vbench_loop():
    feats = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(1))
    expected = []
    for video in feats:
        total = 0.0
        for i in range(1, len(video)):
            cos = torch.nn.functional.cosine_similarity
            sim_prev = max(0.0, cos(video[i - 1 : i], video[i : i + 1]).item())
            sim_first = max(0.0, cos(video[0:1], video[i : i + 1]).item())
            total += (sim_prev + sim_first) / 2
        expected.append(total / (len(video) - 1))
    torch.testing.assert_close(feature_consistency(feats), torch.tensor(expected))


def test_feature_consistency_identical_frames_score_one_opposite_frames_zero():
    f = torch.randn(1, 1, 8)
    assert feature_consistency(f.repeat(1, 4, 1)).item() == pytest.approx(1.0)
    assert feature_consistency(torch.cat([f, -f], dim=1)).item() == pytest.approx(0.0)


def test_motion_smoothness_reference_and_linear_fade_is_perfect():
    videos = _videos(t=6)
    expected = []
    for video in videos:
        errors = [(video[i] - (video[i - 1] + video[i + 1]) / 2).abs().mean().item() for i in range(1, len(video) - 1)]
        expected.append(1 - sum(errors) / len(errors))
    torch.testing.assert_close(motion_smoothness(videos), torch.tensor(expected))
    fade = torch.linspace(0, 1, 5).view(1, 5, 1, 1, 1).expand(1, 5, 3, 4, 4)
    assert motion_smoothness(fade).item() == pytest.approx(1.0)


def test_dynamic_degree_reference_and_static_is_zero():
    videos = _videos(t=4, h=10, w=10)
    threshold, q = 0.3, 0.1
    expected = []
    for video in videos:
        parts = []
        for i in range(1, len(video)):
            change = (_grey(video[i]) - _grey(video[i - 1])).abs().flatten().tolist()
            top = sorted(change, reverse=True)[: math.ceil(q * len(change))]
            parts.append(min(1.0, sum(top) / len(top) / threshold))
        expected.append(sum(parts) / len(parts))
    torch.testing.assert_close(dynamic_degree(videos, threshold, q), torch.tensor(expected))
    static = videos[:, :1].repeat(1, 5, 1, 1, 1)
    assert torch.equal(dynamic_degree(static), torch.zeros(2))


@pytest.mark.parametrize(("kwargs", "match"), [({"threshold": 0.0}, "`threshold` \\(0.0\\) must be positive"), ({"top_fraction": 1.5}, "`top_fraction` \\(1.5\\) must be in")])
def test_dynamic_degree_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dynamic_degree(_videos(), **kwargs)


def test_laplacian_variance_reference_and_blur_lowers_it():
    videos = _videos(b=1, t=2)
    expected = []
    for frame in videos[0]:
        y = _grey(frame)
        lap = [
            y[i - 1, j] + y[i + 1, j] + y[i, j - 1] + y[i, j + 1] - 4 * y[i, j]
            for i in range(1, y.shape[0] - 1)
            for j in range(1, y.shape[1] - 1)
        ]
        mean = sum(lap) / len(lap)
        expected.append(sum((v - mean) ** 2 for v in lap) / len(lap))
    assert laplacian_variance(videos).item() == pytest.approx(sum(expected).item() / 2, rel=1e-5)
    blurred = torch.nn.functional.avg_pool2d(videos.flatten(0, 1), 3, stride=1, padding=1, count_include_pad=False)
    assert laplacian_variance(blurred.view_as(videos)) < 0.2 * laplacian_variance(videos)


def test_noise_sigma_recovers_gaussian_noise_and_ignores_ramps():
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0.2, 0.8, 64).view(1, 1, 1, 1, 64).expand(1, 2, 3, 64, 64)
    assert noise_sigma(ramp).item() == pytest.approx(0.0, abs=1e-6)
    noisy = ramp + 0.05 * torch.randn(1, 2, 1, 64, 64, generator=g).expand(1, 2, 3, 64, 64)
    assert noise_sigma(noisy).item() == pytest.approx(0.05, rel=0.1)


def test_clipped_fraction_and_contrast_by_hand():
    video = torch.zeros(1, 1, 3, 2, 2)
    video[..., 0, 1] = 1.0  # white pixel
    video[..., 1, 0] = 0.5  # grey pixel, one more black pixel at (1, 1)
    assert clipped_fraction(video).item() == pytest.approx(0.75)
    values = torch.tensor([0.0, 1.0, 0.5, 0.0])
    assert rms_contrast(video).item() == pytest.approx(values.std(unbiased=False).item(), rel=1e-5)
    with pytest.raises(ValueError, match="`low` \\(0.9\\) and `high` \\(0.1\\) must satisfy"):
        clipped_fraction(video, 0.9, 0.1)


def test_luma_weights():
    video = torch.tensor([0.2, 0.4, 0.6]).view(3, 1, 1)
    assert luma(video).item() == pytest.approx(0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6)
