import importlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from sp_grpo.callbacks import GroupRewardWeighting, GroupWeighting
from sp_grpo.functional import group_reward_weights, hoyer_sparsity

from .group_weighting_toy import ASPECTS, GroupWeightedToy
from .test_curriculum import _trainer

G = 4


def _group_means(rewards):
    return torch.tensor(rewards).reshape(3, -1, G).mean(-1)


def _check_seen(seen, *, beta, slope, fixed=None, calibrate=None, ranks=1):
    """Every step's thresholds and weights against an independent recomputation from the raw rewards.

    ``seen`` holds, per step, a list of the ranks' records (rewards, thresholds, weights).
    """
    history = []
    for step, records in enumerate(seen):
        if fixed is not None:
            expected_tau = torch.tensor(fixed)
        else:
            quantile, window, warmup = calibrate
            kept = history[-window:]
            expected_tau = (
                torch.quantile(torch.cat(kept, dim=1), quantile, dim=1) if step >= warmup else torch.full((3,), 0.75)
            )
        for record in records:
            torch.testing.assert_close(torch.tensor(record["thresholds"]), expected_tau.float(), atol=1e-6, rtol=0)
            expected = group_reward_weights(torch.tensor(record["rewards"]), G, expected_tau, beta=beta, slope=slope)
            got = torch.tensor([record["weights"][a] for a in ASPECTS])
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        history.append(torch.cat([_group_means(r["rewards"]) for r in records], dim=1))


def test_module_uses_the_published_weights_with_fixed_thresholds(tmp_path):
    weighting = GroupRewardWeighting(thresholds={"fidelity": 0.7, "temporal": 0.5, "semantic": 0.3}, beta=0.5, slope=4.0)
    module = GroupWeightedToy()
    _trainer(tmp_path, 12, [weighting]).fit(module)
    assert len(module.seen) == 12
    _check_seen([[s] for s in module.seen], beta=0.5, slope=4.0, fixed=[0.7, 0.5, 0.3])
    # The groups differ, so the weights differ between groups: a per-group weighting, not a global one.
    assert torch.tensor(module.seen[0]["weights"]["semantic"]).std() > 1e-3
    assert module.reward_weights == pytest.approx({a: 1 / 3 for a in ASPECTS})


def test_calibrated_thresholds_are_the_quantile_of_recent_group_means(tmp_path):
    weighting = GroupRewardWeighting(calibrate=True, quantile=0.3, window=5, warmup_steps=3)
    module = GroupWeightedToy()
    _trainer(tmp_path, 15, [weighting]).fit(module)
    _check_seen([[s] for s in module.seen], beta=0.3, slope=1.0, calibrate=(0.3, 5, 3))
    assert len(weighting.state_dict()["history"]) == 5  # bounded by the window
    # Calibration moved the targets away from the configured 0.75 toward each aspect's own level.
    tau = weighting.current_thresholds()
    assert tau["semantic"] < 0.4 < tau["fidelity"]


def test_logs_weight_sparsity_saturation_and_threshold(tmp_path):
    weighting = GroupRewardWeighting(thresholds=0.5)
    module = GroupWeightedToy()
    logger = CSVLogger(tmp_path, name="logs")
    _trainer(tmp_path, 3, [weighting], logger=logger, log_every_n_steps=1).fit(module)
    import csv

    rows = [r for r in csv.DictReader((Path(logger.log_dir) / "metrics.csv").open()) if r.get("curriculum/weight_fidelity")]
    assert len(rows) == 3
    last, rewards = rows[-1], torch.tensor(module.seen[-1]["rewards"])
    means = rewards.reshape(3, -1, G).mean(-1)
    for k, a in enumerate(ASPECTS):
        assert float(last[f"curriculum/weight_{a}"]) == pytest.approx(sum(module.seen[-1]["weights"][a]) / 4, abs=1e-5)
        assert float(last[f"curriculum/sparsity_{a}"]) == pytest.approx(hoyer_sparsity(rewards[k], G).mean().item(), abs=1e-5)
        assert float(last[f"curriculum/saturated_{a}"]) == pytest.approx((means[k] >= 0.5).float().mean().item())
        assert float(last[f"curriculum/threshold_{a}"]) == pytest.approx(0.5)
    assert float(last["curriculum/zero_std_groups"]) == 0.0


@pytest.mark.filterwarnings("ignore:.*(pre-optimization state|dataloader is not resumable|callbacks used to create).*")
def test_crash_and_resume_matches_uninterrupted_run(tmp_path):
    steps, save_at = 24, 10
    settings = dict(calibrate=True, window=6, warmup_steps=4)
    full_module = GroupWeightedToy()
    _trainer(tmp_path / "full", steps, [GroupRewardWeighting(**settings)]).fit(full_module)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=save_at, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(tmp_path / "a", steps, [GroupRewardWeighting(**settings), checkpoint], enable_checkpointing=True).fit(
            GroupWeightedToy(crash_at_step=save_at + 5)
        )
    resumed = GroupRewardWeighting(**settings)
    resumed_module = GroupWeightedToy()
    _trainer(tmp_path / "b", steps, [resumed]).fit(resumed_module, ckpt_path=tmp_path / "ckpt" / f"epoch=0-step={save_at}.ckpt")
    assert len(resumed_module.seen) == steps - save_at
    for a, b in zip(full_module.seen[save_at:], resumed_module.seen, strict=True):
        assert a["thresholds"] == pytest.approx(b["thresholds"], abs=1e-7)
        for aspect in ASPECTS:
            assert a["weights"][aspect] == pytest.approx(b["weights"][aspect], abs=1e-7)


