import math

import pytest
import torch

from sp_grpo.functional.advantages import aggregate_advantages, clip_advantages, group_advantages

EPS = 1e-4


def population_std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def reference_group_advantages(rewards, group_size, scale, eps=EPS):
    """Loop over prompt-major groups, python floats only."""
    rewards = [float(r) for r in rewards]
    advantages = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = sum(group) / group_size
        if scale == "group":
            denominator = population_std(group) + eps
        elif scale == "batch":
            denominator = population_std(rewards) + eps
        else:
            denominator = 1.0
        advantages += [(r - mean) / denominator for r in group]
    return torch.tensor(advantages)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [2, 4])
def test_group_advantages_match_loop_reference(scale, group_size):
    rewards = torch.randn(3 * group_size, generator=torch.Generator().manual_seed(group_size)) * 3 + 1
    expected = reference_group_advantages(rewards.tolist(), group_size, scale)
    torch.testing.assert_close(group_advantages(rewards, group_size, scale), expected)


def test_group_advantages_equal_rewards_give_zero_and_dtype_is_fp32():
    rewards = torch.tensor([2.0, 2.0, 2.0, 1.0, 3.0, 5.0], dtype=torch.bfloat16)
    advantages = group_advantages(rewards, 3)
    assert advantages.dtype == torch.float32
    assert torch.equal(advantages[:3], torch.zeros(3))
    torch.testing.assert_close(advantages[3:], reference_group_advantages([1.0, 3.0, 5.0], 3, "group"))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("mode", ["normalize_then_sum", "sum_then_normalize"])
def test_aggregate_matches_reference(mode, scale):
    generator = torch.Generator().manual_seed(0)
    rewards = {"fidelity": torch.rand(8, generator=generator), "temporal": 10 * torch.rand(8, generator=generator)}
    weights = {"fidelity": 0.7, "temporal": 0.3}
    if mode == "normalize_then_sum":
        expected = sum(
            weights[name] * reference_group_advantages(r.tolist(), 4, scale) for name, r in rewards.items()
        )
    else:
        combined = [sum(weights[name] * rewards[name][i].item() for name in rewards) for i in range(8)]
        expected = reference_group_advantages(combined, 4, scale)
    actual = aggregate_advantages(rewards, weights, 4, mode=mode, scale=scale)
    torch.testing.assert_close(actual, expected.float())


@pytest.mark.parametrize("mode", ["normalize_then_sum", "sum_then_normalize"])
def test_zero_weight_reward_contributes_nothing(mode):
    generator = torch.Generator().manual_seed(1)
    fidelity, semantic = torch.rand(6, generator=generator), torch.rand(6, generator=generator)
    only = aggregate_advantages({"fidelity": fidelity}, {"fidelity": 1.0}, 3, mode=mode)
    both = aggregate_advantages(
        {"fidelity": fidelity, "semantic": semantic}, {"fidelity": 1.0, "semantic": 0.0}, 3, mode=mode
    )
    torch.testing.assert_close(both, only)


def test_clip_advantages():
    advantages = torch.tensor([-7.0, -2.0, 0.0, 1.5, 9.0])
    assert clip_advantages(advantages, None) is advantages
    expected = torch.tensor([max(-2.0, min(2.0, a)) for a in advantages.tolist()])
    assert torch.equal(clip_advantages(advantages, 2.0), expected)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("rewards", "group_size", "scale", "match"),
    [
        (
            torch.zeros(4), 1, "group",
            r"`group_size` \(1\) must be at least 2: GRPO compares samples within a group; "
            r"set `model.group_size` to 2 or more\.",
        ),
        (torch.zeros(2, 2), 2, "group", r"`rewards` must be 1-D \(P \* G,\), got shape \(2, 2\)"),
        (torch.zeros(5), 2, "group", r"`rewards` length \(5\) must be a multiple of `group_size` \(2\)"),
        (
            torch.zeros(4), 2, "global",
            r"`scale` \('global'\) is not a known advantage scale; choose one of \['group', 'batch', 'none'\]",
        ),
        (torch.tensor([0.0, NAN, 1.0, INF]), 2, "group", r"`rewards` has non-finite entries at indices \[1, 3\]"),
    ],
)
def test_group_advantages_errors(rewards, group_size, scale, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, group_size, scale)


ZEROS = torch.zeros(4)


@pytest.mark.parametrize(
    ("rewards", "weights", "kwargs", "match"),
    [
        ({}, {}, {}, r"`rewards` is empty"),
        ({"fidelity": ZEROS, "temporal": ZEROS}, {"fidelity": 1.0}, {}, r"rewards \['temporal'\] have no weight"),
        ({"fidelity": ZEROS}, {"fidelity": 1.0, "semantic": 1.0}, {}, r"weights \['semantic'\] name no reward"),
        (
            {"fidelity": ZEROS}, {"fidelity": -0.5}, {},
            r"weights must be finite and non-negative, got \{'fidelity': -0.5\}",
        ),
        ({"fidelity": ZEROS}, {"fidelity": NAN}, {}, r"weights must be finite and non-negative"),
        (
            {"fidelity": ZEROS}, {"fidelity": 1.0}, {"mode": "mean"},
            r"`mode` \('mean'\) is not a known aggregation; "
            r"choose one of \['normalize_then_sum', 'sum_then_normalize'\]",
        ),
        ({"fidelity": ZEROS}, {"fidelity": 1.0}, {"scale": "rank"}, r"`scale` \('rank'\) is not a known"),
        (
            {"fidelity": ZEROS, "temporal": torch.zeros(6)}, {"fidelity": 1.0, "temporal": 1.0}, {},
            r"all rewards must have the same shape",
        ),
        (
            {"temporal": torch.tensor([0.0, 1.0, NAN, 2.0])}, {"temporal": 0.0}, {},
            r"`rewards\['temporal'\]` has non-finite entries at indices \[2\]",
        ),
        ({"fidelity": ZEROS}, {"fidelity": 1.0}, {"group_size": 1}, r"`group_size` \(1\) must be at least 2"),
    ],
)
def test_aggregate_errors(rewards, weights, kwargs, match):
    group_size = kwargs.pop("group_size", 2)
    with pytest.raises(ValueError, match=match):
        aggregate_advantages(rewards, weights, group_size, **kwargs)


@pytest.mark.parametrize("max_abs", [0.0, -1.0, float("nan")])
def test_clip_advantages_error(max_abs):
    with pytest.raises(ValueError, match=r"`max_abs` \(.*\) must be positive"):
        clip_advantages(torch.zeros(3), max_abs)
