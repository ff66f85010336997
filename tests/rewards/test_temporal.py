import pytest
import torch

from sp_grpo.rewards.backbones import Backbone
from sp_grpo.rewards.temporal import DynamicDegree, FeatureConsistency, MotionSmoothness, TemporalFlickering


def _moving_square(b=2, t=8, size=16):
    """A white 4x4 square moving one pixel right per frame on black."""
    video = torch.zeros(b, t, 3, size, size)
    for i in range(t):
        video[:, i, :, 6:10, i : i + 4] = 1.0
    return video


def colour_videos_changing(frames=6, size=32):
    """One video that fades from red to blue over ``frames`` frames: (1, T, 3, H, W)."""
    alpha = torch.linspace(0, 1, frames).view(frames, 1, 1, 1)
    red = torch.tensor([1.0, 0.1, 0.1]).view(1, 3, 1, 1)
    blue = torch.tensor([0.1, 0.1, 1.0]).view(1, 3, 1, 1)
    return ((1 - alpha) * red + alpha * blue).expand(frames, 3, size, size).unsqueeze(0).clone()


def test_static_video_flicker_one_smoothness_one_dynamic_zero():
    static = torch.rand(1, 1, 3, 8, 8, generator=torch.Generator().manual_seed(0)).repeat(2, 6, 1, 1, 1)
    prompts = ["a", "b"]
    assert torch.equal(TemporalFlickering()(static, prompts), torch.ones(2))
    assert MotionSmoothness()(static, prompts).tolist() == pytest.approx([1.0, 1.0])
    assert torch.equal(DynamicDegree()(static, prompts), torch.zeros(2))


def test_flicker_by_hand():
    # Alternating black/white frames on half the pixels: mean |diff| = 0.5 -> score 0.5.
    video = torch.zeros(1, 4, 3, 2, 2)
    video[:, 1::2, :, 0] = 1.0
    assert TemporalFlickering()(video, ["a"]).item() == pytest.approx(0.5)


def test_moving_square_is_dynamic_and_smoother_than_shuffled():
    moving = _moving_square()
    assert DynamicDegree()(moving, ["a", "b"]).tolist() == pytest.approx([1.0, 1.0])
    shuffled = moving[:, [0, 5, 2, 7, 1, 4, 3, 6]]
    prompts = ["a", "b"]
    assert (MotionSmoothness()(shuffled, prompts) < MotionSmoothness()(moving, prompts)).all()
    assert (TemporalFlickering()(shuffled, prompts) < TemporalFlickering()(moving, prompts)).all()


def test_dynamic_degree_saturates_and_validates():
    # Half the luma changes by 0.02 each step: top 5% mean = 0.02, threshold 0.04 -> 0.5.
    video = torch.zeros(1, 3, 3, 4, 4)
    video[:, 1, :, :2] = 0.02
    video[:, 2, :, :2] = 0.04
    assert DynamicDegree(threshold=0.04)(video, ["a"]).item() == pytest.approx(0.5)
    assert DynamicDegree(threshold=0.01)(video, ["a"]).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="`threshold` \\(-1\\) must be positive"):
        DynamicDegree(threshold=-1)
    with pytest.raises(ValueError, match="`top_fraction` \\(0\\) must be in \\(0, 1\\]"):
        DynamicDegree(top_fraction=0)


def test_feature_consistency_shuffled_frames_lower_it(tiny_clip_dir):
    reward = FeatureConsistency(Backbone(str(tiny_clip_dir)), num_frames=None)
    video = colour_videos_changing()
    shuffled = video[:, [0, 3, 1, 5, 2, 4]]
    static = video[:, :1].repeat(1, 6, 1, 1, 1)
    prompts = ["a"]
    assert reward(static, prompts).item() == pytest.approx(1.0)
    assert reward(shuffled, prompts).item() < reward(video, prompts).item() < 1.0
