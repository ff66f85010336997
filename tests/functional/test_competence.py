import math
import statistics

import pytest
import torch

from sp_grpo.functional.competence import (
    CompetenceState,
    competence,
    gain_zscore,
    level_competence,
    persistent_competence,
    progress_competence,
    reset_aspects,
    saturation_competence,
    smoothstep,
    update_competence,
)
from sp_grpo.functional.curriculum import ratchet, stage_index, stage_weights, unlock_progress


def _hoyer(group):
    g = len(group)
    l1 = sum(abs(x) for x in group)
    l2 = math.sqrt(sum(x * x for x in group))
    if l2 == 0:
        return 0.0
    return min(1.0, max(0.0, (math.sqrt(g) - l1 / l2) / (math.sqrt(g) - 1)))


def _reference(batches, group_size, decay, warmup, paired_only=True):
    """One aspect's statistics with plain floats and loops, straight from the module docstring."""
    ref_means, ref_within, ref_sp, ref_sp_var = [], [], [], []
    gain = trend = fresh_ema = ref_ema = change = change_var = change_ref = h_base = 0.0
    baselines = {}
    for t, (row, prompts) in enumerate(batches):
        groups = [row[i : i + group_size] for i in range(0, len(row), group_size)]
        names = prompts[::group_size]
        means = [sum(g) / len(g) for g in groups]
        pooled = sum(statistics.variance(g) for g in groups) / len(groups)
        var_of_mean = [pooled / group_size for _ in groups]
        sps = [_hoyer(g) for g in groups]
        batch_sp = sum(sps) / len(sps)
        batch_sp_var = statistics.variance(sps) / len(sps)
        if t < warmup:
            ref_means += means
            ref_within.append(sum(statistics.variance(g) for g in groups) / len(groups))
            ref_sp.append(batch_sp)
            ref_sp_var.append(batch_sp_var)
        else:
            mu0 = sum(ref_means) / len(ref_means)
            var0 = statistics.variance(ref_means)
            n0 = len(ref_means)
            h0 = sum(ref_sp) / len(ref_sp)
            diffs, fresh, refs, unpaired, h_diffs, h_refs = [], [], [], 0, [], []
            for name, m, v, h in zip(names, means, var_of_mean, sps):
                if name in baselines:
                    b, vb, hb = baselines[name]
                    diffs.append(m - b)
                    fresh.append(v)
                    refs.append(vb)
                    h_diffs.append(h - hb)
                    h_refs.append(hb)
                elif not paired_only:
                    diffs.append(m - mu0)
                    fresh.append(var0)
                    unpaired += 1
                    h_diffs.append(h - h0)
                    h_refs.append(h0)
            n = len(diffs)
            if n >= 2:
                batch_change = sum(h_diffs) / n
                batch_change_var = statistics.variance(h_diffs) / n
                paired = n - unpaired
                batch_change_ref = (paired / n) * batch_change_var + (unpaired / n) ** 2 * 2 * (
                    sum(ref_sp_var) / len(ref_sp_var)
                ) / warmup
                first_h = change_var == 0
                change = decay * change + (1 - decay) * batch_change
                change_var = batch_change_var if first_h else decay * change_var + (1 - decay) * batch_change_var
                change_ref = batch_change_ref if first_h else decay * change_ref + (1 - decay) * batch_change_ref
                h_base = sum(h_refs) / n if first_h else decay * h_base + (1 - decay) * sum(h_refs) / n
            if n:
                batch_gain = sum(diffs) / n
                batch_fresh = sum(fresh) / n**2
                batch_ref = sum(refs) / n**2 + (unpaired / n) ** 2 * var0 / n0
                new_gain = decay * gain + (1 - decay) * batch_gain
                trend = decay * trend + (1 - decay) * (new_gain - gain)
                gain = new_gain
                first = fresh_ema == 0
                fresh_ema = batch_fresh if first else decay * fresh_ema + (1 - decay) * batch_fresh
                ref_ema = batch_ref if first else decay * ref_ema + (1 - decay) * batch_ref
        for name, m, v, h in zip(names, means, var_of_mean, sps):
            baselines.setdefault(name, (m, v, h))
    return {
        "ref_mean": sum(ref_means) / len(ref_means),
        "ref_var_between": statistics.variance(ref_means),
        "ref_within": sum(ref_within) / len(ref_within),
        "ref_sparsity": sum(ref_sp) / len(ref_sp),
        "ref_sparsity_var": sum(ref_sp_var) / len(ref_sp_var),
        "gain": gain,
        "trend": trend,
        "fresh_var": fresh_ema,
        "ref_var": ref_ema,
        "sparsity_change": change,
        "sparsity_var": change_var,
        "sparsity_ref_var": change_ref,
        "sparsity_base": h_base,
        "baselines": baselines,
    }


