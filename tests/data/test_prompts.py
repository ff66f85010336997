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
    assert [len(b["prompts"]) for b in batches] == [2, 2, 1]
    assert sorted(p for b in batches for p in b["prompts"]) == ["a", "b", "c", "d", "e"]
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
