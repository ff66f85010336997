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


def test_difficulty_sampling_uses_the_linked_tracker():
    from types import SimpleNamespace

    from sp_grpo.callbacks import PromptDifficulty

    prompts = ["a", "b", "c", "d"]
    tracker = PromptDifficulty()
    tracker.update(["a", "a", "b", "b"], torch.tensor([0.0, 1.0, 0.5, 0.5]), 2)
    dm = PromptDataModule(prompts=prompts, batch_size=2, difficulty_sampling=True)
    trainer = SimpleNamespace(datamodule=dm)  # what the callback reads in `setup`
    tracker.setup(trainer, None, "fit")
    loader = dm.train_dataloader()
    assert loader.sampler.weights is not None
    torch.testing.assert_close(loader.sampler.weights(), tracker.weights_for(prompts))
    tracker.teardown(trainer, None, "fit")
    assert dm.prompt_weights is None
    with pytest.raises(ValueError, match="difficulty_sampling` needs per-prompt weights.*PromptDifficulty"):
        dm.train_dataloader()


def test_a_second_weight_source_is_rejected():
    from sp_grpo.callbacks import PromptDifficulty

    dm = PromptDataModule(prompts=["a", "b"], batch_size=1, difficulty_sampling=True)
    first = PromptDifficulty()
    dm.set_prompt_weights(first.weights_for)
    dm.set_prompt_weights(first.weights_for)  # the same source again is fine
    with pytest.raises(ValueError, match="keep one sp_grpo.callbacks.PromptDifficulty"):
        dm.set_prompt_weights(PromptDifficulty().weights_for)


class _PromptConsumer:
    """A LightningModule that records the prompts it is served (built lazily: Lightning imports are slow)."""

    @staticmethod
    def build(crash_at=None):
        import lightning as L

        class Consumer(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(1))
                self.served = []

            def training_step(self, batch, batch_idx):
                if crash_at is not None and self.global_step == crash_at:
                    raise RuntimeError("simulated crash")
                self.served.append(list(batch["prompts"]))
                return (self.weight**2).sum()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

        return Consumer()


def test_importing_the_data_module_leaves_warning_filters_alone():
    import importlib
    import warnings

    import sp_grpo.data.prompts as prompts_module

    before = list(warnings.filters)
    importlib.reload(prompts_module)
    assert warnings.filters == before


def test_mid_epoch_resume_continues_the_order_without_lightnings_warning(tmp_path):
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    prompts = [f"p{i}" for i in range(12)]

    def trainer(root, **kwargs):
        return L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, **kwargs)

    full = _PromptConsumer.build()
    trainer(tmp_path / "full", enable_checkpointing=False).fit(full, datamodule=PromptDataModule(prompts=prompts, batch_size=2))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path / "a", callbacks=[checkpoint]).fit(
            _PromptConsumer.build(crash_at=3), datamodule=PromptDataModule(prompts=prompts, batch_size=2)
        )
    resumed = _PromptConsumer.build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path / "b", enable_checkpointing=False).fit(
            resumed, datamodule=PromptDataModule(prompts=prompts, batch_size=2), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
        )
    assert resumed.served == full.served[2:]  # mid-epoch: the batches an uninterrupted run served next
    assert not [w for w in caught if "ended before the epoch ended" in str(w.message)]


def test_resumed_loader_warns_when_the_order_cannot_continue():
    loader = PromptDataModule(prompts=["a", "b", "c", "d"], batch_size=2, seed=0).train_dataloader()
    saved = loader.state_dict()
    loader.load_state_dict(saved)  # same settings: silent
    other = PromptDataModule(prompts=["a", "b", "c", "d"], batch_size=2, seed=1).train_dataloader()
    with pytest.warns(UserWarning, match=r"other data settings than the checkpoint's .*'seed': \(0, 1\)"):
        other.load_state_dict(saved)