def _batches(seed, steps, num_prompts=5, prompts_per_batch=3, group_size=4):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        index = torch.randint(0, num_prompts, (prompts_per_batch,), generator=generator).tolist()
        rewards = (0.2 + 0.1 * torch.tensor(index).repeat_interleave(group_size) + 0.01 * t).float()
        rewards = rewards + 0.1 * torch.rand(prompts_per_batch * group_size, generator=generator)
        out.append((rewards.tolist(), [f"p{i}" for i in index for _ in range(group_size)]))
    return out


def test_update_competence_matches_loop_reference():
    batches = _batches(0, 12)
    state = CompetenceState.initial(1)
    for row, prompts in batches:
        state = update_competence(state, torch.tensor([row]), 4, prompts, decay=0.8, warmup_steps=4)
    expected = _reference(batches, 4, 0.8, 4)
    assert state.steps.tolist() == [12]
    assert state.ref_var_between.item() == pytest.approx(expected["ref_var_between"], rel=1e-4)
    for name in ("ref_mean", "ref_within", "ref_sparsity", "ref_sparsity_var", "gain", "trend", "fresh_var",
                 "ref_var", "sparsity_change", "sparsity_var", "sparsity_ref_var", "sparsity_base"):
        assert getattr(state, name).item() == pytest.approx(expected[name], rel=1e-4, abs=1e-7), name
    assert set(state.baselines) == set(expected["baselines"])
    for prompt, values in expected["baselines"].items():
        assert state.baselines[prompt][:, 0].tolist() == pytest.approx(list(values), rel=1e-4, abs=1e-7)


def test_without_prompts_every_group_is_compared_with_the_start():
    batches = _batches(1, 10)
    state = CompetenceState.initial(1)
    for row, _ in batches:
        state = update_competence(state, torch.tensor([row]), 4, None, decay=0.8, warmup_steps=4)
    expected = _reference(
        [(row, [f"new{t}-{i}" for i in range(len(row))]) for t, (row, _) in enumerate(batches)], 4, 0.8, 4, False
    )
    for name in ("gain", "fresh_var", "ref_var", "sparsity_change", "sparsity_var", "sparsity_ref_var"):
        assert getattr(state, name).item() == pytest.approx(expected[name], rel=1e-4), name
    assert state.baselines == {}


def test_update_competence_does_not_modify_its_input_and_bounds_its_baselines():
    state = CompetenceState.initial(1)
    new = update_competence(state, torch.rand(1, 8), 2, ["a", "a", "b", "b", "c", "c", "d", "d"], max_prompts=3)
    assert state.steps.tolist() == [0] and state.baselines == {}
    assert list(new.baselines) == ["b", "c", "d"]  # the oldest was dropped


