"""Every bad input of the README's "What is validated" list fails early with a message that names the fix."""

from pathlib import Path

import lightning as L
import pytest
import torch

from sp_grpo.checkpoint import CheckpointError
from sp_grpo.cli import cli_main, main
from sp_grpo.data import PromptDataModule
from sp_grpo.module import SelfPacedGRPO
from sp_grpo.policies import TinyWanPolicy, WanPolicy
from sp_grpo.rewards import RewardSet, Sharpness, VideoReward
from sp_grpo.rollout import DenoisingConfig
from sp_grpo.scoring import score_main

ROOT = Path(__file__).resolve().parents[1]


class WrongShape(VideoReward):
    aspect = "fidelity"
    higher_is_better = True

    def score(self, videos, prompts):
        return torch.zeros(videos.shape[0], 2)


class ReturnsNaN(VideoReward):
    aspect = "temporal"
    higher_is_better = True

    def score(self, videos, prompts):
        return torch.full((videos.shape[0],), float("nan"))


def _prompt_file(tmp_path, content: bytes) -> str:
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    return str(path)


def _checkpoint(tmp_path, kind: str) -> str:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "corrupt":
        path.write_bytes(b"not a checkpoint at all\n")
    else:
        torch.save({"global_step": 4, "state_dict": {"w": torch.zeros(64, 64)}}, path)
        if kind == "truncated":  # what a kill during a plain (non-atomic) write leaves
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:  # foreign: a bare state dict, as torch.save(model.state_dict()) writes
            torch.save({"weight": torch.zeros(2)}, path)
    return str(path)


def _fit_from(tmp_path, kind: str):
    return cli_main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--ckpt_path", _checkpoint(tmp_path, kind)])


def _module(**kwargs):
    return SelfPacedGRPO(TinyWanPolicy(), RewardSet({"sharp": Sharpness()}), **kwargs)


CASES = {
    "missing prompt file": (lambda tmp: PromptDataModule(prompt_file=str(tmp / "nope.txt")), FileNotFoundError, r"`data.prompt_file` .* does not exist"),
    "empty prompt file": (lambda tmp: PromptDataModule(prompt_file=_prompt_file(tmp, b"\n# no prompt\n")), ValueError, "holds no prompt"),
    "undecodable prompt file": (lambda tmp: PromptDataModule(prompt_file=_prompt_file(tmp, b"caf\xe9\n")), ValueError, "not UTF-8"),
    "group_size < 2": (lambda tmp: _module(group_size=1), ValueError, r"`group_size` \(1\) must be at least 2.*set `model.group_size`"),
    "invalid noise level": (lambda tmp: DenoisingConfig(noise_level=-0.5), ValueError, r"`model.sampler.noise_level` \(-0.5\) must be positive"),
    "step window too large": (lambda tmp: DenoisingConfig(num_steps=4, train_steps="window", window_size=6), ValueError, r"window_size` \(6\) must be between 1 and `num_steps` \(4\)"),
    "step window out of range": (lambda tmp: DenoisingConfig(num_steps=4, train_steps="window", window_size=2, window_start=3), ValueError, r"window_start` \(3\)"),
    "video size off the strides": (lambda tmp: TinyWanPolicy().latent_shape(9, 60, 64), ValueError, r"`height` \(60\) must be a positive multiple of 16"),
    "model path missing": (lambda tmp: WanPolicy(str(tmp / "no-model")), FileNotFoundError, "pretrained_path.*does not exist"),
    "model path not diffusers": (lambda tmp: WanPolicy(str(tmp)), ValueError, "not a diffusers Wan folder"),
    "reward of wrong shape": (lambda tmp: RewardSet({"bad": WrongShape()})(torch.rand(2, 3, 3, 8, 8), ["a", "b"]), RuntimeError, r"WrongShape.score must return shape \(2,\)"),
    "reward returning NaN": (lambda tmp: RewardSet({"nan": ReturnsNaN()})(torch.rand(2, 3, 3, 8, 8), ["a", "b"]), ValueError, "reward 'nan' returned NaN"),
    "corrupt checkpoint": (lambda tmp: _fit_from(tmp, "corrupt"), CheckpointError, r"corrupt.ckpt' given as `--ckpt_path` cannot be read: it is truncated, corrupt"),
    "truncated checkpoint": (lambda tmp: _fit_from(tmp, "truncated"), CheckpointError, r"truncated.ckpt' given as `--ckpt_path` cannot be read: it is truncated, corrupt"),
    "foreign checkpoint": (lambda tmp: _fit_from(tmp, "foreign"), CheckpointError, r"foreign.ckpt' given as `--ckpt_path` is not a Lightning training checkpoint.*\['weight'\]"),
    "bad config value": (lambda tmp: cli_main(["--config", str(ROOT / "configs/tiny.yaml"), "--model.group_size", "1"], run=False), ValueError, r"`group_size` \(1\)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_has_a_clear_error(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run that failed to fail would write runs/ here, not in the repository
    make, error, match = CASES[case]
    with pytest.raises(error, match=match):
        make(tmp_path)


def test_batch_that_does_not_split_fails_before_any_rollout():
    module = _module(group_size=3, num_minibatches=2, sampler=DenoisingConfig(num_steps=2, num_frames=5, height=32, width=32))
    calls = []
    module.policy.transformer.register_forward_hook(lambda *args: calls.append(1))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"3 prompts x `model.group_size` \(3\) = 9 samples does not split into `model.num_minibatches` \(2\)"):
        trainer.fit(module, datamodule=PromptDataModule(prompts=["a", "b", "c"], batch_size=3))
    assert not calls


def test_corrupt_video_in_score_names_the_file(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a red square-0.mp4").write_bytes(b"not a video at all")
    status = score_main(["--videos", str(tmp_path / "videos"), "--rewards", str(ROOT / "configs/rewards/model_free.yaml"),
                         "--out", str(tmp_path / "scores.csv")])
    assert status == 1
    assert "a red square-0.mp4" in capsys.readouterr().err


def test_failed_resume_names_the_file_and_leaves_the_run_folder_untouched(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"]
    assert main(tiny) == 0
    run = tmp_path / "runs"
    (run / "tiny/checkpoints/on_exception.ckpt").write_bytes((run / "tiny/checkpoints/last.ckpt").read_bytes())  # a crash's
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    attempts = {
        "truncated": _checkpoint(tmp_path, "truncated"),
        "another model": str(run / "tiny/checkpoints/last.ckpt"),  # with a LoRA rank the checkpoint was not made with
    }
    for kind, path in attempts.items():
        assert main([*tiny, "--ckpt_path", path, "--model.policy.init_args.lora_rank", "2"]) == 1, kind
        last_line = capsys.readouterr().err.strip().splitlines()[-1]
        assert path in last_line and "`--ckpt_path`" in last_line, last_line
    assert "was written for another model: 32 of another shape" in last_line
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert after == before  # on_exception.ckpt and the logs included: the failed attempts wrote nothing
