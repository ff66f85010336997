import statistics

import pytest
import torch

from sp_grpo.callbacks.prompt_difficulty import DifficultyAwareSampler, PromptDifficulty


def _informativeness(rewards, group_size):
    """Reference: each group's population std over the root-mean-square of all groups' stds, capped at 1."""
    groups = [rewards[i : i + group_size] for i in range(0, len(rewards), group_size)]
    spreads = [statistics.pstdev(g) for g in groups]
    pooled = (sum(s * s for s in spreads) / len(spreads)) ** 0.5
    return [min(1.0, s / pooled) if pooled > 0 else 0.0 for s in spreads]


def test_update_keeps_per_prompt_emas():
    tracker = PromptDifficulty(decay=0.5, min_weight=0.2)
    first = [0.0, 1.0, 0.9, 0.9, 0.1, 0.3]
    second = [0.5, 0.5, 0.2, 0.8, 0.0, 0.4]
    tracker.update(["a"] * 2 + ["b"] * 2 + ["c"] * 2, torch.tensor(first), 2)
    tracker.update(["a"] * 2 + ["b"] * 2 + ["d"] * 2, torch.tensor(second), 2)
    i1, i2 = _informativeness(first, 2), _informativeness(second, 2)
    expected = {"a": 0.5 * i1[0] + 0.5 * i2[0], "b": 0.5 * i1[1] + 0.5 * i2[1], "c": i1[2], "d": i2[2]}
    assert tracker.informativeness == pytest.approx(expected, abs=1e-6)
    assert tracker.mean_reward["a"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.5)
    assert tracker.groups_seen == {"a": 2, "b": 2, "c": 1, "d": 1}
    weights = tracker.weights_for(["a", "b", "unseen"]).tolist()
    assert weights == pytest.approx([0.2 + 0.8 * expected["a"], 0.2 + 0.8 * expected["b"], 1.0], abs=1e-6)


def test_status_separates_mastered_from_hopeless():
    tracker = PromptDifficulty(decay=0.0)
    tracker.update(["easy"] * 2 + ["hard"] * 2 + ["mid"] * 2, torch.tensor([1.0, 1.0, 0.0, 0.0, 0.2, 0.8]), 2)
    assert tracker.status("easy") == "mastered"
    assert tracker.status("hard") == "hopeless"
    assert tracker.status("mid") == "learning"
    assert tracker.status("new") == "unseen"


def test_state_round_trip():
    tracker = PromptDifficulty()
    tracker.update(["a", "a", "b", "b"], torch.tensor([0.0, 1.0, 0.5, 0.5]), 2)
    again = PromptDifficulty()
    again.load_state_dict(tracker.state_dict())
    assert again.state_dict() == tracker.state_dict()


def test_tracker_errors():
    with pytest.raises(ValueError, match=r"`decay` \(1.0\) must be in \[0, 1\)"):
        PromptDifficulty(decay=1.0)
    with pytest.raises(ValueError, match=r"`min_weight` \(0.0\) must be in \(0, 1\]"):
        PromptDifficulty(min_weight=0.0)
    with pytest.raises(ValueError, match=r"`prompts` has 3 entries but `rewards` has 4"):
        PromptDifficulty().update(["a", "a", "b"], torch.zeros(4), 2)


def test_sampler_favours_informative_prompts_and_shards_ranks():
    tracker = PromptDifficulty(decay=0.0, min_weight=0.05)
    tracker.update(["flat"] * 2 + ["spread"] * 2, torch.tensor([0.5, 0.5, 0.0, 1.0]), 2)
    prompts = ["flat", "spread"]
    sampler = DifficultyAwareSampler(prompts, tracker, num_samples=4000, seed=3)
    drawn = list(sampler)
    assert len(drawn) == len(sampler) == 4000
    share_flat = drawn.count(0) / len(drawn)
    assert share_flat == pytest.approx(0.05 / 1.05, abs=0.02)
    assert list(sampler) == drawn  # same epoch, same draw
    sampler.set_epoch(1)
    assert list(sampler) != drawn
    ranks = [list(DifficultyAwareSampler(prompts, tracker, 10, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    everything = list(DifficultyAwareSampler(prompts, tracker, 10, seed=3))
    assert ranks[0] == everything[0::2] and ranks[1] == everything[1::2]


def test_sampler_errors():
    tracker = PromptDifficulty()
    with pytest.raises(ValueError, match="`prompts` is empty"):
        DifficultyAwareSampler([], tracker, 4)
    with pytest.raises(ValueError, match=r"`num_samples` \(1\) must be at least `world_size` \(2\)"):
        DifficultyAwareSampler(["a"], tracker, 1, world_size=2)
    with pytest.raises(ValueError, match=r"`rank` \(2\) must be in \[0, 2\)"):
        DifficultyAwareSampler(["a"], tracker, 4, rank=2, world_size=2)