def test_reset_aspects_forgets_only_the_chosen_aspects():
    state = CompetenceState.initial(2)
    for t in range(6):
        state = update_competence(state, torch.rand(2, 8) + 0.1 * t, 4, ["x"] * 4 + ["y"] * 4, warmup_steps=2)
    reset = reset_aspects(state, torch.tensor([False, True]))
    assert reset.steps.tolist() == [6, 0]
    assert reset.gain[0] == state.gain[0] and reset.gain[1] == 0 and reset.ref_mean[1] == 0
    assert torch.isnan(reset.baselines["x"][:, 1]).all() and torch.equal(reset.baselines["x"][:, 0], state.baselines["x"][:, 0])
    # The reset aspect takes a new baseline on its next visit.
    again = update_competence(reset, torch.rand(2, 8), 4, ["x"] * 4 + ["y"] * 4, warmup_steps=2)
    assert not torch.isnan(again.baselines["x"]).any()


def test_state_round_trips_through_plain_values():
    state = CompetenceState.initial(3)
    for t, (row, prompts) in enumerate(_batches(2, 25)):
        state = update_competence(state, torch.tensor([row] * 3), 4, prompts)
    again = CompetenceState.from_dict(state.to_dict())
    assert torch.equal(again.steps, state.steps)
    for name in ("ref_mean", "ref_m2", "gain", "fresh_var", "ref_var", "sparsity_change", "sparsity_base"):
        assert torch.equal(getattr(again, name), getattr(state, name))
    assert again.baselines.keys() == state.baselines.keys()


def _state(**values):
    base = CompetenceState.initial(1)
    return CompetenceState(**{**base.__dict__, **{k: torch.tensor([float(v)]) for k, v in values.items()}})


def test_readouts_match_their_formulas():
    beta = 0.9
    state = _state(
        steps=30, ref_mean=0.4, ref_m2=0.09 * 39, ref_groups=40, ref_within=0.01, ref_sparsity=0.2,
        ref_sparsity_var=0.0004, gain=0.08, trend=0.0005, fresh_var=0.0016, ref_var=0.0001, sparsity_change=-0.12,
        sparsity_var=0.0004, sparsity_ref_var=0.0001, sparsity_base=0.2,
    )
    state = CompetenceState(**{**state.__dict__, "steps": torch.tensor([30])})
    se = math.sqrt(0.0016 * (1 - beta) / (1 + beta) + 0.0001)
    z = 0.08 / se
    assert gain_zscore(state, beta).item() == pytest.approx(z, rel=1e-5)

    def step(x, lo, hi):
        u = min(1.0, max(0.0, (x - lo) / (hi - lo)))
        return u * u * (3 - 2 * u)

    unit = math.sqrt(0.01 + 0.09)
    assert progress_competence(state, 0.5, 3.0, beta).item() == pytest.approx(
        min(1.0, 0.08 / (0.5 * unit)) * step(z, 2.0, 4.0), rel=1e-5
    )
    se_level = math.sqrt(0.09 / 40 + se**2)
    assert level_competence(state, torch.tensor([0.45]), beta).item() == pytest.approx(
        step((0.48 - 0.45) / se_level, -1.0, 1.0), rel=1e-5
    )
    assert level_competence(state, torch.tensor([float("nan")]), beta).item() == 0.0
    se_h = math.sqrt(0.0004 * (1 - beta) / (1 + beta) + 0.0001)
    stalled = min(1.0, max(0.0, 1 - 0.0005 / (0.01 * unit)))
    assert saturation_competence(state, 0.5, 0.01, 3.0, beta).item() == pytest.approx(
        min(1.0, (0.12 / 0.2) / 0.5) * step(0.12 / se_h, 3.0, 5.0) * stalled, rel=1e-5
    )
    both = competence(state, 0.5, 3.0, torch.tensor([0.45]), 0.5, 0.01, 20, beta)
    assert both.item() == pytest.approx(
        max(
            progress_competence(state, 0.5, 3.0, beta).item(),
            level_competence(state, torch.tensor([0.45]), beta).item(),
            saturation_competence(state, 0.5, 0.01, 3.0, beta).item(),
        )
    )
    assert competence(state, warmup_steps=30).item() == 0.0  # still warming up


