"""GRPO iterations are counted by the module, not derived from optimizer steps, and kept in checkpoints."""

import lightning as L
import pytest

import sp_grpo.module
from sp_grpo.data import PromptDataModule
from sp_grpo.module import ITERATION_KEY, SelfPacedGRPO
from sp_grpo.policies import TinyWanPolicy
from sp_grpo.rewards import RewardSet, Sharpness, VideoReward
from sp_grpo.rollout import DenoisingConfig

PROMPTS = ["a red square", "a blue circle", "a green ball", "a yellow box"]


class NaNForFirstGroup(VideoReward):
    """A reward that fails (NaN) on the batch's first group, which RewardSet then drops."""

    aspect = "temporal"

    def __init__(self, group_size: int) -> None:
        super().__init__()
        self.group_size = group_size

    def score(self, videos, prompts):
        scores = videos.mean(dim=(1, 2, 3, 4))
        scores[: self.group_size] = float("nan")
        return scores


def _module(rewards: RewardSet, **overrides) -> SelfPacedGRPO:
    sampler = DenoisingConfig(num_steps=2, num_frames=5, height=16, width=16, guidance_scale=1.0)
    kwargs = dict(group_size=2, sampler=sampler, micro_batch_size=8, **overrides)
    return SelfPacedGRPO(TinyWanPolicy(seed=0, lora_rank=2), rewards, **kwargs)


def _fit(module: SelfPacedGRPO, max_steps: int, callbacks=()) -> tuple[list[int], L.Trainer]:
    """Fit with a new Trainer, and return the ``iteration`` each rollout was sampled with."""
    sampled = []
    sample_rollout = sp_grpo.module.sample_rollout
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=list(callbacks),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sp_grpo.module, "sample_rollout", lambda *a, **kw: sampled.append(kw["iteration"]) or sample_rollout(*a, **kw))
        trainer.fit(module, datamodule=PromptDataModule(prompts=PROMPTS, batch_size=2))
    return sampled, trainer


def test_a_minibatch_skipped_without_an_optimizer_step_does_not_repeat_an_iteration():
    # 2 prompts x 2 samples in 4 minibatches of one sample each; the first group is dropped (NaN
    # reward), so its two minibatches have no trained pair and take no optimizer step: 2 steps per
    # iteration, not 4. Counting `global_step // 4` would sample iterations 0, 0, 1 (repeated seeds).
    rewards = RewardSet({"sharp": Sharpness(), "nan": NaNForFirstGroup(group_size=2)}, on_nonfinite="drop_group")
    module = _module(rewards, num_minibatches=4)
    sampled, trainer = _fit(module, max_steps=6)
    assert trainer.global_step == 6
    assert sampled == [0, 1, 2] and module.iteration == 3


def test_in_a_run_without_skipped_minibatches_iterations_follow_optimizer_steps():
    module = _module(RewardSet({"sharp": Sharpness()}), num_inner_epochs=2, num_minibatches=2)
    starts = []

    class AtBatchStart(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            starts.append((trainer.global_step, pl_module.iteration))

    sampled, _ = _fit(module, max_steps=12, callbacks=[AtBatchStart()])
    # The same numbers as `global_step // updates_per_iteration`, so earlier runs' seeds are unchanged.
    assert starts == [(0, 0), (4, 1), (8, 2)] and sampled == [0, 1, 2]


def test_the_count_is_saved_restored_and_derived_for_older_checkpoints():
    module = _module(RewardSet({"sharp": Sharpness()}), num_inner_epochs=2, num_minibatches=2)
    module.iteration = 5
    checkpoint = {"global_step": 12}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint[ITERATION_KEY] == 5
    restored = _module(RewardSet({"sharp": Sharpness()}), num_inner_epochs=2, num_minibatches=2)
    restored.on_load_checkpoint(checkpoint)
    assert restored.iteration == 5  # the saved count, not 12 // 4
    restored.on_load_checkpoint({"global_step": 12})  # written before iterations were counted
    assert restored.iteration == 3


def test_a_new_fit_starts_at_iteration_zero_like_its_global_step():
    module = _module(RewardSet({"sharp": Sharpness()}))
    first, _ = _fit(module, max_steps=2)
    second, _ = _fit(module, max_steps=1)  # a new Trainer: global_step 0 again, and so the iteration
    assert first == [0, 1] and second == [0]
