import pytest

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
