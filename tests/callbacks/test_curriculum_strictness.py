"""Growing strictness: the curriculum tightens graded rewards as their aspects become competent."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from sp_grpo.callbacks.curriculum import SelfPacedCurriculum
from sp_grpo.rewards import RewardSet, VideoReward

from .curriculum_toy import ASPECTS, ToyRewardModule

FAST = {"warmup_steps": 5, "decay": 0.8}


class Graded(VideoReward):
    """A graded reward; the toy module reads only its strictness (the videos are simulated)."""

    graded = True

    def __init__(self, aspect: str) -> None:
        object.__setattr__(self, "aspect", aspect)
        super().__init__()
        self.strictness = 0.0

    def score(self, videos, prompts):
        return videos.mean(dim=(1, 2, 3, 4))


class Plain(VideoReward):
    aspect = "temporal"

    def score(self, videos, prompts):
        return videos.mean(dim=(1, 2, 3, 4))


class GradedToy(ToyRewardModule):
    """Rewards drop by 0.3 x strictness: a stricter reward scores the same generator lower."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rewards = RewardSet({"f": Graded("fidelity"), "t": Plain(), "s": Graded("semantic")})
        self.seen_strictness: list[dict[str, float]] = []

    def training_step(self, batch, batch_idx):
        strictness = self.rewards.strictness
        self.seen_strictness.append(dict(strictness))
        out = super().training_step(batch, batch_idx)
        for aspect, value in strictness.items():
            out["aspect_rewards"][aspect] = out["aspect_rewards"][aspect] - 0.3 * value
        return out


def _trainer(tmp_path, steps, callbacks, **kwargs):
    defaults = dict(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    return pl.Trainer(callbacks=callbacks, **(defaults | kwargs))


def test_strictness_rises_with_competence_and_restarts_the_aspect(tmp_path):
    curriculum = SelfPacedCurriculum(strictness_step=0.5, **FAST)
    module = GradedToy(rate=0.004)
    trainer = _trainer(tmp_path, 300, [curriculum], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    trainer.fit(module)
    fidelity = [s["fidelity"] for s in module.seen_strictness]
    assert fidelity[0] == 0.0 and fidelity == sorted(fidelity)  # starts coarse, never loosens
    assert {0.0, 0.5, 1.0} <= set(fidelity)  # tightened twice as fidelity kept improving
    assert all(s["semantic"] == 0.0 for s in module.seen_strictness[:50])  # semantic is not unlocked yet
    assert "temporal" not in module.seen_strictness[0]  # no graded reward there
    # The stage never goes back although each tightening restarts fidelity's statistics.
    stages = [record["stage"] for record in curriculum.history]
    assert stages == sorted(stages) and stages[-1] >= 1
    raised = fidelity.index(0.5)
    assert curriculum.history[raised]["competence"]["fidelity"] == 0.0  # warming up again after the raise
    # The logged strictness is the one the next batch uses.
    assert trainer.callback_metrics["curriculum/strictness_fidelity"].item() == curriculum.current_strictness()["fidelity"]
    assert curriculum.current_strictness() == pytest.approx(module.rewards.strictness)


def test_noise_never_tightens(tmp_path):
    curriculum = SelfPacedCurriculum(strictness_step=0.5, **FAST)
    module = GradedToy(rising=False)
    _trainer(tmp_path, 150, [curriculum]).fit(module)
    assert {tuple(s.values()) for s in module.seen_strictness} == {(0.0, 0.0)}


@pytest.mark.filterwarnings("ignore:.*(pre-optimization state|dataloader is not resumable|callbacks used to create).*")
def test_strictness_resumes_exactly(tmp_path):
    steps, save_at = 120, 60
    full = GradedToy(rate=0.004)
    _trainer(tmp_path / "full", steps, [SelfPacedCurriculum(strictness_step=0.5, **FAST)]).fit(full)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=save_at, save_top_k=-1)
    _trainer(
        tmp_path / "a", save_at, [SelfPacedCurriculum(strictness_step=0.5, **FAST), checkpoint], enable_checkpointing=True
    ).fit(GradedToy(rate=0.004))
    resumed = GradedToy(rate=0.004)
    curriculum = SelfPacedCurriculum(strictness_step=0.5, **FAST)
    _trainer(tmp_path / "b", steps, [curriculum]).fit(resumed, ckpt_path=tmp_path / "ckpt" / f"epoch=0-step={save_at}.ckpt")
    assert max(s["fidelity"] for s in full.seen_strictness) > 0  # the stretch compared is not trivial
    assert resumed.seen_strictness == full.seen_strictness[save_at:]
    for a, b in zip(full.seen_weights[save_at:], resumed.seen_weights, strict=True):
        assert a == pytest.approx(b, abs=1e-6)


def test_strictness_needs_a_reward_set_with_graded_rewards(tmp_path):
    with pytest.raises(AttributeError, match=r"pl_module.rewards.set_strictness"):
        _trainer(tmp_path, 2, [SelfPacedCurriculum(strictness_step=0.5)]).fit(ToyRewardModule())

    class NoGraded(ToyRewardModule):
        def __init__(self):
            super().__init__()
            self.rewards = RewardSet({"t": Plain()})

    with pytest.raises(ValueError, match=r"none of the aspects .* has a graded reward"):
        _trainer(tmp_path, 2, [SelfPacedCurriculum(strictness_step=0.5)]).fit(NoGraded())


def test_without_strictness_step_the_rewards_are_left_alone(tmp_path):
    module = GradedToy(rate=0.004)
    module.rewards.set_strictness({"fidelity": 0.7, "semantic": 0.2})
    _trainer(tmp_path, 80, [SelfPacedCurriculum(**FAST)]).fit(module)
    assert {tuple(s.values()) for s in module.seen_strictness} == {(0.7, 0.2)}
    assert set(ASPECTS) >= set(module.rewards.strictness)


def test_reward_set_strictness_errors():
    rewards = RewardSet({"f": Graded("fidelity"), "t": Plain()})
    with pytest.raises(ValueError, match=r"unknown aspects \['motion'\]"):
        rewards.set_strictness({"motion": 0.5})
    with pytest.raises(ValueError, match=r"strictness \(1.5\) must be in \[0, 1\]"):
        rewards.set_strictness({"fidelity": 1.5})
    with pytest.raises(TypeError, match=r"Plain has no graded strictness"):
        Plain().set_strictness(0.5)
    rewards.set_strictness({"fidelity": 0.25, "temporal": 0.9})  # temporal has no graded reward: ignored
    assert rewards.strictness == {"fidelity": 0.25} and rewards.graded_aspects == ["fidelity"]
    assert torch.equal(rewards(torch.full((2, 2, 3, 4, 4), 0.5), ["a", "b"]).per_aspect["fidelity"], torch.full((2,), 0.5))
