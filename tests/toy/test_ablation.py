"""benchmarks/curriculum_ablation.py and ablation_report.py: arms run from a demo-like config, and the
report's statistics (paired differences, intervals, hacking) match hand computations."""

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

from sp_grpo.toy.gold import GOLD_METRICS

ROOT = Path(__file__).parents[2]
BENCHMARKS = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report():
    return _load("ablation_report")


@pytest.fixture(scope="module")
def ablation():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling ablation_report, as when run
    try:
        yield _load("curriculum_ablation")
    finally:
        sys.path.remove(str(BENCHMARKS))


def _run(arm: str, seed: int, all_correct: float, train_gain: float = 0.0, before: float = 0.5, cleanliness: float = 0.5) -> dict:
    start = {m: 0.5 for m in GOLD_METRICS} | {"all_correct": before}
    train = {"first": {"fidelity": 0.5, "semantic": 0.2}, "last": {"fidelity": 0.5 + train_gain, "semantic": 0.2 + train_gain}}
    after = {**start, "all_correct": all_correct, "cleanliness": cleanliness}
    return {"arm": arm, "seed": seed, "before": start, "after": after, "train": train}


def _rows(text: str) -> dict[str, list[str]]:
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines() if line.startswith("| ")}


def test_table_reports_mean_std_and_per_seed_values(report):
    runs = [_run("self_paced", 1, 0.4), _run("self_paced", 0, 0.2), _run("static_equal", 0, 0.3)]
    text = report.table(runs)
    rows = _rows(text)
    # Mean 0.3; sample std of (0.2, 0.4) is sqrt(0.02) = 0.141.
    assert rows["self_paced (n=2)"][0] == f"0.300 ± {math.sqrt(0.02):.3f}"
    assert rows["static_equal (n=1)"][0] == "0.300 ± 0.000"
    assert "semantic_only" not in text
    assert "all_correct per seed, self_paced: 0: 0.200, 1: 0.400" in text
    assert "cleanliness per seed, self_paced: 0: 0.500, 1: 0.500" in text


def test_paired_difference_and_its_interval_match_a_hand_computation(report):
    base = [0.30, 0.32, 0.28, 0.35]
    arm = [0.33, 0.30, 0.31, 0.39]
    runs = [_run("static_equal", s, v) for s, v in enumerate(base)] + [_run("paper_literal", s, v) for s, v in enumerate(arm)]
    runs.append(_run("paper_literal", 9, 0.9))  # no baseline run with seed 9: not paired, left out
    diffs = [a - b for a, b in zip(arm, base)]
    assert report.paired_differences(runs, "paper_literal") == pytest.approx(diffs)
    mean = sum(diffs) / 4
    half = 3.182 * statistics.stdev(diffs) / 2  # t(0.975, 3 dof) * s / sqrt(4)
    assert report.mean_interval(diffs) == pytest.approx((mean, mean - half, mean + half))
    cell = _rows(report.table(runs))["paper_literal (n=5)"][5]
    assert cell == f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] (n=4)"


def test_t_quantiles(report):
    assert report.t_quantile_975(1) == 12.706 and report.t_quantile_975(7) == 2.365 and report.t_quantile_975(200) == 1.96
    with pytest.raises(ValueError, match="at least 2 paired values"):
        report.t_quantile_975(0)


def test_hacking_is_training_reward_up_while_gold_down(report):
    assert report.is_hacked(_run("semantic_only", 0, 0.1, train_gain=0.05, before=0.3))
    assert not report.is_hacked(_run("semantic_only", 0, 0.4, train_gain=0.05, before=0.3))  # gold up
    assert not report.is_hacked(_run("semantic_only", 0, 0.1, train_gain=-0.05, before=0.3))  # reward down
    runs = [_run("static_equal", 0, 0.3), _run("semantic_only", 0, 0.1, train_gain=0.05), _run("semantic_only", 1, 0.6, train_gain=0.05)]
    assert _rows(report.table(runs))["semantic_only (n=2)"][-2:] == ["1", "0"]


def test_cleanliness_hacking_needs_a_fall_beyond_its_margin_and_gets_its_own_paired_column(report):
    # Start at 0.5: a fall to 0.495 is within the 0.01 margin, a fall to 0.48 is hacking (reward up).
    assert not report.is_hacked(_run("self_paced", 0, 0.5, train_gain=0.05, cleanliness=0.495), "cleanliness")
    assert report.is_hacked(_run("self_paced", 0, 0.5, train_gain=0.05, cleanliness=0.48), "cleanliness")
    assert not report.is_hacked(_run("self_paced", 0, 0.5, train_gain=-0.05, cleanliness=0.48), "cleanliness")
    base, arm = [0.50, 0.46, 0.48], [0.49, 0.47, 0.50]
    runs = [_run("static_equal", s, 0.3, train_gain=0.05, before=0.3, cleanliness=v) for s, v in enumerate(base)]
    runs += [_run("self_paced", s, 0.3, train_gain=0.05, before=0.3, cleanliness=v) for s, v in enumerate(arm)]
    diffs = [a - b for a, b in zip(arm, base)]
    mean, low, high = report.mean_interval(diffs)
    row = _rows(report.table(runs))["self_paced (n=3)"]
    assert row[6] == f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] (n=3)"
    assert row[-2:] == ["0", "1"]  # all_correct never fell; cleanliness fell by 0.03 on one seed
    assert _rows(report.table(runs))["static_equal (n=3)"][-1] == "2"


