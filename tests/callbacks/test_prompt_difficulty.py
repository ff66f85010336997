import statistics

import pytest
import torch

from sp_grpo.callbacks.prompt_difficulty import PromptDifficulty
from sp_grpo.data.prompts import PromptDataModule, ResumablePromptSampler

from .curriculum_toy import ToyRewardModule


def _informativeness(rewards, group_size):
    """Reference: each group's population std over the root-mean-square of all groups' stds, capped at 1."""
    groups = [rewards[i : i + group_size] for i in range(0, len(rewards), group_size)]
    spreads = [statistics.pstdev(g) for g in groups]
    pooled = (sum(s * s for s in spreads) / len(spreads)) ** 0.5
    return [min(1.0, s / pooled) if pooled > 0 else 0.0 for s in spreads]


def test_update_keeps_per_prompt_emas():
    tracker = PromptDifficulty(decay=0.5, min_weight=0.2)
    first = [0.0, 1.0, 0.9, 0.9, 0.1, 0.3]
    second = [0.5, 0.5, 0.2, 0.8, 0.0, 0.4]
    tracker.update(["a"] * 2 + ["b"] * 2 + ["c"] * 2, torch.tensor(first), 2)
    tracker.update(["a"] * 2 + ["b"] * 2 + ["d"] * 2, torch.tensor(second), 2)
    i1, i2 = _informativeness(first, 2), _informativeness(second, 2)
    expected = {"a": 0.5 * i1[0] + 0.5 * i2[0], "b": 0.5 * i1[1] + 0.5 * i2[1], "c": i1[2], "d": i2[2]}
    assert tracker.informativeness == pytest.approx(expected, abs=1e-6)
    assert tracker.mean_reward["a"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.5)
    assert tracker.groups_seen == {"a": 2, "b": 2, "c": 1, "d": 1}
    weights = tracker.weights_for(["a", "b", "unseen"]).tolist()
    assert weights == pytest.approx([0.2 + 0.8 * expected["a"], 0.2 + 0.8 * expected["b"], 1.0], abs=1e-6)


def test_status_separates_mastered_from_hopeless():
    tracker = PromptDifficulty(decay=0.0)
    tracker.update(["easy"] * 2 + ["hard"] * 2 + ["mid"] * 2, torch.tensor([1.0, 1.0, 0.0, 0.0, 0.2, 0.8]), 2)
    assert tracker.status("easy") == "mastered"
    assert tracker.status("hard") == "hopeless"
    assert tracker.status("mid") == "learning"
    assert tracker.status("new") == "unseen"


def test_state_round_trip():
    tracker = PromptDifficulty()
    tracker.update(["a", "a", "b", "b"], torch.tensor([0.0, 1.0, 0.5, 0.5]), 2)
    again = PromptDifficulty()
    again.load_state_dict(tracker.state_dict())
    assert again.state_dict() == tracker.state_dict()


def test_tracker_errors():
    with pytest.raises(ValueError, match=r"`decay` \(1.0\) must be in \[0, 1\)"):
        PromptDifficulty(decay=1.0)
    with pytest.raises(ValueError, match=r"`min_weight` \(0.0\) must be in \(0, 1\]"):
        PromptDifficulty(min_weight=0.0)
    with pytest.raises(ValueError, match=r"`prompts` has 3 entries but `rewards` has 4"):
        PromptDifficulty().update(["a", "a", "b"], torch.zeros(4), 2)


