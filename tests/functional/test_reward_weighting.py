import math

import pytest
import torch

from sp_grpo.functional import aggregate_advantages, group_reward_weights, hoyer_sparsity

from .test_advantages import reference_group_advantages


# --- an independent reference: the paper's formulas, one group at a time, python floats only ---
def reference_hoyer(group):
    n = len(group)
    l1 = sum(abs(v) for v in group)
    l2 = math.sqrt(sum(v * v for v in group))
    if l2 == 0:
        return 0.0  # the documented convention for an all-zero group
    return (math.sqrt(n) - l1 / l2) / (math.sqrt(n) - 1)


def reference_weights(rows, group_size, thresholds, beta, slope):
    """rows: K lists of P*G floats -> K lists of P weights, by the paper's Eq. 5-7."""
    num_groups = len(rows[0]) // group_size
    out = [[0.0] * num_groups for _ in rows]
    for g in range(num_groups):
        groups = [row[g * group_size : (g + 1) * group_size] for row in rows]
        sparsity = [reference_hoyer(group) for group in groups] + [0.0]
        utility = []
        for j, group in enumerate(groups):
            mean = sum(group) / group_size
            level = 1.0 / (1.0 + math.exp(-slope * (mean - thresholds[j])))
            utility.append(level + beta * (sparsity[j] - sparsity[j + 1]))
        total = sum(math.exp(u) for u in utility)
        for j, u in enumerate(utility):
            out[j][g] = math.exp(u) / total
    return out


@pytest.mark.parametrize("group_size", [2, 3, 8, 16])
def test_hoyer_sparsity_matches_the_formula(group_size):
    rewards = torch.rand(2, 5 * group_size, generator=torch.Generator().manual_seed(group_size))
    rewards[0, :group_size] = 0.0  # one all-zero group
    rewards[1, group_size : 2 * group_size] = 0.7  # one constant group
    expected = [[reference_hoyer(row[i : i + group_size]) for i in range(0, len(row), group_size)] for row in rewards.tolist()]
    torch.testing.assert_close(hoyer_sparsity(rewards, group_size), torch.tensor(expected), atol=1e-5, rtol=0)


def test_hoyer_sparsity_extremes_and_edge_cases():
    assert hoyer_sparsity(torch.zeros(4), 4).item() == 0.0  # all zero: separates nothing
    assert hoyer_sparsity(torch.full((6,), 0.83), 6).item() == pytest.approx(0.0, abs=1e-6)  # constant
    assert hoyer_sparsity(torch.tensor([0.0, 0.0, 0.0, 2.0]), 4).item() == pytest.approx(1.0, abs=1e-6)  # one-hot
    assert hoyer_sparsity(torch.tensor([0.0, 1.0]), 2).item() == pytest.approx(1.0, abs=1e-6)  # G = 2
    # Negative entries count by magnitude (the norms' definition): sign-blind, as documented.
    assert hoyer_sparsity(torch.tensor([-1.0, 1.0]), 2).item() == pytest.approx(0.0, abs=1e-6)
    assert hoyer_sparsity(torch.tensor([-0.2, 0.4]), 2).item() == pytest.approx(hoyer_sparsity(torch.tensor([0.2, 0.4]), 2).item())
    # Invariant to scaling, and a spread-out group is sparser than a compressed one.
    r = torch.tensor([0.1, 0.5, 0.9, 0.3])
    assert hoyer_sparsity(3 * r, 4).item() == pytest.approx(hoyer_sparsity(r, 4).item(), abs=1e-6)
    assert hoyer_sparsity(r, 4) > hoyer_sparsity(0.8 + 0.1 * r, 4)


def test_hoyer_sparsity_keeps_leading_dimensions():
    rewards = torch.rand(2, 3, 12, generator=torch.Generator().manual_seed(0))
    out = hoyer_sparsity(rewards, 4)
    assert out.shape == (2, 3, 3)
    torch.testing.assert_close(out[1, 2], hoyer_sparsity(rewards[1, 2], 4))


