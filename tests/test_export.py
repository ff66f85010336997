"""`sp-grpo export`: what diffusers loads from the folder samples what the library samples from the checkpoint.

Reference: diffusers' own API (``load_lora_weights`` on the backbone's pipeline, or ``from_pretrained`` of
the exported folder) sampling with its own loop on the same noise; the library side is
:func:`sp_grpo.rollout.sample_ode` of the policy with the checkpoint loaded. Tolerance: 1e-4 absolute on
videos in [0, 1] (fp32 on the CPU; the measured differences are ~1e-7). Every "trained" checkpoint here
moves the weights far enough that the base model's video differs by more than 1e-2, so a round trip that
dropped or mis-scaled the adapter would fail.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sp_grpo.export import LORA_WEIGHT_NAME, export_main
from sp_grpo.rollout import sample_ode
from sp_grpo.toy.model import CHECKPOINT_DIR
from sp_grpo.trained import build_policy, load_run_config, load_trained_policy

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red square moving left"
TOLERANCE = 1e-4

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  callbacks:
{callbacks}
model:
  policy:
{policy}
  rewards: {rewards}
  group_size: 2
  sampler: {sampler}
data:
  prompts: [a red square moving left, a blue circle moving right]
  batch_size: 2
"""
EMA = """    - class_path: lightning.pytorch.callbacks.EMAWeightAveraging
      init_args: {decay: 0.9}"""
TINY_SAMPLER = "{num_steps: 3, guidance_scale: 2.0, num_frames: 5, height: 32, width: 32}"


def write_config(folder: Path, policy: str, sampler: str = TINY_SAMPLER, callbacks: str = "") -> Path:
    path = folder / "config.yaml"
    rewards = ROOT / "configs/rewards/model_free.yaml"
    path.write_text(CONFIG.format(policy=policy, sampler=sampler, rewards=rewards, callbacks=callbacks or "    []"))
    return path


