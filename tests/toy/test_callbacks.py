import lightning.pytorch as pl
import pytest
import torch

from sp_grpo.toy.callbacks import GoldEvaluation, SampleVideos, video_grid


def test_video_grid_against_explicit_tiling():
    videos = torch.rand(2, 3, 3, 4, 5)
    grid = video_grid(videos, scale=2, gap=1)
    assert grid.shape == (3, 3, 8, 22)
    for b in range(2):
        for t in range(3):
            for y in range(4):
                for x in range(5):
                    assert torch.equal(grid[t, :, 2 * y, 2 * (b * 6 + x)], videos[b, t, :, y, x])
    assert torch.all(grid[:, :, :, 10:12] == 0.5)


def test_sample_videos_validates_its_settings():
    with pytest.raises(ValueError, match="`prompts` must be a non-empty list"):
        SampleVideos([])
    with pytest.raises(ValueError, match=r"`every_n_steps` \(-1\) must be 0"):
        SampleVideos(["a"], every_n_steps=-1)
    with pytest.raises(ValueError, match=r"`video_format` \('avi'\) must be one of"):
        SampleVideos(["a"], video_format="avi")
    with pytest.raises(ValueError, match=r"`scale` \(0\) must be at least 1"):
        SampleVideos(["a"], scale=0)
    with pytest.raises(ValueError, match=r"`fps` \(0\) must be positive"):
        SampleVideos(["a"], fps=0)


def test_gold_evaluation_validates_its_settings():
    with pytest.raises(ValueError, match=r"`seeds` \(0\) must be at least 1"):
        GoldEvaluation(seeds=0)
    with pytest.raises(ValueError, match=r"`every_n_steps` \(-2\) must be 0"):
        GoldEvaluation(every_n_steps=-2)
    with pytest.raises(ValueError, match="not in the shapes world's grammar"):
        GoldEvaluation(prompts=["a cat"])


def test_callbacks_need_a_policy_and_a_sampler():
    with pytest.raises(AttributeError, match="lacks: use it with sp_grpo.SelfPacedGRPO"):
        SampleVideos(["a"]).on_fit_start(pl.Trainer(logger=False), pl.LightningModule())


def test_gold_table_compares_first_and_last_evaluation():
    gold = GoldEvaluation(seeds=2)
    metrics = ("colour_acc", "shape_acc", "direction_acc", "all_correct", "cleanliness", "flicker")
    gold.results = {0: dict.fromkeys(metrics, 0.25), 50: dict.fromkeys(metrics, 0.5), 100: dict.fromkeys(metrics, 0.75)}
    lines = gold.table().splitlines()
    assert lines[0].startswith("| gold metric (16 held-out prompts x 2 seeds) | step 0 | step 100 |")
    assert "| all_correct | 0.250 | 0.750 | +0.500 |" in lines
    restored = GoldEvaluation()
    restored.load_state_dict(gold.state_dict())
    assert restored.results == gold.results