def test_noise_free_readouts():
    flat = _state(steps=30, ref_mean=0.2, ref_groups=10)
    assert gain_zscore(flat).item() == 0.0
    assert competence(flat).item() == 0.0
    moved = _state(steps=30, ref_mean=0.2, ref_groups=10, gain=0.1)
    assert gain_zscore(moved).item() == math.inf
    assert smoothstep(torch.tensor([-1.0, 0.25, 3.0]), 0.0, 1.0).tolist() == pytest.approx([0.0, 0.15625, 1.0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_gain": 0.0}, r"`target_gain` \(0.0\) must be positive"),
        ({"significance": 0.5}, r"`significance` \(0.5\) must be above 1"),
        ({"saturation": 1.5}, r"`saturation` \(1.5\) must be in \(0, 1\]"),
        ({"stall_slope": -1.0}, r"`stall_slope` \(-1.0\) must be positive"),
    ],
)
def test_competence_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        competence(CompetenceState.initial(1), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay": 1.0}, r"`decay` \(1.0\) must be in \[0, 1\)"),
        ({"warmup_steps": 0}, r"`warmup_steps` \(0\) must be at least 1"),
        ({"group_size": 1}, r"`group_size` \(1\) must be at least 2"),
        ({"prompts": ["a"]}, r"`prompts` has 1 entries for 4 rewards"),
    ],
)
def test_update_competence_errors(kwargs, match):
    args = {"state": CompetenceState.initial(1), "rewards": torch.rand(1, 4), "group_size": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        update_competence(**args)


def test_update_competence_shape_error():
    with pytest.raises(ValueError, match=r"shape \(K=2, P\*G\)"):
        update_competence(CompetenceState.initial(2), torch.rand(3, 4), 2)


# -- behaviour: noise never advances, a trend of a stated size does ---------------------------------


def _curriculum(reward_fn, steps, warmup=20, decay=0.9, group_size=4, persistence=0.0):
    """The curriculum maths end to end; reward_fn(t, weights) -> (rewards (3, P*G), prompts or None)."""
    state = CompetenceState.initial(3)
    progress = unlock_progress(torch.zeros(3))
    stages, history = [], []
    value = torch.zeros(3)
    for t in range(steps):
        rewards, prompts = reward_fn(t, stage_weights(progress))
        state = update_competence(state, rewards, group_size, prompts, decay, warmup)
        value = persistent_competence(value, competence(state, warmup_steps=warmup, decay=decay), persistence)
        history.append(value)
        progress = ratchet(progress, unlock_progress(value))
        stages.append(stage_index(progress))
    return stages, torch.stack(history)


def _prompted(generator, levels, index, group_size=4, noise=0.1):
    rewards = levels[:, index].repeat_interleave(group_size, dim=1)
    rewards = rewards + noise * torch.randn(rewards.shape, generator=generator)
    return rewards, [f"prompt {i}" for i in index.tolist() for _ in range(group_size)]


@pytest.mark.parametrize("seed", range(6))
def test_noise_with_a_drifting_prompt_mix_never_advances(seed):
    # 40 prompts whose levels differ (0.1 to 0.5); the batches first draw the hard prompts, then the
    # easy ones: the batch mean rises by 0.3 although no prompt improves.
    generator = torch.Generator().manual_seed(seed)
    levels = torch.linspace(0.1, 0.5, 40).repeat(3, 1)

    def reward_fn(t, weights):
        centre = min(39, t // 15)
        index = (centre + torch.randint(-2, 3, (4,), generator=generator)).clamp(0, 39)
        return _prompted(generator, levels, index)

    stages, history = _curriculum(reward_fn, 1000)
    assert max(stages) == 0
    assert history.max().item() < 0.5


@pytest.mark.parametrize("seed", range(6))
def test_noise_without_prompts_never_advances(seed):
    generator = torch.Generator().manual_seed(100 + seed)

    def reward_fn(t, weights):
        return 0.1 * torch.rand(3, 16, generator=generator), None

    stages, history = _curriculum(reward_fn, 1000, warmup=5, decay=0.8)
    assert max(stages) == 0
    assert history.max().item() < 0.6


def test_constant_rewards_never_advance():
    stages, history = _curriculum(lambda t, w: (torch.full((3, 8), 0.2), ["a"] * 4 + ["b"] * 4), 200)
    assert max(stages) == 0 and history.max().item() == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_a_rise_of_two_percent_of_a_std_per_step_advances_within_90_steps(seed):
    # Rewards of std ~0.12 (noise 0.1, prompt levels spread 0.2) whose mean rises 0.002 per step in
    # proportion to the aspect's weight, as GRPO would train it.
    stages, history = _rising(seed, decay=0.9, persistence=0.0)
    assert 1 in stages and stages.index(1) < 90
    assert stages == sorted(stages) and stages[-1] == 2
    # Readable: no step moves competence by more than 0.3, and on average by under 0.01.
    steps = (history[1:] - history[:-1]).abs()
    assert steps.max().item() < 0.3 and steps.mean().item() < 0.01


# -- persistence: competence that must hold for several steps ------------------------------------


def test_persistent_competence_matches_a_loop_reference_and_bounds_each_step():
    generator = torch.Generator().manual_seed(0)
    raw = torch.rand(50, 3, generator=generator)
    for rho in (0.0, 0.5, 0.9):
        value, reference = torch.zeros(3), [0.0, 0.0, 0.0]
        for row in raw:
            previous = value
            value = persistent_competence(value, row, rho)
            reference = [rho * c + (1 - rho) * float(x) for c, x in zip(reference, row)]
            assert value.tolist() == pytest.approx(reference, abs=1e-6)
            assert (value - previous).abs().max().item() <= 1 - rho + 1e-6
    with pytest.raises(ValueError, match=r"`persistence` \(1.0\) must be in \[0, 1\)"):
        persistent_competence(torch.zeros(3), torch.zeros(3), 1.0)


def _rising(seed, decay, persistence):
    generator = torch.Generator().manual_seed(seed)
    levels = 0.3 + 0.2 * torch.rand(3, 50, generator=generator)
    skill = torch.zeros(3, 1)

    def reward_fn(t, weights):
        skill.add_(0.002 * weights[:, None])
        rewards, prompts = _prompted(generator, levels, torch.randint(0, 50, (4,), generator=generator))
        return rewards + skill, prompts

    return _curriculum(reward_fn, 400, decay=decay, persistence=persistence)


def _drifting_mix(seed, decay, persistence):
    generator = torch.Generator().manual_seed(seed)
    levels = torch.linspace(0.1, 0.5, 40).repeat(3, 1)

    def reward_fn(t, weights):
        index = (min(39, t // 15) + torch.randint(-2, 3, (4,), generator=generator)).clamp(0, 39)
        return _prompted(generator, levels, index)

    return _curriculum(reward_fn, 1000, decay=decay, persistence=persistence)


@pytest.mark.parametrize("seed", range(4))
def test_at_a_short_decay_persistence_keeps_noise_out_and_the_curve_readable(seed):
    # decay 0.8 (configs/demo.yaml) averages few batches: without persistence the drifting prompt mix
    # of seed 0 reaches competence 0.81 and advances a stage (measured). Persistence 0.9 holds noise
    # below 0.5, bounds each step of the curve by 0.1, and still advances a real rise within 90 steps.
    stages, history = _drifting_mix(seed, decay=0.8, persistence=0.9)
    assert max(stages) == 0 and history.max().item() < 0.5
    stages, history = _rising(seed, decay=0.8, persistence=0.9)
    assert 1 in stages and stages.index(1) < 90 and stages[-1] == 2
    assert (history[1:] - history[:-1]).abs().max().item() <= 0.1 + 1e-6
