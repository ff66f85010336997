import importlib
import json
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from sp_grpo.callbacks.base import gather_step
from sp_grpo.callbacks.curriculum import SelfPacedCurriculum, StaticWeights
from sp_grpo.callbacks.prompt_difficulty import PromptDifficulty
from sp_grpo.functional.curriculum import (
    CompetenceState,
    competence,
    ratchet,
    stage_weights,
    unlock_progress,
    update_competence,
)

from .curriculum_toy import ASPECTS, ToyRewardModule

# Settings that move fast enough for short test runs.
FAST = {"warmup_steps": 5, "decay": 0.8}


def _trainer(tmp_path, max_steps, callbacks, **kwargs):
    defaults = {
        "max_steps": max_steps,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return pl.Trainer(callbacks=callbacks, **(defaults | kwargs))


class _CaptureOutputs(Callback):
    def __init__(self):
        self.outputs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(outputs)


@pytest.mark.parametrize("automatic", [False, True])
def test_lightning_passes_the_step_dict_to_on_train_batch_end(tmp_path, automatic):
    capture = _CaptureOutputs()
    _trainer(tmp_path, 2, [capture]).fit(ToyRewardModule(automatic=automatic))
    assert len(capture.outputs) == 2
    out = capture.outputs[0]
    assert set(out["aspect_rewards"]) == set(ASPECTS)
    assert out["aspect_rewards"]["temporal"].shape == (16,)
    assert out["group_size"] == 4 and len(out["prompts"]) == 16


def test_rising_rewards_advance_through_all_stages_with_default_settings(tmp_path):
    curriculum = SelfPacedCurriculum()
    module = ToyRewardModule(rate=0.002)  # the weighted aspect rises by 0.02 starting stds per step
    _trainer(tmp_path, 300, [curriculum], logger=CSVLogger(tmp_path, name="", version=""), log_every_n_steps=1).fit(module)
    stages = [record["stage"] for record in curriculum.history]
    assert stages == sorted(stages)
    first = [stages.index(stage) for stage in range(3)]
    assert first[0] < first[1] < first[2] < 300
    # The module trained with what the callback wrote: fidelity first, semantic last.
    assert module.seen_weights[0] == pytest.approx({"fidelity": 1.0, "temporal": 0.0, "semantic": 0.0}, abs=1e-6)
    assert module.seen_weights[-1] == pytest.approx({"fidelity": 0.15, "temporal": 0.15, "semantic": 0.7}, abs=1e-3)
    for weights in module.seen_weights:
        assert min(weights.values()) >= 0.0
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-6)
    assert (tmp_path / "curriculum.png").stat().st_size > 0  # drawn from the CSV logger's metrics.csv in its folder


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_flat_rewards_do_not_advance(tmp_path, noise):
    curriculum = SelfPacedCurriculum(**FAST)
    _trainer(tmp_path, 80, [curriculum]).fit(ToyRewardModule(rising=False, noise=noise))
    assert {record["stage"] for record in curriculum.history} == {0}
    assert curriculum.current_weights()["fidelity"] > 0.95


