import pytest
import torch

from sp_grpo.toy.gold import background_flicker, cleanliness, gold_scores, read_attributes
from sp_grpo.toy.world import parse_prompt, prompts_for_split, render


def _truth(prompts):
    return torch.tensor([parse_prompt(p).index for p in prompts])


def test_reads_every_rendered_ground_truth_correctly():
    prompts = prompts_for_split("all") * 2
    videos = torch.stack([render(p, seed=i) for i, p in enumerate(prompts)])
    read = read_attributes(videos)
    truth = _truth(prompts)
    assert torch.equal(read.colour, truth[:, 0])
    assert torch.equal(read.shape, truth[:, 1])
    assert torch.equal(read.direction, truth[:, 2])
    scores = gold_scores(videos, prompts)
    assert all(float(v.mean()) == 1.0 for v in scores.values())


def test_wrong_prompts_empty_and_frozen_videos_score_zero():
    video = render("a red ring moving left", 0)
    batch = torch.stack([video, torch.zeros_like(video), video[:1].expand_as(video)])
    scores = gold_scores(batch, ["a blue plus moving up", "a red ring moving left", "a red ring moving left"])
    assert scores["all_correct"].tolist() == [0.0, 0.0, 0.0]
    assert scores["colour_acc"].tolist() == [0.0, 0.0, 1.0]
    assert scores["direction_acc"].tolist() == [0.0, 0.0, 0.0]  # frozen: no direction


def test_cleanliness_counts_dim_pixels():
    video = render("a green x moving down", 1)[None]
    dirty = video.clone()
    dirty[0, :, 0, :2, :2] = 0.2  # a dim grey patch of 4 pixels per frame on the background
    expected = 1.0 - 4 / (16 * 16)
    assert cleanliness(video).item() == 1.0
    assert abs(cleanliness(dirty).item() - expected) < 1e-6


def test_background_flicker_against_explicit_loop():
    torch.manual_seed(0)
    videos = torch.rand(2, 4, 3, 6, 6) * 0.4  # all background (below the object threshold)
    videos[0, :, :, 0, 0] = 1.0  # a static object pixel, excluded
    got = background_flicker(videos)
    for b in range(2):
        total, count = 0.0, 0
        for t in range(3):
            for y in range(6):
                for x in range(6):
                    if videos[b, t, :, y, x].max() > 0.5 or videos[b, t + 1, :, y, x].max() > 0.5:
                        continue
                    total += (videos[b, t + 1, :, y, x] - videos[b, t, :, y, x]).abs().sum().item()
                    count += 3
        assert abs(got[b].item() - (1 - total / count)) < 1e-5


def test_gold_scores_checks_its_inputs():
    with pytest.raises(ValueError, match="got 1 prompts for 2 videos"):
        gold_scores(torch.zeros(2, 4, 3, 16, 16), ["a red ring moving left"])
