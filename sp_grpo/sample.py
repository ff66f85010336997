"""``sp-grpo sample``: videos of your own prompts from a trained checkpoint (or the base model), and a contact sheet.

Example::

    sp-grpo sample --config configs/demo.yaml --ckpt runs/demo/checkpoints/last.ckpt \\
        --prompts "a red plus moving up" "a blue x moving right" --out samples_after

Each prompt is sampled once with the library's deterministic ODE sampler
(:func:`~sp_grpo.rollout.sample_ode`, what validation and the demo's sample videos use) from noise
seeded by ``--seed`` plus the prompt's index, so a prompt's video depends on nothing else: the same
command with and without ``--ckpt`` compares before and after on the same noise. Steps and guidance
come from the run's ``model.sampler`` unless ``--num-steps`` / ``--guidance-scale`` are given.

The folder gets ``videos/<index>_<prompt>.mp4`` (``.gif`` for tiny videos), ``contact_sheet.png``
(first, middle and last frame of each prompt, one row per prompt) and ``samples.json`` (prompts,
seeds, files and the settings used).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import ActionYesNo, ArgumentParser
from torch import Tensor

from sp_grpo.checkpoint import CheckpointError
from sp_grpo.rollout import sample_ode
from sp_grpo.trained import RunInputError, TrainedPolicy, check_output_folder, load_trained_policy, replace_folder

VideoFormat = Literal["auto", "gif", "mp4"]
#: Videos whose larger side is at most this many pixels are written as (upscaled) GIFs by ``--format auto``.
GIF_MAX_SIDE = 64


def read_prompts(values: list[str]) -> list[str]:
    """The prompts of ``--prompts``: one value naming a text file (one prompt per line), or the prompts themselves.

    In a file, blank lines and lines starting with ``#`` are skipped. A single value ending in
    ``.txt`` must be an existing file.

    Raises:
        RunInputError: If the file is missing or holds no prompt, or no prompt is given.
    """
    if len(values) == 1 and (Path(values[0]).is_file() or values[0].endswith(".txt")):
        path = Path(values[0])
        if not path.is_file():
            raise RunInputError(f"`--prompts` ({values[0]!r}) names no file: pass a text file with one prompt per line, or the prompts themselves.")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [line for line in lines if line and not line.startswith("#")]
        if not prompts:
            raise RunInputError(f"`--prompts` file {values[0]!r} holds no prompt: write one prompt per line (lines starting with # are skipped).")
        return prompts
    prompts = [value.strip() for value in values if value.strip()]
    if not prompts:
        raise RunInputError("`--prompts` is empty: pass one or more prompts, or a text file with one prompt per line.")
    return prompts


def contact_sheet(videos: list[Tensor], labels: list[str], height: int = 96, gap: int = 4) -> "Image.Image":  # noqa: F821
    """First, middle and last frame of each video, one row per video under its label.

    Args:
        videos: ``(T, 3, H, W)`` videos in ``[0, 1]``.
        labels: One line of text per video.
        height: Height of each frame on the sheet (nearest-neighbour scaling, so tiny frames stay crisp).
        gap: Pixels between frames and rows.

    Returns:
        A PIL RGB image.
    """
    from PIL import Image, ImageDraw

    text_height = 14
    cells, titles = [], []
    for video, label in zip(videos, labels):
        t = video.shape[0]
        picked = list(dict.fromkeys((0, (t - 1) // 2, t - 1)))
        titles.append(f"{label}  [frames {', '.join(map(str, picked))}]")
        frames = [video[i] for i in picked]
        width = round(video.shape[-1] * height / video.shape[-2])
        cells.append([_to_image(frame).resize((width, height), Image.NEAREST) for frame in frames])
    sheet_width = max(sum(img.width + gap for img in row) + gap for row in cells)
    sheet_width = max(sheet_width, 6 * max(len(title) for title in titles) + 2 * gap)
    row_height = text_height + height + gap
    sheet = Image.new("RGB", (sheet_width, gap + row_height * len(cells)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (row, title) in enumerate(zip(cells, titles)):
        top = gap + r * row_height
        draw.text((gap, top), title, fill=(0, 0, 0))
        left = gap
        for img in row:
            sheet.paste(img, (left, top + text_height))
            left += img.width + gap
    return sheet


def _to_image(frame: Tensor) -> "Image.Image":  # noqa: F821
    from PIL import Image

    array = (frame.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def _slug(prompt: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit] or "prompt"


def sample_videos(trained: TrainedPolicy, prompts: list[str], seed: int, device: str = "cpu", progress: bool = True) -> list[Tensor]:
    """One ODE sample per prompt, prompt ``i`` from noise seeded by ``seed + i``.

    Args:
        trained: The policy and the sampler settings to use.
        prompts: The prompts.
        seed: Seed of the first prompt's noise.
        device: Where to sample.
        progress: Show a progress bar.

    Returns:
        ``(T, 3, H, W)`` videos in ``[0, 1]`` on the CPU, one per prompt.
    """
    from tqdm.auto import tqdm

    policy = trained.policy.to(device)
    videos = []
    for index, prompt in enumerate(tqdm(prompts, desc="sampling", unit="video", disable=not progress)):
        generator = torch.Generator(device=device).manual_seed(seed + index)
        videos.append(sample_ode(policy, [prompt], trained.sampler, generator=generator, device=device)[0].cpu())
    return videos


def write_samples(out: Path, videos: list[Tensor], prompts: list[str], video_format: VideoFormat, fps: float, scale: int | None) -> list[str]:
    """Write each video (GIF upscaled by ``scale``, or mp4) under ``out/videos`` and the contact sheet; return the file names."""
    from sp_grpo.data.video import write_video
    from sp_grpo.toy.callbacks import write_gif

    files = []
    for index, (video, prompt) in enumerate(zip(videos, prompts)):
        side = max(video.shape[-2:])
        use_gif = video_format == "gif" or (video_format == "auto" and side <= GIF_MAX_SIDE)
        name = f"videos/{index:03d}_{_slug(prompt)}.{'gif' if use_gif else 'mp4'}"
        if use_gif:
            factor = scale or max(1, 128 // side)
            write_gif(out / name, video.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1), fps=fps)
        else:
            write_video(out / name, video, fps=fps)
        files.append(name)
    contact_sheet(videos, [f"{i}: {p}" for i, p in enumerate(prompts)]).save(out / "contact_sheet.png")
    return files


def build_parser() -> ArgumentParser:
    """The ``sp-grpo sample`` argument parser."""
    parser = ArgumentParser(prog="sp-grpo sample", description="Sample videos of prompts from a trained checkpoint (or the base model).")
    parser.add_argument("--config", type=str, required=True, help="The run's config YAML (what `sp-grpo fit --config` read).")
    parser.add_argument("--ckpt", type=str | None, default=None, help="A checkpoint written by `sp-grpo fit`; leave out to sample the base model.")
    parser.add_argument("--prompts", type=str, nargs="+", required=True, help="A text file (one prompt per line) or the prompts themselves.")
    parser.add_argument("--out", type=str, required=True, help="Output folder; must not exist or be empty unless --overwrite.")
    parser.add_argument("--seed", type=int, default=0, help="Prompt i is sampled from noise seeded by seed + i.")
    parser.add_argument("--num_steps", "--num-steps", type=int | None, default=None, help="Sampler steps; default: the config's model.sampler.num_steps.")
    parser.add_argument("--guidance_scale", "--guidance-scale", type=float | None, default=None, help="Classifier-free guidance; default: the config's.")
    parser.add_argument("--weights", type=str, default="auto", help="auto (EMA when the run averaged, else the trained weights), ema, or current.")
    parser.add_argument("--format", type=VideoFormat, default="auto", help=f"gif, mp4, or auto: GIF when the larger side is at most {GIF_MAX_SIDE} px.")
    parser.add_argument("--fps", type=float, default=4.0, help="Frames per second of the written videos.")
    parser.add_argument("--scale", type=int | None, default=None, help="Upscaling of GIF frames; default: to about 128 px.")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu", help="Where to sample.")
    parser.add_argument("--overwrite", action=ActionYesNo, default=False, help="Replace the contents of a non-empty --out folder.")
    return parser


def sample_main(argv: list[str] | None = None) -> int:
    """Run ``sp-grpo sample``.

    Args:
        argv: Arguments after ``sample``; ``None`` reads ``sys.argv[2:]``.

    Returns:
        0 on success, 1 on bad input (one line on stderr, nothing written).
    """
    cfg = build_parser().parse_args(sys.argv[2:] if argv is None else argv)
    try:
        prompts = read_prompts(cfg.prompts)
        out = check_output_folder(cfg.out, cfg.overwrite, {"--config": cfg.config, "--ckpt": cfg.ckpt})
        trained = load_trained_policy(cfg.config, cfg.ckpt, cfg.weights)
        overrides = {"num_steps": cfg.num_steps, "guidance_scale": cfg.guidance_scale}
        try:
            sampler = dataclasses.replace(trained.sampler, **{k: v for k, v in overrides.items() if v is not None})
        except ValueError as err:  # DenoisingConfig names `model.sampler.<field>`; here the flag set it
            message = str(err).replace("`model.sampler.num_steps`", "`--num-steps`")
            raise RunInputError(message.replace("`model.sampler.guidance_scale`", "`--guidance-scale`")) from err
        trained = dataclasses.replace(trained, sampler=sampler)
        videos = sample_videos(trained, prompts, cfg.seed, cfg.device)
        with replace_folder(out) as staging:
            files = write_samples(staging, videos, prompts, cfg.format, cfg.fps, cfg.scale)
            manifest = {
                "config": str(trained.config_path),
                "checkpoint": str(trained.checkpoint_path) if trained.checkpoint_path else None,
                "weights": trained.weights,
                "global_step": trained.global_step,
                "sampler": dataclasses.asdict(sampler),
                "samples": [{"prompt": p, "seed": cfg.seed + i, "file": f} for i, (p, f) in enumerate(zip(prompts, files))],
                "contact_sheet": "contact_sheet.png",
            }
            (staging / "samples.json").write_text(json.dumps(manifest, indent=2) + "\n")
    except (RunInputError, CheckpointError) as err:
        print(f"sp-grpo sample: error: {err}", file=sys.stderr)
        return 1
    source = f"{trained.checkpoint_path} (step {trained.global_step}, {trained.weights} weights)" if trained.checkpoint_path else "the base model"
    print(
        f"sp-grpo sample: {len(prompts)} videos of {source}, {sampler.num_steps} steps, guidance {sampler.guidance_scale},"
        f" seeds {cfg.seed}..{cfg.seed + len(prompts) - 1} -> {out}/ (contact_sheet.png, videos/)"
    )
    return 0


__all__ = ["build_parser", "contact_sheet", "read_prompts", "sample_main", "sample_videos", "write_samples"]
