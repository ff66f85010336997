"""benchmarks/curriculum_ablation.py: one arm runs from a demo-like config, and its table summarises runs correctly."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import yaml

from sp_grpo.toy.gold import GOLD_METRICS

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("curriculum_ablation", ROOT / "benchmarks" / "curriculum_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(arm: str, seed: int, all_correct: float) -> dict:
    before = {m: 0.5 for m in GOLD_METRICS}
    return {"arm": arm, "seed": seed, "minutes": 1.0, "before": before, "after": {**before, "all_correct": all_correct}}


def test_table_reports_mean_and_sample_std_per_arm_and_per_seed_values(ablation):
    runs = [_run("self_paced", 1, 0.4), _run("self_paced", 0, 0.2), _run("static_equal", 0, 0.3)]
    text = ablation.table(runs)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    column = 1 + GOLD_METRICS.index("all_correct")
    # Mean 0.3; sample std of (0.2, 0.4) is sqrt(0.02) = 0.141.
    assert rows["self_paced (n=2)"].split("|")[column + 1].strip() == f"0.300 ± {math.sqrt(0.02):.3f}"
    assert rows["static_equal (n=1)"].split("|")[column + 1].strip() == "0.300 ± 0.000"
    assert "semantic_only" not in text
    assert "all_correct per seed, self_paced: 0: 0.200, 1: 0.400" in text


def test_one_arm_runs_from_a_demo_like_config(ablation, tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["model"]["group_size"] = 2
    config["data"]["batch_size"] = 2
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    threads = torch.get_num_threads()  # run_arm sets the process's thread count; keep the suite's
    try:
        result = ablation.run_arm("static_equal", seed=0, device="cpu", max_steps=1, threads=1, gold_seeds=1, config_path=str(path))
    finally:
        torch.set_num_threads(threads)
    assert (result["arm"], result["seed"]) == ("static_equal", 0)
    assert set(result["before"]) == set(result["after"]) == set(GOLD_METRICS)
    # The same pre-trained checkpoint is evaluated before every run; one step moves it a little at most.
    assert 0.0 < result["before"]["colour_acc"] <= 1.0
    assert abs(result["after"]["colour_acc"] - result["before"]["colour_acc"]) < 0.5