def test_two_processes_use_identical_thresholds_from_all_ranks(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    toy = importlib.import_module("group_weighting_toy")  # spawned processes unpickle it by name
    weighting = GroupRewardWeighting(calibrate=True, window=4, warmup_steps=2)
    trainer = _trainer(
        tmp_path,
        8,
        [weighting, toy.DumpSeen(str(tmp_path), weighting)],
        strategy="ddp_spawn",
        devices=2,
        use_distributed_sampler=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(toy.GroupWeightedToy())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["state"] == ranks[1]["state"]
    assert ranks[0]["seen"][0]["rewards"] != ranks[1]["seen"][0]["rewards"]  # each rank has its own groups
    for s0, s1 in zip(ranks[0]["seen"], ranks[1]["seen"], strict=True):
        assert s0["thresholds"] == s1["thresholds"]
    # The thresholds are calibrated on both ranks' groups, as one process holding them all would.
    _check_seen(list(zip(ranks[0]["seen"], ranks[1]["seen"])), beta=0.3, slope=1.0, calibrate=(0.5, 4, 2))


def test_state_round_trip_and_configured_thresholds_win():
    source = GroupRewardWeighting(aspects=list(ASPECTS), calibrate=True, warmup_steps=1)
    source._ensure_state()
    source._history = [torch.tensor([[0.9, 0.8], [0.5, 0.4], [0.2, 0.1]])]
    source._batches = 1
    saved = source.state_dict()
    restored = GroupRewardWeighting(aspects=list(ASPECTS), calibrate=True, warmup_steps=1)
    restored.load_state_dict(saved)
    assert restored.current_thresholds() == pytest.approx({"fidelity": 0.85, "temporal": 0.45, "semantic": 0.15})
    fixed = GroupRewardWeighting(aspects=list(ASPECTS), thresholds=0.6)
    fixed.load_state_dict(saved)
    assert fixed.current_thresholds() == pytest.approx({a: 0.6 for a in ASPECTS})
    with pytest.raises(ValueError, match=r"checkpoint's weighting has aspects .* but `aspects` is \['semantic'\]"):
        GroupRewardWeighting(aspects=["semantic"]).load_state_dict(saved)


def test_group_weighting_object_weighs_missing_aspects_zero_and_rejects_absent_ones():
    weighting = GroupWeighting(("fidelity", "semantic"), (0.75, 0.75), beta=0.3, slope=1.0)
    rewards = {"fidelity": torch.rand(8), "temporal": torch.rand(8), "semantic": torch.rand(8)}
    out = weighting(rewards, 4)
    assert torch.equal(out["temporal"], torch.zeros(2))
    torch.testing.assert_close(out["fidelity"] + out["semantic"], torch.ones(2))
    with pytest.raises(KeyError, match=r"no rewards for \['semantic'\]"):
        weighting({"fidelity": torch.rand(8)}, 4)


def test_negative_rewards_warn_once(tmp_path):
    class Negative(GroupWeightedToy):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            out["aspect_rewards"]["semantic"] = out["aspect_rewards"]["semantic"] - 2.0
            return out

    with pytest.warns(UserWarning, match="'semantic' rewards have negative values") as caught:
        _trainer(tmp_path, 3, [GroupRewardWeighting()]).fit(Negative())
    assert sum("negative values" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(aspects=["colour"]), r"unknown aspects \['colour'\]"),
        (dict(beta=-0.3), r"`beta` \(-0.3\) must be non-negative"),
        (dict(slope=0), r"`slope` \(0\) must be positive"),
        (dict(quantile=1.0), r"`quantile` \(1.0\) must be in \(0, 1\)"),
        (dict(window=0, warmup_steps=0), r"`window` \(0\) must be at least 1"),
        (dict(window=5, warmup_steps=6), r"`warmup_steps` \(6\) must be in \[1, `window`\] \(5\)"),
        (dict(thresholds="high"), r"`thresholds` \('high'\) must be a number"),
        (dict(aspects=["fidelity"], thresholds={"semantic": 0.7}), r"`thresholds` names \['semantic'\] but `aspects`"),
    ],
)
def test_setting_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupRewardWeighting(**kwargs)


def test_module_without_group_weighting_is_rejected(tmp_path):
    class OnlyGlobalWeights(GroupWeightedToy):
        def __init__(self):
            super().__init__()
            del self.group_weighting

    with pytest.raises(AttributeError, match="has no `group_weighting` attribute"):
        _trainer(tmp_path, 1, [GroupRewardWeighting()]).fit(OnlyGlobalWeights())
