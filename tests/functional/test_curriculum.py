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


def _reference_states(batches, group_size, decay, warmup):
    """Per-aspect statistics with plain floats and loops."""
    num = len(batches[0])
    ref_mean, ref_var, ref_spread = [0.0] * num, [0.0] * num, [0.0] * num
    level, trend, spread = [0.0] * num, [0.0] * num, [0.0] * num
    for t, batch in enumerate(batches, start=1):
        for k, row in enumerate(batch):
            groups = [row[i : i + group_size] for i in range(0, len(row), group_size)]
            mean = sum(row) / len(row)
            var = sum((r - mean) ** 2 for r in row) / len(row)
            pooled = math.sqrt(sum(statistics.pvariance(g) for g in groups) / len(groups))
            if t <= warmup:
                ref_mean[k] += (mean - ref_mean[k]) / t
                ref_var[k] += (var - ref_var[k]) / t
                ref_spread[k] += (pooled - ref_spread[k]) / t
                spread[k] = ref_spread[k]
            else:
                z = (mean - ref_mean[k]) / math.sqrt(ref_var[k])
                new_level = decay * level[k] + (1 - decay) * z
                trend[k] = decay * trend[k] + (1 - decay) * (new_level - level[k])
                level[k] = new_level
                spread[k] = decay * spread[k] + (1 - decay) * pooled
    return {
        "ref_mean": ref_mean,
        "ref_std": [math.sqrt(v) for v in ref_var],
        "ref_spread": ref_spread,
        "level": level,
        "trend": trend,
        "spread": spread,
    }


def test_update_competence_matches_loop_reference():
    batches = [(_rewards(t, (2, 8)) + 0.05 * t).tolist() for t in range(9)]
    state = CompetenceState.initial(2)
    for batch in batches:
        state = update_competence(state, torch.tensor(batch), group_size=4, decay=0.8, warmup_steps=3)
    expected = _reference_states(batches, 4, 0.8, 3)
    assert state.steps == 9
    for name, values in expected.items():
        assert getattr(state, name).tolist() == pytest.approx(values, rel=1e-4, abs=1e-5), name


def test_update_competence_does_not_modify_its_input():
    state = CompetenceState.initial(1)
    update_competence(state, torch.rand(1, 4), 2, warmup_steps=1)
    assert state.steps == 0 and state.ref_mean.tolist() == [0.0]


def test_competence_matches_formula():
    state = CompetenceState(
        steps=30,
        ref_mean=torch.zeros(3),
        ref_std=torch.ones(3),
        ref_spread=torch.tensor([1.0, 1.0, 0.0]),
        level=torch.tensor([0.5, 0.1, 2.0]),
        trend=torch.tensor([0.02, 0.002, 0.0]),
        spread=torch.tensor([0.9, 0.2, 0.0]),
    )
    got = competence(state, target_gain=1.0, stall_slope=0.01, warmup_steps=20)

    def clip(x):
        return min(1.0, max(0.0, x))

    expected = [
        max(clip(0.5 / 1.0), clip(1 - 0.9 / 1.0) * clip(1 - 0.02 / 0.01)),  # mastery 0.5, still improving
        max(clip(0.1 / 1.0), clip(1 - 0.2 / 1.0) * clip(1 - 0.002 / 0.01)),  # saturated: 0.8 * 0.8
        1.0,  # mastered; no reference spread, so no plateau term
    ]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_competence_is_zero_during_warmup():
    state = CompetenceState.initial(2)
    for t in range(5):
        state = update_competence(state, torch.rand(2, 4) + t, 2, warmup_steps=5)
    assert competence(state, warmup_steps=5).tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay": 1.0}, r"`decay` \(1.0\) must be in \[0, 1\)"),
        ({"warmup_steps": 0}, r"`warmup_steps` \(0\) must be at least 1"),
    ],
)
def test_update_competence_setting_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        update_competence(CompetenceState.initial(1), torch.rand(1, 4), 2, **kwargs)


def test_update_competence_shape_error():
    with pytest.raises(ValueError, match=r"shape \(K=2, P\*G\)"):
        update_competence(CompetenceState.initial(2), torch.rand(3, 4), 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_gain": 0.0}, r"`target_gain` \(0.0\) must be positive"),
        ({"stall_slope": -1.0}, r"`stall_slope` \(-1.0\) must be positive"),
    ],
)
def test_competence_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        competence(CompetenceState.initial(1), **kwargs)


def test_state_round_trips_through_plain_values():
    state = CompetenceState.initial(3)
    for t in range(25):
        state = update_competence(state, _rewards(t, (3, 8)) + 0.01 * t, 4)
    again = CompetenceState.from_dict(state.to_dict())
    assert again.steps == state.steps
    for name in ("ref_mean", "ref_std", "ref_spread", "level", "trend", "spread"):
        assert torch.equal(getattr(again, name), getattr(state, name))


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
