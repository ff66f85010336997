import math
import statistics

import pytest
import torch

from sp_grpo.functional.curriculum import (
    ASPECTS,
    GATES,
    CompetenceState,
    competence,
    group_informativeness,
    group_means,
    group_spread,
    ratchet,
    sigmoid_gate,
    smoothstep_gate,
    stage_index,
    stage_weights,
    unlock_progress,
    update_competence,
    zero_spread_groups,
)


def _rewards(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# -- group statistics ------------------------------------------------------------------------------


def test_group_means_and_spread_match_loops():
    rewards = _rewards(0, (2, 12))
    means, spreads = group_means(rewards, 3), group_spread(rewards, 3)
    assert means.shape == spreads.shape == (2, 4)
    for k in range(2):
        for p in range(4):
            group = rewards[k, 3 * p : 3 * p + 3].tolist()
            assert means[k, p].item() == pytest.approx(sum(group) / 3, abs=1e-6)
            assert spreads[k, p].item() == pytest.approx(statistics.pstdev(group), abs=1e-6)


def test_group_spread_upcasts_low_precision():
    rewards = torch.tensor([1.0, 1.0078125, 1.0, 1.0], dtype=torch.bfloat16)
    assert group_spread(rewards, 2).dtype == torch.float32


def test_zero_spread_groups_match_loop_and_ignore_unweighted_aspects():
    rewards = torch.tensor(
        [
            [0.5, 0.5, 0.1, 0.9, 0.3, 0.3],  # fidelity: groups 0 and 2 flat
            [0.2, 0.7, 0.4, 0.4, 0.6, 0.6],  # temporal: groups 1 and 2 flat
        ]
    )
    every = zero_spread_groups(rewards, 2)
    expected = [all(rewards[k, 2 * p] == rewards[k, 2 * p + 1] for k in range(2)) for p in range(3)]
    assert every.tolist() == expected == [False, False, True]
    only_fidelity = zero_spread_groups(rewards, 2, weights=torch.tensor([1.0, 0.0]))
    assert only_fidelity.tolist() == [True, False, True]


def test_zero_spread_groups_errors():
    with pytest.raises(ValueError, match=r"shape \(K, P\*G\)"):
        zero_spread_groups(torch.zeros(4), 2)
    with pytest.raises(ValueError, match="one weight per aspect"):
        zero_spread_groups(torch.zeros(2, 4), 2, weights=torch.ones(3))


def test_group_informativeness_matches_formula():
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.2, 0.4])
    info = group_informativeness(rewards, 2)
    spreads = [statistics.pstdev(rewards[2 * p : 2 * p + 2].tolist()) for p in range(3)]
    pooled = math.sqrt(sum(s * s for s in spreads) / 3)
    assert info.tolist() == pytest.approx([min(1.0, s / pooled) for s in spreads], abs=1e-6)
    assert info[1].item() == 0.0
    assert group_informativeness(torch.ones(4), 2).tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    ("size", "group_size", "match"),
    [(6, 1, r"`group_size` \(1\) must be at least 2"), (7, 2, r"number of rewards \(7\) must be a multiple")],
)
def test_group_shape_errors(size, group_size, match):
    with pytest.raises(ValueError, match=match):
        group_spread(torch.zeros(size), group_size)


# -- competence ----------------------------------------------------------------------------------


# -- gates, progress and weights -----------------------------------------------------------------


def test_gates_match_formulas():
    values = [0.0, 0.55, 0.6, 0.7, 0.75, 0.8, 1.0]
    c = torch.tensor(values)
    sig = sigmoid_gate(c, 0.7, 0.2).tolist()
    smooth = smoothstep_gate(c, 0.7, 0.2).tolist()
    for v, s, m in zip(values, sig, smooth):
        assert s == pytest.approx(1 / (1 + math.exp(-6 * (v - 0.7) / 0.2)), abs=1e-6)
        x = min(1.0, max(0.0, (v - 0.6) / 0.2))
        assert m == pytest.approx(3 * x**2 - 2 * x**3, abs=1e-6)
    assert smooth[0] == 0.0 and smooth[-1] == 1.0 and smooth[3] == pytest.approx(0.5)
    assert sig[3] == pytest.approx(0.5)


@pytest.mark.parametrize("gate", sorted(GATES))
def test_unlock_progress_is_a_running_product(gate):
    c = torch.tensor([0.9, 0.65, 0.3])
    g = GATES[gate](c, 0.7, 0.2).tolist()
    expected = [1.0, g[0], g[0] * g[1]]
    assert unlock_progress(c, gate, 0.7, 0.2).tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gate": "relu"}, r"`gate` \('relu'\) must be one of \['sigmoid', 'smoothstep'\]"),
        ({"threshold": 1.0}, r"`threshold` \(1.0\) must be in \(0, 1\)"),
        ({"width": 0.0}, r"`width` \(0.0\) must be positive"),
    ],
)
def test_unlock_progress_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        unlock_progress(torch.zeros(3), **kwargs)