def trained_state(config: Path, seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """The config's policy state with its trainable weights moved by seeded noise (what training changes), `policy.`-prefixed.

    Buffers in the state (a VAE's latent statistics) stay as they are: training never changes them.
    """
    policy = build_policy(load_run_config(config))
    trainable = {name for name, param in policy.named_parameters() if param.requires_grad}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in policy.state_dict().items():
        if name in trainable:
            value = value + scale * value.float().std().clamp(min=0.1) * torch.randn(value.shape, generator=generator)
        state[f"policy.{name}"] = value
    return state


def write_checkpoint(path: Path, state: dict, step: int = 12, current: dict | None = None) -> Path:
    """A checkpoint as Lightning writes it; with `current`, as EMAWeightAveraging writes it (average in `state_dict`)."""
    checkpoint = {"global_step": step, "epoch": 0, "state_dict": state}
    if current is not None:
        checkpoint.update(current_model_state=current, averaging_state={"n_averaged": torch.tensor(step)})
    torch.save(checkpoint, path)
    return path


def library_video(config: Path, ckpt: Path | None, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The library's ODE sample of the checkpoint's policy, and the noise it started from."""
    trained = load_trained_policy(config, ckpt)
    sampler = trained.sampler
    shape = trained.policy.latent_shape(sampler.num_frames, sampler.height, sampler.width)
    noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))
    video = sample_ode(trained.policy, [PROMPT], sampler, generator=torch.Generator().manual_seed(seed))
    return video, noise


def run_export(capsys, *args) -> tuple[int, str]:
    code = export_main([str(a) for a in args])
    return code, capsys.readouterr().err


# -- the three backbones, LoRA ------------------------------------------------------------------------


def _wan(tmp_path):
    from diffusers import WanPipeline

    from sp_grpo.policies.tiny import save_wan_folder, tiny_wan_components

    base = save_wan_folder(tiny_wan_components(0), tmp_path / "base")
    policy = f"""    class_path: sp_grpo.policies.WanPolicy
    init_args: {{pretrained_path: {base}, lora_rank: 4, lora_alpha: 8, max_sequence_length: 16}}"""

    def call(pipe, noise):
        return pipe(PROMPT, latents=noise, num_inference_steps=3, guidance_scale=2.0, num_frames=5, height=32, width=32,
                    max_sequence_length=16, output_type="pt").frames

    return WanPipeline, base, policy, TINY_SAMPLER, call


def _hunyuan(tmp_path):
    from diffusers import HunyuanVideoPipeline

    from sp_grpo.policies.hunyuan import (
        TINY_CROP_START,
        TINY_PROMPT_TEMPLATE,
        save_hunyuan_folder,
        tiny_hunyuan_components,
    )

    base = save_hunyuan_folder(tiny_hunyuan_components(0), tmp_path / "base")
    policy = f"""    class_path: sp_grpo.policies.HunyuanVideoPolicy
    init_args: {{pretrained_path: {base}, lora_rank: 4, torch_dtype: float32, max_sequence_length: 16,
                 prompt_template: "{TINY_PROMPT_TEMPLATE}", template_crop_start: {TINY_CROP_START}}}"""

    def call(pipe, noise):
        return pipe(PROMPT, negative_prompt="", latents=noise, num_inference_steps=3, true_cfg_scale=2.0, guidance_scale=6.0,
                    num_frames=5, height=32, width=32, max_sequence_length=16, output_type="pt",
                    prompt_template={"template": TINY_PROMPT_TEMPLATE, "crop_start": TINY_CROP_START}).frames

    return HunyuanVideoPipeline, base, policy, TINY_SAMPLER, call


def _ltx(tmp_path):
    from diffusers import LTXPipeline

    from sp_grpo.policies.ltx import pack_latents, save_ltx_folder, tiny_ltx_components

    base = save_ltx_folder(tiny_ltx_components(0), tmp_path / "base")
    policy = f"""    class_path: sp_grpo.policies.LTXVideoPolicy
    init_args: {{pretrained_path: {base}, lora_rank: 4, torch_dtype: float32, max_sequence_length: 16}}"""
    sampler = "{num_steps: 3, guidance_scale: 3.0, num_frames: 9, height: 32, width: 32}"

    def call(pipe, noise):
        return pipe(PROMPT, negative_prompt="", latents=pack_latents(noise), num_inference_steps=3, guidance_scale=3.0,
                    num_frames=9, height=32, width=32, max_sequence_length=16, output_type="pt").frames

    return LTXPipeline, base, policy, sampler, call


@pytest.mark.parametrize("backbone", [_wan, _hunyuan, _ltx], ids=["wan", "hunyuan", "ltx"])
def test_lora_export_loads_with_load_lora_weights_and_samples_the_trained_video(backbone, tmp_path, capsys):
    pipe_cls, base, policy, sampler, call = backbone(tmp_path)
    config = write_config(tmp_path, policy, sampler)
    ckpt = write_checkpoint(tmp_path / "last.ckpt", trained_state(config, seed=1, scale=1.0), step=12)

    code, err = run_export(capsys, "--config", config, "--ckpt", ckpt, "--out", tmp_path / "lora")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [
        "README.md", LORA_WEIGHT_NAME, "scheduler", "sp_grpo_config.yaml", "sp_grpo_export.json"
    ]

    ours, noise = library_video(config, ckpt)
    pipe = pipe_cls.from_pretrained(str(base), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    base_video = call(pipe, noise.clone()).float()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    # As the folder's README says: the run's scheduler, in case the base folder ships another.
    pipe.scheduler = type(pipe.scheduler).from_pretrained(str(tmp_path / "lora"), subfolder="scheduler")
    theirs = call(pipe, noise.clone()).float()

    assert (base_video - ours).abs().max() > 1e-2  # the adapter matters, so the comparison below can fail
    torch.testing.assert_close(theirs, ours, atol=TOLERANCE, rtol=0)

    info = json.loads((tmp_path / "lora/sp_grpo_export.json").read_text())
    assert info["kind"] == "lora" and info["global_step"] == 12 and info["weights"] == "current"
    readme = (tmp_path / "lora/README.md").read_text()
    assert str(base) in readme and "rank 4" in readme and "12 optimizer steps" in readme
    assert "subfolder='scheduler'" in readme


# -- full fine-tuning: a whole pipeline folder ----------------------------------------------------------


def test_full_finetuning_exports_a_pipeline_folder_that_from_pretrained_samples_the_trained_video(tmp_path, capsys):
    from diffusers import WanPipeline

    policy = """    class_path: sp_grpo.policies.TinyWanPolicy
    init_args: {lora_rank: null}"""
    config = write_config(tmp_path, policy)
    ckpt = write_checkpoint(tmp_path / "last.ckpt", trained_state(config, seed=2, scale=0.05), step=5)

    code, err = run_export(capsys, "--config", config, "--ckpt", ckpt, "--out", tmp_path / "pipe")
    assert code == 0, err
    for entry in ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler", "README.md"):
        assert (tmp_path / "pipe" / entry).exists(), entry

    ours, noise = library_video(config, ckpt)
    base, _ = library_video(config, None)
    pipe = WanPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, latents=noise, num_inference_steps=3, guidance_scale=2.0, num_frames=5, height=32, width=32,
                  max_sequence_length=16, output_type="pt").frames.float()
    assert (base - ours).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, atol=TOLERANCE, rtol=0)
    # The components training does not change are the run's own, bit for bit.
    trained = load_trained_policy(config, ckpt)
    for name, param in trained.policy.text_encoder.state_dict().items():
        torch.testing.assert_close(pipe.text_encoder.state_dict()[name], param, atol=0, rtol=0)


def test_the_shapes_world_generator_exports_and_loads_back(tmp_path, capsys):
    """The demo's policy (full fine-tuning, pixel space): WanPipeline.from_pretrained(folder, vae=None) samples it."""
    from diffusers import WanPipeline

    policy = """    class_path: sp_grpo.toy.ShapesWanPolicy
    init_args: {lora_rank: null, reference_copy: true}"""
    config = write_config(tmp_path, policy, "{num_steps: 4, guidance_scale: 1.0, num_frames: 4, height: 16, width: 16}")
    ckpt = write_checkpoint(tmp_path / "last.ckpt", trained_state(config, seed=3, scale=0.05), step=300)

    code, err = run_export(capsys, "--config", config, "--ckpt", ckpt, "--out", tmp_path / "shapes")
    assert code == 0, err
    assert "vae=None" in (tmp_path / "shapes/README.md").read_text()

    ours, noise = library_video(config, ckpt)
    pipe = WanPipeline.from_pretrained(str(tmp_path / "shapes"), vae=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(PROMPT, latents=noise, num_inference_steps=4, guidance_scale=1.0, num_frames=4, height=16, width=16,
                   max_sequence_length=8, output_type="latent").frames
    theirs = ((latents.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)  # pixel space: (C, T, H, W) in [-1, 1]
    base, _ = library_video(config, None)
    assert (base - ours).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, atol=TOLERANCE, rtol=0)

    # The folder's README names the shipped base model and its snippet runs as written.
    readme = (tmp_path / "shapes/README.md").read_text()
    assert f"base model: {CHECKPOINT_DIR}" in readme and "300 optimizer steps" in readme
    (snippet,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    scope: dict = {}
    exec(snippet.replace("<this folder>", str(tmp_path / "shapes")).replace("<your prompt>", PROMPT), scope)
    assert scope["video"].shape == (1, 3, 4, 16, 16)


# -- which weights ----------------------------------------------------------------------------------------


def test_ema_weights_are_exported_when_the_run_averaged_and_the_live_ones_on_request(tmp_path, capsys):
    policy = """    class_path: sp_grpo.policies.TinyWanPolicy
    init_args: {lora_rank: 4}"""
    config = write_config(tmp_path, policy, callbacks=EMA)
    ema, live = trained_state(config, seed=4), trained_state(config, seed=5)
    ckpt = write_checkpoint(tmp_path / "ema.ckpt", ema, step=7, current=live)

    def exported(folder):
        return load_file(str(tmp_path / folder / LORA_WEIGHT_NAME))

    assert run_export(capsys, "--config", config, "--ckpt", ckpt, "--out", tmp_path / "auto")[0] == 0
    assert run_export(capsys, "--config", config, "--ckpt", ckpt, "--out", tmp_path / "live", "--weights", "current")[0] == 0
    for folder, expected in (("auto", ema), ("live", live)):
        weights = exported(folder)
        assert len(weights) == len(expected)
        for name, value in expected.items():
            # peft's key `...to_q.lora_A.default.weight` is diffusers' `transformer....to_q.lora_A.weight`.
            key = "transformer." + name.removeprefix("policy.transformer.").replace(".default", "")
            torch.testing.assert_close(weights[key], value, atol=0, rtol=0)
    assert "EMA average" in (tmp_path / "auto/README.md").read_text()
    assert json.loads((tmp_path / "live/sp_grpo_export.json").read_text())["weights"] == "current"

    plain = write_checkpoint(tmp_path / "plain.ckpt", live, step=7)
    code, err = run_export(capsys, "--config", config, "--ckpt", plain, "--out", tmp_path / "none", "--weights", "ema")
    assert code == 1 and "`--weights ema`" in err and "holds no EMA weights" in err
    assert not (tmp_path / "none").exists()


# -- bad input: one line naming the setting, nothing written ---------------------------------------------


@pytest.fixture
def tiny_run(tmp_path):
    policy = """    class_path: sp_grpo.policies.TinyWanPolicy
    init_args: {lora_rank: 4}"""
    config = write_config(tmp_path, policy)
    return config, write_checkpoint(tmp_path / "last.ckpt", trained_state(config, seed=6), step=12)


def test_missing_checkpoint_and_config(tiny_run, tmp_path, capsys):
    config, _ = tiny_run
    code, err = run_export(capsys, "--config", config, "--ckpt", tmp_path / "nope.ckpt", "--out", tmp_path / "out")
    assert code == 1 and "`--ckpt`" in err and "does not exist" in err and len(err.strip().splitlines()) == 1
    code, err = run_export(capsys, "--config", tmp_path / "nope.yaml", "--ckpt", tiny_run[1], "--out", tmp_path / "out")
    assert code == 1 and "`--config`" in err and "does not exist" in err
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    code, err = run_export(capsys, "--config", config, "--ckpt", tmp_path / "garbage.ckpt", "--out", tmp_path / "out")
    assert code == 1 and "cannot be read" in err
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_config_is_refused(tiny_run, tmp_path, capsys):
    config, ckpt = tiny_run
    (tmp_path / "other").mkdir()
    other = write_config(tmp_path / "other", """    class_path: sp_grpo.policies.TinyWanPolicy
    init_args: {lora_rank: 8}""")
    code, err = run_export(capsys, "--config", other, "--ckpt", ckpt, "--out", tmp_path / "out")
    assert code == 1 and "was written by another run than `--config`" in err and "of another shape" in err
    assert not (tmp_path / "out").exists()


def test_non_empty_output_folder_is_kept_unless_overwrite(tiny_run, tmp_path, capsys):
    config, ckpt = tiny_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_export(capsys, "--config", config, "--ckpt", ckpt, "--out", out)
    assert code == 1 and "`--out`" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # A failure after the checks (here: a checkpoint of another model) leaves the folder as it was, too.
    bad = write_checkpoint(tmp_path / "bad.ckpt", {"policy.transformer.x": torch.zeros(1)})
    assert run_export(capsys, "--config", config, "--ckpt", bad, "--out", out, "--overwrite")[0] == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    assert run_export(capsys, "--config", config, "--ckpt", ckpt, "--out", out, "--overwrite")[0] == 0
    assert not (out / "keep.txt").exists() and (out / LORA_WEIGHT_NAME).exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]  # no leftovers


def test_output_folder_holding_the_run_is_refused_even_with_overwrite(tiny_run, tmp_path, capsys):
    config, ckpt = tiny_run  # both live in tmp_path
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_export(capsys, "--config", config, "--ckpt", ckpt, "--out", tmp_path, "--overwrite")
    assert code == 1 and "contains `--config`" in err and "choose an --out folder outside it" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and ckpt.exists()


# -- the console script, as users run it -----------------------------------------------------------------


def console(*args, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("sp-grpo")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sp_grpo.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_console_script_exports_and_refuses_to_overwrite(tiny_run, tmp_path):
    config, ckpt = tiny_run
    result = console("export", "--config", config, "--ckpt", ckpt, "--out", "exported", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote the LoRA adapter of {ckpt} (step 12, current weights) to exported/" in result.stdout
    assert json.loads((tmp_path / "exported/sp_grpo_export.json").read_text())["lora"]["rank"] == 4
    before = (tmp_path / "exported" / LORA_WEIGHT_NAME).read_bytes()

    again = console("export", "--config", config, "--ckpt", ckpt, "--out", "exported", cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1].startswith("sp-grpo export: error: `--out` ('exported') exists and is not empty")
    assert (tmp_path / "exported" / LORA_WEIGHT_NAME).read_bytes() == before


@pytest.mark.slow
def test_fit_then_export_and_sample_with_the_config_fit_saved(tmp_path):
    """What a user does after training: `sp-grpo fit`, then export and sample its last.ckpt with the saved config.yaml."""
    fit = console("fit", "--config", ROOT / "configs/tiny.yaml", "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (saved_config,) = tmp_path.glob("runs/tiny/logs/version_*/config.yaml")
    ckpt = "runs/tiny/checkpoints/last.ckpt"
    exported = console("export", "--config", saved_config, "--ckpt", ckpt, "--out", "exported", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert json.loads((tmp_path / "exported/sp_grpo_export.json").read_text())["global_step"] == 1
    sampled = console("sample", "--config", saved_config, "--ckpt", ckpt, "--prompts", "a red square moving left", "--out", "videos", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert (tmp_path / "videos/contact_sheet.png").exists() and len(list((tmp_path / "videos/videos").iterdir())) == 1
