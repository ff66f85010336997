import pytest
import torch

from sp_grpo.data import PromptDataModule, read_prompt_file


def test_reads_prompts_skipping_blanks_and_comments(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# header\na red square\n\n  a blue circle  \n", encoding="utf-8")
    assert read_prompt_file(path) == ["a red square", "a blue circle"]


def test_prompt_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`data.prompt_file` .* does not exist"):
        read_prompt_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompt_file(empty)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"a red \xff\xfe square\n")
    with pytest.raises(ValueError, match="not UTF-8 text.*byte 6"):
        read_prompt_file(binary)


def test_datamodule_yields_batches_of_unique_prompts(tmp_path):
    dm = PromptDataModule(prompts=["a", "b", "c", "d", "e"], batch_size=2, seed=1)
    batches = list(dm.train_dataloader())
    assert [len(b["prompts"]) for b in batches] == [2, 2]  # the remainder is dropped
    assert len({p for b in batches for p in b["prompts"]}) == 4
    assert batches == list(PromptDataModule(prompts=["a", "b", "c", "d", "e"], batch_size=2, seed=1).train_dataloader())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of `data.prompts`"),
        ({"prompts": ["a"], "prompt_file": "x"}, "exactly one of `data.prompts`"),
        ({"prompts": ["a", "b"], "batch_size": 3}, r"`data.batch_size` \(3\) is larger"),
        ({"prompts": ["a"], "batch_size": 0}, "at least 1"),
        ({"prompts": ["a", " "]}, "non-empty strings"),
        ({"prompts": ["a"], "val_prompts": ["b"], "val_prompt_file": "x"}, "at most one"),
    ],
)
def test_datamodule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptDataModule(**kwargs)


def test_sampler_order_depends_on_seed_and_epoch_and_can_skip():
    from sp_grpo.data.prompts import ResumablePromptSampler

    sampler = ResumablePromptSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10))
    assert list(ResumablePromptSampler(10, seed=3)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == list(range(10))
    sampler.skip(4)
    assert list(sampler) == second[4:]
    assert list(sampler) == second  # the skip applies once
    assert list(ResumablePromptSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_sampler_splits_ranks_disjointly():
    from sp_grpo.data.prompts import ResumablePromptSampler

    ranks = [list(ResumablePromptSampler(10, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5 and not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(10))


def test_weighted_sampler_follows_the_weights():
    from sp_grpo.data.prompts import ResumablePromptSampler

    weights = torch.tensor([1.0, 0.0, 3.0, 0.0])
    sampler = ResumablePromptSampler(4, seed=0, weights=lambda: weights)
    counts = torch.zeros(4)
    for epoch in range(500):
        sampler.set_epoch(epoch)
        for i in sampler:
            counts[i] += 1
    assert counts[1] == counts[3] == 0
    assert abs(counts[2] / counts[0] - 3.0) < 0.3


def test_difficulty_sampling_uses_the_curriculum_tracker():
    import lightning as L

    from sp_grpo.callbacks import SelfPacedCurriculum

    prompts = ["a", "b", "c", "d"]
    curriculum = SelfPacedCurriculum()
    dm = PromptDataModule(prompts=prompts, batch_size=2, difficulty_sampling=True)
    dm.trainer = L.Trainer(callbacks=[curriculum], logger=False, enable_checkpointing=False)
    loader = dm.train_dataloader()
    assert loader.sampler.weights is not None
    torch.testing.assert_close(loader.sampler.weights(), curriculum.prompt_difficulty.weights_for(prompts))
    dm.trainer = L.Trainer(logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="difficulty_sampling` needs .* curriculum callback.*SelfPacedCurriculum"):
        dm.train_dataloader()
