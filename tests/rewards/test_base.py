import pytest
import torch

from sp_grpo.rewards.base import VideoReward, check_videos


class MeanFrameIndex(VideoReward):
    """Scores the mean of the kept frame values; frame t is filled with the value t."""

    aspect = "fidelity"

    def score(self, videos, prompts):
        return videos.mean(dim=(2, 3, 4)).mean(dim=1) * 100


class NeedsThree(MeanFrameIndex):
    min_frames = 3


def _indexed(b=2, t=10):
    return (torch.arange(t, dtype=torch.float32) / 100).view(1, t, 1, 1, 1).expand(b, t, 3, 2, 2).clone()


def test_num_frames_keeps_evenly_spaced_frames_including_ends():
    reward = MeanFrameIndex(num_frames=4)
    assert reward.frame_indices(10) == [0, 3, 6, 9]
    torch.testing.assert_close(reward(_indexed(), ["a", "b"]), torch.full((2,), 4.5))
    assert MeanFrameIndex(num_frames=20).frame_indices(10) == list(range(10))


def test_frame_stride_keeps_every_kth_frame():
    reward = MeanFrameIndex(frame_stride=3)
    assert reward.frame_indices(10) == [0, 3, 6, 9]
    assert MeanFrameIndex().frame_indices(3) == [0, 1, 2]


def test_output_is_float32_of_shape_b():
    out = MeanFrameIndex()(_indexed().double(), ["a", "b"])
    assert out.dtype == torch.float32 and out.shape == (2,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_frames": 2, "frame_stride": 2}, "set `num_frames` \\(2\\) or `frame_stride` \\(2\\), not both"),
        ({"num_frames": 0}, "`num_frames` \\(0\\) must be a positive integer"),
        ({"frame_stride": -1}, "`frame_stride` \\(-1\\) must be a positive integer"),
    ],
)
def test_init_rejects_bad_subsampling(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MeanFrameIndex(**kwargs)


def test_min_frames_checked_at_init_and_call():
    with pytest.raises(ValueError, match="`num_frames` \\(2\\) must be at least 3"):
        NeedsThree(num_frames=2)
    with pytest.raises(ValueError, match="needs at least 3 frames after subsampling, got 2"):
        NeedsThree(frame_stride=5)(_indexed(), ["a", "b"])


def test_missing_aspect_is_a_type_error():
    class NoAspect(VideoReward):
        pass

    with pytest.raises(TypeError, match="NoAspect.aspect \\(None\\) must be one of"):
        NoAspect()


def test_score_must_be_implemented_and_return_b_values():
    class Base(VideoReward):
        aspect = "temporal"

    with pytest.raises(NotImplementedError, match="Base must implement `score"):
        Base()(_indexed(), ["a", "b"])

    class Wrong(VideoReward):
        aspect = "temporal"

        def score(self, videos, prompts):
            return videos.mean(dim=(2, 3, 4))

    with pytest.raises(RuntimeError, match="Wrong.score must return shape \\(2,\\), got \\(2, 10\\)"):
        Wrong()(_indexed(), ["a", "b"])


@pytest.mark.parametrize(
    ("videos", "prompts", "error", "match"),
    [
        ([1.0], ["a"], TypeError, "must be a torch.Tensor"),
        (torch.rand(2, 4, 4, 3), ["a", "b"], ValueError, "shape \\(B, T, 3, H, W\\).*got \\(2, 4, 4, 3\\)"),
        (torch.rand(2, 3, 4, 4, 3), ["a", "b"], ValueError, "3 RGB channels, got \\(2, 3, 4, 4, 3\\)"),
        (torch.zeros(2, 3, 3, 4, 4, dtype=torch.uint8), ["a", "b"], TypeError, "dtype torch.uint8.*`videos.float\\(\\) / 255`"),
        (torch.full((2, 3, 3, 4, 4), -0.5), ["a", "b"], ValueError, "values must be in \\[0, 1\\], got min -0.5 and max -0.5"),
        (torch.full((2, 3, 3, 4, 4), float("nan")), ["a", "b"], ValueError, "values must be in \\[0, 1\\]"),
        (torch.rand(2, 3, 3, 4, 4), "ab", TypeError, "got a single string"),
        (torch.rand(2, 3, 3, 4, 4), ["a"], ValueError, "got 1 prompts for 2 videos"),
    ],
)
def test_check_videos_errors(videos, prompts, error, match):
    with pytest.raises(error, match=match):
        check_videos(videos, prompts, "X")
    with pytest.raises(error, match=match):
        MeanFrameIndex()(videos, prompts)