def test_report_writes_curves_and_hacking_figures_per_block(report, tmp_path):
    runs = []
    for seed in range(2):
        for arm, end in (("static_equal", 0.3), ("paper_literal", 0.35)):
            run = _run(arm, seed, end) | {"start": "weak", "regime": "kl0.1"}
            run["curve"] = {"0": {"all_correct": 0.2, "cleanliness": 0.9}, "50": {"all_correct": end, "cleanliness": 0.9}}
            runs.append(run)
    text = report.report(runs, tmp_path)
    assert text.startswith("### start weak, kl0.1")
    for name in ("curves_weak_kl0.1.png", "hacking_weak_kl0.1.png", "curves_cleanliness_weak_kl0.1.png", "hacking_cleanliness_weak_kl0.1.png"):
        assert (tmp_path / name).stat().st_size > 5000


def test_set_overrides_or_adds_a_nested_value_and_rejects_unknown_sections(ablation):
    config = ablation.load_config(None, ["model.kl_coef=0", "model.sampler.num_steps=4", "data.batch_size=2"])
    assert config["model"]["kl_coef"] == 0 and config["model"]["sampler"]["num_steps"] == 4 and config["data"]["batch_size"] == 2
    assert ablation.load_config(None, ["model.sampler.train_steps=window"])["model"]["sampler"]["train_steps"] == "window"
    assert ablation.load_config(None, ["model.learning_rate=1e-3"])["model"]["learning_rate"] == 0.001  # not the string
    with pytest.raises(KeyError, match="has no section 'modle'"):
        ablation.load_config(None, ["modle.kl_coef=0"])
    with pytest.raises(ValueError, match="must be key=value"):
        ablation.load_config(None, ["model.kl_coef"])


@pytest.mark.parametrize("arm", ["static_equal", "paper_literal"])
def test_one_arm_runs_from_a_demo_like_config(ablation, arm):
    threads = torch.get_num_threads()  # run_arm sets the process's thread count; keep the suite's
    try:
        result = ablation.run_arm(
            arm, seed=0, max_steps=2, gold_seeds=1, gold_every=1, val_seeds=1,
            overrides=["model.group_size=2", "data.batch_size=2"],
        )
    finally:
        torch.set_num_threads(threads)
    assert (result["arm"], result["seed"], result["start"], result["regime"]) == (arm, 0, "shipped", "kl0.1")
    assert set(result["before"]) == set(result["after"]) == set(result["val_after"]) == set(GOLD_METRICS)
    assert sorted(result["curve"], key=int) == ["0", "1", "2"]
    assert result["train"]["iterations"] == 2 and set(result["train"]["first"]) == {"fidelity", "temporal", "semantic"}
    # The same pre-trained checkpoint is evaluated before every run; two steps move it a little at most.
    assert 0.0 < result["before"]["colour_acc"] <= 1.0
    assert abs(result["after"]["colour_acc"] - result["before"]["colour_acc"]) < 0.5


def test_weak_start_is_clearly_weaker_than_the_shipped_checkpoint_on_validation():
    from sp_grpo.toy import WEAK_CHECKPOINT_DIR

    weak_start = _load("weak_start")
    shipped, weak = weak_start.score(None, seeds=1), weak_start.score(str(WEAK_CHECKPOINT_DIR), seeds=1)
    assert weak["fidelity"] < shipped["fidelity"] - 0.05 and weak["temporal"] < shipped["temporal"] - 0.05
    assert weak["colour_acc"] > 0.8  # colour is already learned: groups have spread to learn from


def test_load_fills_fields_that_older_result_files_lack(report, tmp_path):
    old, new = _run("static_equal", 0, 0.3), _run("paper_literal", 0, 0.35) | {"start": "weak", "regime": "kl0"}
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (old, new)) + "\n")
    loaded = report.load([path], {"start": "shipped", "regime": "kl0.1"})
    assert [(r["start"], r["regime"]) for r in loaded] == [("shipped", "kl0.1"), ("weak", "kl0")]  # a run's own fields win


def test_late_readout_averages_the_second_half_of_the_curve(report):
    run = _run("static_equal", 0, 0.40)
    run["curve"] = {str(s): {"all_correct": v} for s, v in ((0, 0.25), (50, 0.5), (100, 0.30), (150, 0.35), (200, 0.40))}
    # Second half of 200 iterations: steps 150 and 200 (step 100 is the midpoint, not after it).
    assert report.late_mean(run) == pytest.approx(0.375)
    assert report.outcome(run, readout="final") == 0.40 and report.outcome(run, readout="late") == pytest.approx(0.375)
    assert report.late_mean(run, "shape_acc") == 0.5  # not in the curve: the final evaluation
    other = _run("paper_literal", 0, 0.10)
    other["curve"] = {"0": {"all_correct": 0.25}, "200": {"all_correct": 0.45}}
    assert report.paired_differences([run, other], "paper_literal", readout="late") == pytest.approx([0.45 - 0.375])
    with pytest.raises(ValueError, match="'final' or 'late'"):
        report.outcome(run, readout="best")


def test_resume_skips_exactly_the_runs_the_file_holds(ablation, tmp_path):
    out = tmp_path / "runs.jsonl"
    assert ablation.finished_runs(out) == set()
    row = {"arm": "static_equal", "seed": 3, "start": "shipped", "overrides": ["model.kl_coef=0"], "max_steps": 150}
    old = {"arm": "self_paced", "seed": 3, "start": "shipped", "overrides": []}  # before runs recorded max_steps
    out.write_text(json.dumps(row) + "\n" + json.dumps(old) + "\n")
    done = ablation.finished_runs(out)
    assert done == {ablation.run_key("static_equal", 3, "shipped", ["model.kl_coef=0"], 150)}
    assert ablation.run_key("static_equal", 3, "shipped", [], 150) not in done  # another regime
    assert ablation.run_key("static_equal", 3, "shipped", ["model.kl_coef=0"], 300) not in done  # another length