@pytest.mark.parametrize("beta,slope", [(0.3, 1.0), (0.1, 1.0), (0.5, 4.0), (0.0, 10.0)])
@pytest.mark.parametrize("group_size", [2, 4, 16])
def test_group_reward_weights_match_the_formula(beta, slope, group_size):
    rewards = torch.rand(3, 4 * group_size, generator=torch.Generator().manual_seed(group_size))
    rewards[2, :group_size] = 0.0  # a semantic group that is all wrong
    rewards[0, group_size : 2 * group_size] = 0.9  # a saturated fidelity group
    thresholds = [0.75, 0.6, 0.8]
    expected = reference_weights(rewards.tolist(), group_size, thresholds, beta, slope)
    out = group_reward_weights(rewards, group_size, torch.tensor(thresholds), beta=beta, slope=slope)
    torch.testing.assert_close(out, torch.tensor(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.sum(dim=0), torch.ones(4))


def test_group_reward_weights_single_component_is_one():
    out = group_reward_weights(torch.rand(1, 8, generator=torch.Generator().manual_seed(1)), 4, torch.tensor([0.5]))
    torch.testing.assert_close(out, torch.ones(1, 2))


def test_group_reward_weights_directions():
    # Two components with equal spread: the one above its threshold gets more weight.
    spread = torch.tensor([0.0, 0.2, 0.0, 0.2])
    rewards = torch.stack([0.7 + spread, 0.1 + spread])
    w = group_reward_weights(rewards, 4, torch.tensor([0.5, 0.5]), beta=0.0)
    assert w[0, 0] > w[1, 0]
    # Equal levels: the component that separates the group more than the next one gains weight.
    rewards = torch.stack([torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.tensor([0.2, 0.3, 0.2, 0.3])])
    w = group_reward_weights(rewards, 4, rewards.reshape(2, 1, 4).mean(-1).reshape(2), beta=0.5)
    assert w[0, 0] > 0.5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rewards=torch.rand(8), thresholds=torch.tensor([0.5])), r"must be 2-D \(K, P \* G\)"),
        (dict(thresholds=torch.tensor([0.5])), r"`thresholds` must have shape \(3,\)"),
        (dict(beta=-0.1), r"`beta` \(-0.1\) must be non-negative"),
        (dict(slope=0.0), r"`slope` \(0.0\) must be positive"),
        (dict(group_size=1), r"`group_size` \(1\) must be at least 2"),
        (dict(group_size=3), r"must be a multiple of `group_size` \(3\)"),
        (dict(rewards=torch.tensor([[0.1, float("nan")]] * 3)), "NaN or infinite"),
    ],
)
def test_group_reward_weights_errors(kwargs, match):
    args = dict(rewards=torch.rand(3, 8), group_size=2, thresholds=torch.full((3,), 0.75)) | kwargs
    with pytest.raises(ValueError, match=match):
        group_reward_weights(**args)


@pytest.mark.parametrize("mode", ["sum_then_normalize", "normalize_then_sum"])
def test_per_group_weights_aggregate_like_the_loop_reference(mode):
    group_size = 4
    rows = torch.rand(3, 3 * group_size, generator=torch.Generator().manual_seed(7))
    weights = group_reward_weights(rows, group_size, torch.tensor([0.75, 0.75, 0.75]))
    names = ("fidelity", "temporal", "semantic")
    out = aggregate_advantages(
        dict(zip(names, rows)), dict(zip(names, weights)), group_size, mode=mode, scale="group"
    )
    # Reference: weights expanded to every sample of their group, then the plain loop.
    per_sample = weights.repeat_interleave(group_size, dim=1)
    if mode == "sum_then_normalize":
        expected = reference_group_advantages((per_sample * rows).sum(0).tolist(), group_size, "group")
    else:
        expected = sum(per_sample[k] * reference_group_advantages(rows[k].tolist(), group_size, "group") for k in range(3))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_per_group_weights_equal_to_a_float_give_the_same_advantages():
    rows = {"fidelity": torch.rand(8), "semantic": torch.rand(8)}
    as_floats = aggregate_advantages(rows, {"fidelity": 0.3, "semantic": 0.7}, 4, mode="sum_then_normalize")
    as_groups = aggregate_advantages(
        rows, {"fidelity": torch.full((2,), 0.3), "semantic": torch.full((2,), 0.7)}, 4, mode="sum_then_normalize"
    )
    torch.testing.assert_close(as_groups, as_floats)


def test_per_group_weights_wrong_shape_or_negative_are_rejected():
    rows = {"fidelity": torch.rand(8)}
    with pytest.raises(ValueError, match=r"shape \(3,\) but the rewards hold 2 groups of 4"):
        aggregate_advantages(rows, {"fidelity": torch.ones(3)}, 4)
    with pytest.raises(ValueError, match="finite and non-negative"):
        aggregate_advantages(rows, {"fidelity": torch.tensor([1.0, -0.5])}, 4)