def test_logs_weights_competence_stage_and_zero_spread(tmp_path):
    curriculum = SelfPacedCurriculum(**FAST)
    trainer = _trainer(tmp_path, 12, [curriculum], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    trainer.fit(ToyRewardModule(noise=0.0))  # noise-free: every group is flat
    metrics = trainer.callback_metrics
    for aspect in ASPECTS:
        assert f"curriculum/weight_{aspect}" in metrics and f"curriculum/competence_{aspect}" in metrics
    assert metrics["curriculum/stage"].item() == curriculum.stage
    assert metrics["curriculum/zero_std_groups"].item() == 4.0
    assert (tmp_path / "lightning_logs" / "version_0" / "curriculum.png").exists()


def test_zero_spread_counts_only_flat_groups(tmp_path):
    class HalfFlat(ToyRewardModule):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            for rewards in out["aspect_rewards"].values():
                rewards[:8] = 0.5  # first two groups flat in every aspect
            return out

    curriculum = SelfPacedCurriculum(**FAST)
    trainer = _trainer(tmp_path, 3, [curriculum])
    trainer.fit(HalfFlat())
    assert trainer.callback_metrics["curriculum/zero_std_groups"].item() == 2.0


def test_callback_matches_the_functional_maths(tmp_path):
    module = ToyRewardModule()
    curriculum = SelfPacedCurriculum(**FAST)
    capture = _CaptureOutputs()
    _trainer(tmp_path, 40, [curriculum, capture]).fit(module)
    state = CompetenceState.initial(3)
    progress = unlock_progress(torch.zeros(3), threshold=0.7)
    average = torch.zeros(3)
    for out, record in zip(capture.outputs, curriculum.history):
        rewards = torch.stack([out["aspect_rewards"][a] for a in ASPECTS])
        state = update_competence(state, rewards, 4, out["prompts"], decay=0.8, warmup_steps=5)
        # The default persistence 0.9 averages competence over steps before it unlocks anything.
        average = 0.9 * average + 0.1 * competence(state, warmup_steps=5, decay=0.8)
        progress = ratchet(progress, unlock_progress(average, threshold=0.7))
        assert list(record["competence"].values()) == pytest.approx(average.tolist(), abs=1e-6)
        assert list(record["weights"].values()) == pytest.approx(stage_weights(progress).tolist(), abs=1e-6)


@pytest.mark.filterwarnings("ignore:.*(pre-optimization state|dataloader is not resumable|callbacks used to create).*")
def test_crash_and_resume_matches_uninterrupted_run(tmp_path):
    steps, save_at = 60, 30
    full, full_difficulty = SelfPacedCurriculum(**FAST), PromptDifficulty()
    full_module = ToyRewardModule(rate=0.004)
    _trainer(tmp_path / "full", steps, [full, full_difficulty]).fit(full_module)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=save_at, save_top_k=-1)
    crashed = ToyRewardModule(rate=0.004, crash_at_step=save_at + 7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(
            tmp_path / "a", steps, [SelfPacedCurriculum(**FAST), PromptDifficulty(), checkpoint], enable_checkpointing=True
        ).fit(crashed)
    resumed, resumed_difficulty = SelfPacedCurriculum(**FAST), PromptDifficulty()
    resumed_module = ToyRewardModule(rate=0.004)
    _trainer(tmp_path / "b", steps, [resumed, resumed_difficulty]).fit(
        resumed_module, ckpt_path=tmp_path / "ckpt" / f"epoch=0-step={save_at}.ckpt"
    )

    assert max(record["stage"] for record in full.history) >= 1  # the stretch compared is not trivial
    assert len(resumed.history) == steps  # the (bounded) history covers the whole run
    for a, b in zip(full.history, resumed.history):
        assert a["step"] == b["step"] and a["stage"] == b["stage"]
        assert a["weights"] == pytest.approx(b["weights"], abs=1e-6)
        assert a["competence"] == pytest.approx(b["competence"], abs=1e-6)
    for a, b in zip(full_module.seen_weights[save_at:], resumed_module.seen_weights, strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    full_prompts, resumed_prompts = full_difficulty.state_dict(), resumed_difficulty.state_dict()
    for name in ("informativeness", "mean_reward", "groups_seen"):
        assert full_prompts[name] == pytest.approx(resumed_prompts[name], abs=1e-6)


def test_works_with_a_subset_of_aspects_read_from_the_module(tmp_path):
    curriculum = SelfPacedCurriculum(**FAST)
    module = ToyRewardModule(aspects=("fidelity", "semantic"), rate=0.01)
    _trainer(tmp_path, 60, [curriculum]).fit(module)
    assert curriculum.aspects == ("fidelity", "semantic")
    assert set(module.reward_weights) == {"fidelity", "semantic"}
    assert curriculum.stage == 1


def test_static_weights_normalise_write_and_log(tmp_path):
    static = StaticWeights({"semantic": 1.0, "fidelity": 3.0})
    assert static.current_weights() == {"fidelity": 0.75, "semantic": 0.25}
    module = ToyRewardModule(aspects=("fidelity", "semantic"))
    trainer = _trainer(tmp_path, 5, [static])
    trainer.fit(module)
    assert all(w == {"fidelity": 0.75, "semantic": 0.25} for w in module.seen_weights)
    assert trainer.callback_metrics["curriculum/weight_fidelity"].item() == pytest.approx(0.75)
    assert "curriculum/zero_std_groups" in trainer.callback_metrics


def test_static_weights_state_round_trip_keeps_the_configured_weights():
    saved = StaticWeights({"fidelity": 1.0}).state_dict()
    StaticWeights({"fidelity": 1.0}).load_state_dict(saved)  # same weights: silent
    changed = StaticWeights({"fidelity": 1.0, "temporal": 1.0})
    with pytest.warns(UserWarning, match="continuing with the configured weights"):
        changed.load_state_dict(saved)
    assert changed.current_weights() == {"fidelity": 0.5, "temporal": 0.5}


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"colour": 1.0}, r"`weights` has unknown aspects \['colour'\]; allowed: \['fidelity', 'temporal', 'semantic'\]"),
        ({"fidelity": -1.0, "temporal": 2.0}, r"`weights` must be non-negative, got \{'fidelity': -1.0\}"),
        ({"fidelity": 0.0}, r"sum to 0.0; give at least one aspect a positive weight"),
        ({}, r"`weights` is empty"),
    ],
)
def test_static_weights_errors(weights, match):
    with pytest.raises(ValueError, match=match):
        StaticWeights(weights)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"aspects": ["fidelity", "fidelity"]}, r"lists an aspect twice"),
        ({"aspects": ["motion"]}, r"`aspects` has unknown aspects \['motion'\]"),
        ({"decay": 1.5}, r"`decay` \(1.5\) must be in \[0, 1\)"),
        ({"warmup_steps": 0}, r"`warmup_steps` \(0\) must be at least 1"),
        ({"target_gain": 0.0}, r"`target_gain` \(0.0\) must be positive"),
        ({"stall_slope": 0.0}, r"`stall_slope` \(0.0\) must be positive"),
        ({"significance": 1.0}, r"`significance` \(1.0\) must be above 1"),
        ({"saturation": 0.0}, r"`saturation` \(0.0\) must be in \(0, 1\]"),
        ({"targets": {"motion": 0.5}}, r"`targets` has unknown aspects \['motion'\]"),
        ({"strictness_step": 0.0}, r"`strictness_step` \(0.0\) must be in \(0, 1\]"),
        ({"strictness_start": 1.5}, r"`strictness_start` \(1.5\) must be in \[0, 1\]"),
        ({"max_prompts": 0}, r"`max_prompts` \(0\) must be at least 1"),
        ({"gate": "step"}, r"`gate` \('step'\) must be one of \['sigmoid', 'smoothstep'\]"),
        ({"threshold": 0.0}, r"`threshold` \(0.0\) must be in \(0, 1\)"),
        ({"width": -0.1}, r"`width` \(-0.1\) must be positive"),
        ({"floor": 0.34}, r"`floor` \(0.34\) must be in \[0, 1/3\) for 3 aspects"),
        ({"zero_spread_eps": -1.0}, r"`zero_spread_eps` \(-1.0\) must be non-negative"),
        ({"history_size": 0}, r"`history_size` \(0\) must be at least 1"),
        ({"persistence": 1.0}, r"`persistence` \(1.0\) must be in \[0, 1\)"),
    ],
)
def test_curriculum_setting_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfPacedCurriculum(**kwargs)


