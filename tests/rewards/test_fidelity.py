import pytest
import torch

from sp_grpo.functional.video import clipped_fraction, laplacian_variance, noise_sigma, rms_contrast
from sp_grpo.rewards.fidelity import AestheticScore, Contrast, Exposure, NoiseLevel, Sharpness, load_linear_head


def _checkerboard(b=2, t=3, size=16):
    i = torch.arange(size)
    board = ((i[:, None] + i[None, :]) % 2).float()
    return (0.25 + 0.5 * board).expand(b, t, 3, size, size).clone()


def _blur(videos):
    flat = videos.flatten(0, 1)
    return torch.nn.functional.avg_pool2d(flat, 3, stride=1, padding=1, count_include_pad=False).view_as(videos)


def test_sharpness_by_hand_and_blur_lowers_it():
    # Inner pixels of a 0.25/0.75 checkerboard: Laplacian = 4 * (+-0.5) * -1 ... = +-2, variance 4.
    sharp = _checkerboard()
    assert Sharpness()(sharp, ["a", "b"]).tolist() == pytest.approx([4.0, 4.0])
    assert (Sharpness()(_blur(sharp), ["a", "b"]) < Sharpness()(sharp, ["a", "b"])).all()
    assert Sharpness(saturation=4.0)(sharp, ["a", "b"]).tolist() == pytest.approx([0.5, 0.5])


def test_modules_wrap_their_functions():
    videos = torch.rand(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(NoiseLevel()(videos, ["a", "b"]), noise_sigma(videos))
    torch.testing.assert_close(Exposure(0.1, 0.9)(videos, ["a", "b"]), 1 - clipped_fraction(videos, 0.1, 0.9))
    torch.testing.assert_close(Contrast()(videos, ["a", "b"]), rms_contrast(videos))
    torch.testing.assert_close(Sharpness(num_frames=2)(videos, ["a", "b"]), laplacian_variance(videos[:, [0, 2]]))
    assert not NoiseLevel.higher_is_better and Sharpness.higher_is_better


def test_fidelity_argument_errors():
    with pytest.raises(ValueError, match="`saturation` \\(0\\) must be positive"):
        Sharpness(saturation=0)
    with pytest.raises(ValueError, match="`low` \\(0.5\\) and `high` \\(0.5\\) must satisfy"):
        Exposure(0.5, 0.5)


def test_load_linear_head_single_and_improved_formats(tmp_path):
    torch.save({"weight": torch.ones(1, 4), "bias": torch.zeros(1)}, tmp_path / "linear.pth")
    layers = load_linear_head(tmp_path / "linear.pth")
    assert len(layers) == 1 and layers[0][0].shape == (1, 4)
    # The "improved" predictor: layers.0, .2, .4, .6, .7 (dropout in between has no weights).
    state = {}
    sizes = [(8, 4), (6, 8), (5, 6), (3, 5), (1, 3)]
    for index, (out_f, in_f) in zip([0, 2, 4, 6, 7], sizes):
        state[f"layers.{index}.weight"] = torch.randn(out_f, in_f)
        state[f"layers.{index}.bias"] = torch.randn(out_f)
    from safetensors.torch import save_file

    save_file(state, tmp_path / "mlp.safetensors")
    assert [w.shape for w, _ in load_linear_head(tmp_path / "mlp.safetensors")] == [torch.Size(s) for s in sizes]


def test_load_linear_head_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_linear_head(tmp_path / "missing.pth")
    torch.save({"weight": torch.ones(2, 4)}, tmp_path / "two.pth")
    with pytest.raises(ValueError, match="the last layer has 2 outputs, expected 1"):
        load_linear_head(tmp_path / "two.pth")
    torch.save({"a.0.weight": torch.ones(3, 4), "a.1.weight": torch.ones(1, 2)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="do not chain"):
        load_linear_head(tmp_path / "bad.pth")


def test_aesthetic_score_is_head_on_normalized_features_frame_mean(tiny_clip_dir, tmp_path):
    from sp_grpo.rewards.backbones import Backbone

    backbone = Backbone(str(tiny_clip_dir))
    weight, bias = torch.randn(1, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5])
    torch.save({"weight": weight, "bias": bias}, tmp_path / "head.pth")
    reward = AestheticScore(backbone, tmp_path / "head.pth", num_frames=None)
    videos = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    feats = backbone.embed_video(videos)
    expected = [
        sum((weight[0] @ (f / f.norm())).item() + 0.5 for f in video) / len(video) for video in feats
    ]
    assert reward(videos, ["a", "b"]).tolist() == pytest.approx(expected, rel=1e-5)
    torch.save({"weight": torch.ones(1, 7), "bias": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="the head takes 7-d features but the backbone gives 16-d"):
        AestheticScore(backbone, tmp_path / "wrong.pth")(videos, ["a", "b"])