def test_sampler_favours_informative_prompts_and_shards_ranks():
    tracker = PromptDifficulty(decay=0.0, min_weight=0.05)
    tracker.update(["flat"] * 2 + ["spread"] * 2, torch.tensor([0.5, 0.5, 0.0, 1.0]), 2)
    prompts = ["flat", "spread"]
    weights = lambda: tracker.weights_for(prompts)  # noqa: E731 (what PromptDataModule passes)
    sampler = ResumablePromptSampler(len(prompts), seed=3, weights=weights)
    drawn = []
    for epoch in range(2000):
        sampler.set_epoch(epoch)
        drawn += list(sampler)
    share_flat = drawn.count(0) / len(drawn)
    assert share_flat == pytest.approx(0.05 / 1.05, abs=0.02)
    sampler.set_epoch(0)
    assert list(sampler) == drawn[:2]  # same epoch, same draw
    pool = [f"p{i}" for i in range(10)]
    tracker.update(pool, torch.linspace(0, 1, 10), 2)
    ranks = [list(ResumablePromptSampler(10, seed=3, rank=r, world_size=2, weights=lambda: tracker.weights_for(pool))) for r in (0, 1)]
    everything = ResumablePromptSampler(10, seed=3, weights=lambda: tracker.weights_for(pool)).order(0)
    assert ranks[0] == everything[0::2] and ranks[1] == everything[1::2]


def _fit(tmp_path, callbacks, datamodule=None, steps=6, module=None):
    import lightning.pytorch as pl

    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)
    module = module or ToyRewardModule()
    trainer.fit(module, datamodule=datamodule)
    return trainer, module


def test_callback_scores_groups_by_the_weights_the_batch_used(tmp_path):
    import lightning.pytorch as pl

    class Capture(pl.Callback):
        def __init__(self):
            self.outputs, self.weights = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.weights.append(dict(pl_module.reward_weights))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.outputs.append(outputs)
            pl_module.reward_weights = {"fidelity": 1.0, "temporal": 0.0, "semantic": 0.0}  # a weight callback's write

    tracker, capture = PromptDifficulty(decay=0.5), Capture()
    _fit(tmp_path, [capture, tracker])
    reference = PromptDifficulty(decay=0.5)
    for out, weights in zip(capture.outputs, capture.weights, strict=True):
        rewards = torch.stack([out["aspect_rewards"][a] for a in ("fidelity", "temporal", "semantic")])
        reference.update(out["prompts"], torch.tensor(list(weights.values())) @ rewards, out["group_size"])
    assert capture.weights[0] != capture.weights[1]  # the batches were trained with different weights
    assert tracker.state_dict() == reference.state_dict()


def test_callback_links_itself_to_the_data_module_for_difficulty_sampling(tmp_path):
    import lightning.pytorch as pl

    class SeeWeights(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.sampler_weights = trainer.train_dataloader.sampler.weights

    prompts = [f"prompt {i}" for i in range(8)]
    tracker, see = PromptDifficulty(), SeeWeights()
    tracker.update(prompts[:2] * 2, torch.tensor([0.0, 0.0, 0.5, 0.5]), 2)  # "prompt 0" and "prompt 1": flat
    data = PromptDataModule(prompts=prompts, batch_size=4, difficulty_sampling=True)
    _fit(tmp_path, [tracker, see], datamodule=data, steps=2)
    torch.testing.assert_close(see.sampler_weights(), tracker.weights_for(prompts))
    assert data.prompt_weights is None  # unlinked in teardown
    with pytest.raises(ValueError, match="difficulty_sampling` needs per-prompt weights.*add sp_grpo.callbacks.PromptDifficulty"):
        _fit(tmp_path, [], datamodule=PromptDataModule(prompts=prompts, batch_size=4, difficulty_sampling=True), steps=1)


def test_callback_errors(tmp_path):
    class NoPrompts(ToyRewardModule):
        def training_step(self, batch, batch_idx):
            return {k: v for k, v in super().training_step(batch, batch_idx).items() if k != "prompts"}

    class NoWeights(ToyRewardModule):
        def __init__(self):
            super().__init__()
            self.reward_weights = {}

    with pytest.raises(KeyError, match="PromptDifficulty needs `training_step` to return 'prompts'"):
        _fit(tmp_path, [PromptDifficulty()], module=NoPrompts(), steps=1)
    with pytest.raises(AttributeError, match="lacks or leaves empty"):
        _fit(tmp_path, [PromptDifficulty()], module=NoWeights(), steps=1)