def test_floor_may_be_larger_for_fewer_aspects():
    assert SelfPacedCurriculum(aspects=["fidelity", "semantic"], floor=0.4).floor == 0.4


def test_module_without_reward_weights_is_rejected(tmp_path):
    class NoWeights(ToyRewardModule):
        def __init__(self):
            super().__init__()
            del self.reward_weights

    with pytest.raises(AttributeError, match="has no `reward_weights` dict"):
        _trainer(tmp_path, 1, [SelfPacedCurriculum()]).fit(NoWeights())


def test_module_with_empty_reward_weights_needs_aspects(tmp_path):
    module = ToyRewardModule()
    module.reward_weights = {}
    with pytest.raises(ValueError, match="cannot infer the aspects"):
        _trainer(tmp_path, 1, [SelfPacedCurriculum()]).fit(module)


def test_step_without_the_contract_keys_is_rejected(tmp_path):
    class NoRewards(ToyRewardModule):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            return {"group_size": out["group_size"]}

    with pytest.raises(KeyError, match="'aspect_rewards'"):
        _trainer(tmp_path, 1, [SelfPacedCurriculum()]).fit(NoRewards())


def test_step_missing_an_aspect_is_rejected(tmp_path):
    module = ToyRewardModule(aspects=("fidelity", "temporal"))
    with pytest.raises(KeyError, match=r"`aspect_rewards` lacks \['semantic'\]"):
        _trainer(tmp_path, 1, [SelfPacedCurriculum(aspects=list(ASPECTS))]).fit(module)


def test_resume_with_other_aspects_is_rejected():
    source = SelfPacedCurriculum(aspects=list(ASPECTS))
    source.current_weights()  # creates the state
    with pytest.raises(ValueError, match="resume with the same aspects"):
        SelfPacedCurriculum(aspects=["fidelity"]).load_state_dict(source.state_dict())


def test_state_key_distinguishes_configurations():
    assert SelfPacedCurriculum().state_key != SelfPacedCurriculum(aspects=["fidelity"]).state_key
    assert StaticWeights({"fidelity": 1.0}).state_key != SelfPacedCurriculum().state_key


