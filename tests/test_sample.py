"""`sp-grpo sample`: one ODE sample per prompt from seed + index, written as files a person opens.

Reference: :func:`sp_grpo.rollout.sample_ode` called directly with a generator seeded ``seed + i`` on
the policy built from the same config (and checkpoint); the contact sheet is checked pixel by pixel
against those frames.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sp_grpo.rollout import sample_ode
from sp_grpo.sample import contact_sheet, read_prompts, sample_main, sample_videos
from sp_grpo.module import ITERATION_KEY
from sp_grpo.trained import RunInputError, load_run_config, load_trained_policy
from tests.test_export import console, trained_state, write_checkpoint, write_config

PROMPTS = ["a red square moving left", "a blue circle moving right"]


@pytest.fixture
def run(tmp_path):
    policy = """    class_path: sp_grpo.policies.TinyWanPolicy
    init_args: {lora_rank: 4}"""
    config = write_config(tmp_path, policy)
    return config, write_checkpoint(tmp_path / "last.ckpt", trained_state(config, seed=1, scale=1.0), step=9)


def reference(config, ckpt, prompts, seed=0, **sampler):
    trained = load_trained_policy(config, ckpt)
    settings = dataclasses.replace(trained.sampler, **sampler)
    return [sample_ode(trained.policy, [p], settings, generator=torch.Generator().manual_seed(seed + i))[0] for i, p in enumerate(prompts)]


def test_videos_are_the_library_ode_samples_from_seed_plus_index(run):
    config, ckpt = run
    trained = load_trained_policy(config, ckpt)
    videos = sample_videos(trained, list(reversed(PROMPTS)) + PROMPTS, seed=5, progress=False)
    expected = reference(config, ckpt, list(reversed(PROMPTS)) + PROMPTS, seed=5)
    for ours, theirs in zip(videos, expected):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    # The base model (no checkpoint) samples differently from the same noise: before and after compare.
    base = sample_videos(load_trained_policy(config, None), PROMPTS, seed=5, progress=False)
    assert (base[0] - videos[2]).abs().max() > 1e-2


def test_writes_videos_contact_sheet_and_manifest(run, tmp_path, capsys):
    config, ckpt = run
    out = tmp_path / "samples"
    code = sample_main(["--config", str(config), "--ckpt", str(ckpt), "--prompts", *PROMPTS, "--out", str(out), "--seed", "3",
                        "--num-steps", "2", "--guidance-scale", "1.5"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "samples.json").read_text())
    assert [s["seed"] for s in manifest["samples"]] == [3, 4]
    assert manifest["sampler"]["num_steps"] == 2 and manifest["sampler"]["guidance_scale"] == 1.5
    assert manifest["weights"] == "current" and manifest["global_step"] == 9
    files = [out / s["file"] for s in manifest["samples"]]
    assert all(f.suffix == ".gif" and f.exists() for f in files)  # 32x32 frames: tiny, so GIF
    with Image.open(files[0]) as gif:
        assert gif.n_frames == 5 and gif.size == (128, 128)  # upscaled to ~128 px

    # The sheet shows frames 0, 2 and 4 of each video, exactly (nearest-neighbour upscaling of the 8-bit frames).
    expected = reference(config, ckpt, PROMPTS, seed=3, num_steps=2, guidance_scale=1.5)
    sheet = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB"))
    gap, text, height = 4, 14, 96
    for row, video in enumerate(expected):
        top = gap + row * (text + height + gap) + text
        for column, frame in enumerate((0, 2, 4)):
            left = gap + column * (height + gap)
            cell = sheet[top : top + height, left : left + height]
            pixels = (video[frame].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(cell[::3, ::3], pixels)  # 96 / 32 = 3 pixels per frame pixel
    assert "2 videos of" in capsys.readouterr().out


def test_without_ckpt_samples_the_base_model(run, tmp_path, capsys):
    config, _ = run
    assert sample_main(["--config", str(config), "--prompts", PROMPTS[0], "--out", str(tmp_path / "base"), "--format", "mp4"]) == 0
    manifest = json.loads((tmp_path / "base/samples.json").read_text())
    assert manifest["checkpoint"] is None and manifest["weights"] == "base"
    assert manifest["samples"][0]["file"].endswith(".mp4") and "the base model" in capsys.readouterr().out


def test_contact_sheet_has_one_row_per_prompt():
    videos = [torch.rand(7, 3, 16, 24), torch.rand(1, 3, 16, 24)]
    sheet = contact_sheet(videos, ["long label " * 3, "b"], height=32, gap=2)
    row = 14 + 32 + 2
    assert sheet.height == 2 + 2 * row
    assert sheet.width >= 3 * (48 + 2)  # three frames of 48 px (24 * 32 / 16) in the first row


def test_read_prompts_from_a_file_or_the_command_line(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("# my prompts\na red square\n\n  a blue ring  \n")
    assert read_prompts([str(file)]) == ["a red square", "a blue ring"]
    assert read_prompts(["a red square", " a blue ring "]) == ["a red square", "a blue ring"]
    with pytest.raises(RunInputError, match=r"`--prompts` file .* holds no prompt"):
        (tmp_path / "empty.txt").write_text("# nothing\n\n")
        read_prompts([str(tmp_path / "empty.txt")])
    with pytest.raises(RunInputError, match=r"`--prompts` \('missing.txt'\) names no file"):
        read_prompts(["missing.txt"])
    with pytest.raises(RunInputError, match=r"`--prompts` is empty"):
        read_prompts(["  "])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ckpt", "{tmp}/nope.ckpt"], "`--ckpt` ('{tmp}/nope.ckpt') does not exist"),
        (["--prompts", "{tmp}/empty.txt"], "holds no prompt"),
        (["--num-steps", "0"], "`--num-steps` (0) must be at least 1"),
        (["--weights", "ema"], "`--weights ema`: checkpoint"),
        (["--out", "{tmp}/occupied"], "`--out` ('{tmp}/occupied') exists and is not empty"),
    ],
    ids=["missing-ckpt", "empty-prompts", "bad-steps", "no-ema", "occupied-out"],
)
def test_bad_input_is_one_line_naming_the_setting_and_writes_nothing(run, tmp_path, capsys, args, message):
    config, ckpt = run
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied/keep.txt").write_text("mine")
    base = {"--config": str(config), "--ckpt": str(ckpt), "--prompts": PROMPTS[0], "--out": str(tmp_path / "out")}
    given = [a.format(tmp=tmp_path) for a in args]
    base.update(dict(zip(given[::2], given[1::2])))
    code = sample_main([item for pair in base.items() for item in pair])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("sp-grpo sample: error: ") and message.format(tmp=tmp_path) in err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in (tmp_path / "occupied").iterdir()] == ["keep.txt"]


def test_checkpoint_of_another_config_is_refused(run, tmp_path, capsys):
    _, ckpt = run
    (tmp_path / "other").mkdir()
    other = write_config(tmp_path / "other", """    class_path: sp_grpo.policies.TinyWanPolicy
    init_args: {lora_rank: null}""")
    code = sample_main(["--config", str(other), "--ckpt", str(ckpt), "--prompts", PROMPTS[0], "--out", str(tmp_path / "out")])
    assert code == 1 and "was written by another run than `--config`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_console_script_samples_a_prompt_file(run, tmp_path):
    config, ckpt = run
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    result = console("sample", "--config", config, "--ckpt", ckpt, "--prompts", "prompts.txt", "--out", "videos", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sampling" in result.stderr  # the progress bar
    assert "2 videos of" in result.stdout and "seeds 0..1" in result.stdout
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == ["contact_sheet.png", "samples.json", "videos"]


def test_iterations_come_from_the_modules_count_and_fall_back_for_older_checkpoints(run, tmp_path):
    # A run whose skipped minibatches took no optimizer step has fewer steps than iterations x steps
    # per iteration: the module's own count (saved under ITERATION_KEY) is what was trained.
    config, ckpt = run
    checkpoint = torch.load(ckpt, weights_only=True)
    model = load_run_config(config).model
    assert load_trained_policy(config, ckpt).iterations == 9 // (model.num_inner_epochs * model.num_minibatches)
    checkpoint[ITERATION_KEY] = 7
    torch.save(checkpoint, tmp_path / "counted.ckpt")
    assert load_trained_policy(config, tmp_path / "counted.ckpt").iterations == 7