def test_stage_weights_match_formula():
    progress = torch.tensor([1.0, 0.8, 0.3])
    rho = 0.1
    u = progress.tolist() + [0.0]
    passed = sum(u[1:])
    expected = [(1 - rho * passed) * (u[k] - u[k + 1]) + rho * u[k + 1] for k in range(3)]
    assert stage_weights(progress, rho).tolist() == pytest.approx(expected, abs=1e-6)


def test_stage_weights_at_the_stages():
    assert stage_weights(torch.tensor([1.0, 0.0, 0.0]), 0.15).tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert stage_weights(torch.tensor([1.0, 1.0, 0.0]), 0.15).tolist() == pytest.approx([0.15, 0.85, 0.0])
    assert stage_weights(torch.tensor([1.0, 1.0, 1.0]), 0.15).tolist() == pytest.approx([0.15, 0.15, 0.7])
    assert stage_weights(torch.tensor([1.0]), 0.0).tolist() == [1.0]


def test_stage_weights_are_valid_for_any_non_increasing_progress():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        u1, u2 = sorted(torch.rand(2, generator=generator).tolist(), reverse=True)
        weights = stage_weights(torch.tensor([1.0, u1, u2]), floor=0.3)
        assert (weights >= 0).all()
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_stage_weights_floor_error():
    with pytest.raises(ValueError, match=r"`floor` \(0.4\) must be in \[0, 1/3\)"):
        stage_weights(torch.ones(3), floor=0.4)


def test_stage_index_and_ratchet():
    assert stage_index(torch.tensor([1.0, 0.4, 0.1])) == 0
    assert stage_index(torch.tensor([1.0, 0.5, 0.1])) == 1
    assert stage_index(torch.tensor([1.0, 0.9, 0.6])) == 2
    assert ratchet(torch.tensor([1.0, 0.7, 0.2]), torch.tensor([1.0, 0.3, 0.4])).tolist() == pytest.approx(
        [1.0, 0.7, 0.4]
    )


# -- the pieces together -------------------------------------------------------------------------


def _run(reward_fn, steps, group_size=4):
    """Drive the curriculum maths with rewards that may respond to the current weights."""
    state = CompetenceState.initial(len(ASPECTS))
    progress = unlock_progress(torch.zeros(len(ASPECTS)))
    stages, all_weights = [], []
    for t in range(steps):
        weights = stage_weights(progress)
        all_weights.append(weights)
        state = update_competence(state, reward_fn(t, weights), group_size)
        progress = ratchet(progress, unlock_progress(competence(state)))
        stages.append(stage_index(progress))
    return stages, all_weights


def test_rising_rewards_advance_through_every_stage_in_order():
    generator = torch.Generator().manual_seed(0)
    skill = torch.zeros(3)

    def reward_fn(t, weights):
        # Each aspect improves in proportion to its weight: a generator trained by the curriculum.
        skill.add_(0.002 * weights)
        return 0.3 + skill[:, None] + 0.1 * torch.randn(3, 16, generator=generator)

    stages, all_weights = _run(reward_fn, 400)
    first = {stage: stages.index(stage) for stage in range(3)}
    assert first[0] < first[1] < first[2] < 400
    assert stages == sorted(stages)  # monotone progress
    assert all_weights[-1].tolist() == pytest.approx([0.15, 0.15, 0.7], abs=1e-3)
    for weights in all_weights:
        assert (weights >= 0).all() and weights.sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_flat_noisy_low_rewards_do_not_advance(seed):
    generator = torch.Generator().manual_seed(seed)
    stages, all_weights = _run(lambda t, w: 0.1 * torch.rand(3, 16, generator=generator), 300)
    assert max(stages) == 0
    assert all_weights[-1][0].item() > 0.95


def test_constant_rewards_do_not_advance():
    stages, _ = _run(lambda t, w: torch.full((3, 8), 0.2), 100)
    assert max(stages) == 0


def test_tighten_strictness_matches_reference():
    from sp_grpo.functional.curriculum import tighten_strictness

    nan = float("nan")
    strictness = [0.0, 0.8, nan, 1.0, 0.2]
    progress = [1.0, 0.9, 1.0, 1.0, 0.4]
    competence = [0.9, 0.75, 0.9, 0.9, 0.9]
    got, raised = tighten_strictness(torch.tensor(strictness), torch.tensor(progress), torch.tensor(competence), 0.7, 0.5)
    expected, expected_raised = [], []
    for s, u, c in zip(strictness, progress, competence):
        up = s == s and u >= 0.5 and c >= 0.7 and s < 1.0  # graded (not NaN), unlocked, competent, not yet strict
        expected.append(min(1.0, s + 0.5) if up else s)
        expected_raised.append(up)
    torch.testing.assert_close(got, torch.tensor(expected), equal_nan=True)
    assert raised.tolist() == expected_raised