def test_two_processes_use_identical_weights(tmp_path, monkeypatch):
    # Spawned processes unpickle the module by name: import the toy under a name they can find,
    # whatever import mode pytest uses.
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    toy = importlib.import_module("curriculum_toy")
    # persistence 0: the functional replay below reads competence as each step computes it.
    curriculum, difficulty = SelfPacedCurriculum(**FAST, persistence=0.0), PromptDifficulty()
    module = toy.ToyRewardModule(rate=0.01)  # each rank draws different rewards (seeded by rank)
    trainer = _trainer(
        tmp_path,
        25,
        [curriculum, difficulty, toy.DumpWeights(str(tmp_path), curriculum, difficulty)],
        strategy="ddp_spawn",
        devices=2,
        use_distributed_sampler=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == rank1
    assert len(rank0["history"]) == 25 and rank0["history"][-1]["stage"] >= 1

    # The same as one process fed both ranks' rewards, rank after rank.
    state, progress = CompetenceState.initial(3), unlock_progress(torch.zeros(3), threshold=0.7)
    skill = torch.zeros(3)
    for step, record in enumerate(rank0["history"]):
        skill += 0.01 * stage_weights(progress)
        rewards = torch.cat(
            [0.3 + skill[:, None] + 0.1 * torch.randn(3, 16, generator=torch.Generator().manual_seed(10_000 * r + step)) for r in (0, 1)],
            dim=1,
        )
        prompts = [f"prompt {(step * 4 + p) % 7}" for p in range(4) for _ in range(4)] * 2  # rank 0, then rank 1
        state = update_competence(state, rewards, 4, prompts, decay=0.8, warmup_steps=5)
        progress = ratchet(progress, unlock_progress(competence(state, warmup_steps=5, decay=0.8), threshold=0.7))
        assert list(record["weights"].values()) == pytest.approx(stage_weights(progress).tolist(), abs=1e-5)


def test_gather_handles_ranks_with_different_batch_sizes():
    local, other = torch.arange(8.0).reshape(2, 4), 10 + torch.arange(4.0).reshape(2, 2)

    class TwoRankStrategy:
        world_size = 2

        def all_gather(self, tensor):
            if tensor.dim() == 1:  # the sizes
                return torch.stack([tensor, torch.tensor([other.shape[1]])])
            return torch.stack([tensor, torch.nn.functional.pad(other, (0, tensor.shape[1] - other.shape[1]))])

    class TwoRankTrainer:
        world_size = 2
        strategy = TwoRankStrategy()

    rewards, prompts = gather_step(TwoRankTrainer(), local, None)
    assert prompts is None
    assert torch.equal(rewards, torch.cat([local, other], dim=1))


def test_checkpoint_state_is_bounded(tmp_path):
    curriculum = SelfPacedCurriculum(history_size=5, max_prompts=3, **FAST)
    _trainer(tmp_path, 12, [curriculum]).fit(ToyRewardModule())
    state = curriculum.state_dict()
    assert [record["step"] for record in state["history"]] == list(range(8, 13))  # the latest five
    restored = SelfPacedCurriculum(history_size=5, max_prompts=3, **FAST)
    restored.load_state_dict(state)
    assert restored.history == curriculum.history


def test_no_plot_without_a_csv_logger(tmp_path):
    _trainer(tmp_path, 3, [SelfPacedCurriculum(**FAST)]).fit(ToyRewardModule())
    assert not list(tmp_path.rglob("*.png"))


def test_plot_is_drawn_from_the_logged_metrics(tmp_path, monkeypatch):
    import sp_grpo.callbacks.curriculum as curriculum_module

    drawn = {}
    monkeypatch.setattr(curriculum_module, "plot_curriculum", lambda csv, png, aspects: drawn.update(csv=csv, png=png))
    trainer = _trainer(tmp_path, 4, [SelfPacedCurriculum(**FAST)], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    trainer.fit(ToyRewardModule())
    folder = tmp_path / "lightning_logs" / "version_0"
    assert drawn == {"csv": folder / "metrics.csv", "png": folder / "curriculum.png"}
    rows = (folder / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and "curriculum/weight_fidelity" in rows[0]  # flushed before plotting


def test_run_with_nothing_logged_yet_warns_instead_of_plotting(tmp_path):
    trainer = _trainer(tmp_path, 2, [SelfPacedCurriculum(**FAST)], logger=CSVLogger(tmp_path), log_every_n_steps=50)
    with pytest.warns(UserWarning, match=r"no curriculum.png, nothing to plot in .*metrics.csv \(a run shorter than `trainer.log_every_n_steps` \(50\)"):
        trainer.fit(ToyRewardModule())
    assert not list(tmp_path.rglob("*.png"))
