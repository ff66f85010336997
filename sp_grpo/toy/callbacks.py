"""Callbacks of the demo: sample videos of fixed prompts, and the before/after gold evaluation.

:class:`SampleVideos` works with any module that has a ``policy`` (a
:class:`~sp_grpo.policies.VideoPolicy`) and a ``sampler`` (a
:class:`~sp_grpo.rollout.DenoisingConfig`), as :class:`~sp_grpo.SelfPacedGRPO` has; only
:class:`GoldEvaluation` is specific to the shapes world.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from sp_grpo.rollout import sample_ode
from sp_grpo.toy.gold import GOLD_METRICS, gold_scores
from sp_grpo.toy.world import parse_prompt, prompts_for_split

VideoFormat = Literal["gif", "mp4"]


def _log_folder(trainer: pl.Trainer) -> Path:
    """The first logger's folder, or ``default_root_dir`` without a logger.

    Call it on every rank: ``trainer.log_dir`` broadcasts rank 0's answer, and a collective called
    from rank 0 alone (inside ``rank_zero_only``) waits for ranks that are not coming.
    """
    folder = trainer.log_dir if trainer.logger is not None and trainer.log_dir else trainer.default_root_dir
    return Path(folder)


def _check_module(module: pl.LightningModule, owner: str) -> None:
    if not hasattr(module, "policy") or not hasattr(module, "sampler"):
        raise AttributeError(
            f"{owner} samples with `pl_module.policy` and `pl_module.sampler`, which {type(module).__name__} lacks:"
            " use it with sp_grpo.SelfPacedGRPO, or give your module a VideoPolicy `policy` and a DenoisingConfig"
            " `sampler`."
        )


@torch.no_grad()
def sample_fixed(module: pl.LightningModule, prompts: list[str], seed: int) -> Tensor:
    """ODE samples of ``prompts`` from noise seeded by ``seed``, with the module's sampler; ``(B, T, 3, H, W)``."""
    was_training = module.training
    module.eval()
    generator = torch.Generator(device=module.device).manual_seed(seed)
    videos = sample_ode(module.policy, prompts, module.sampler, generator=generator, device=module.device)
    module.train(was_training)
    return videos


def video_grid(videos: Tensor, scale: int = 1, gap: int = 1) -> Tensor:
    """Tile ``(B, T, 3, H, W)`` videos side by side into one ``(T, 3, H', W')`` video.

    Args:
        videos: ``(B, T, 3, H, W)`` in ``[0, 1]``.
        scale: Nearest-neighbour upscaling factor (tiny frames are unreadable at 1).
        gap: Grey pixels between videos, before upscaling.

    Returns:
        ``(T, 3, H * scale, (B * (W + gap) - gap) * scale)`` in ``[0, 1]``.
    """
    b, t, c, h, w = videos.shape
    padded = torch.nn.functional.pad(videos.float().cpu(), (0, gap), value=0.5)
    grid = padded.permute(1, 2, 3, 0, 4).reshape(t, c, h, b * (w + gap))[..., : b * (w + gap) - gap]
    return grid.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def write_gif(path: Path, video: Tensor, fps: float = 4.0) -> Path:
    """Write ``(T, 3, H, W)`` frames in ``[0, 1]`` as a looping GIF with Pillow."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    frames = (video.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


class SampleVideos(Callback):
    """Write sample videos of fixed prompts and seeds before training, every ``every_n_steps`` and at the end.

    Each write is one file, ``<log dir>/<folder>/step_<global step>.<format>``: the prompts side by
    side, the same noise every time, so files of different steps compare directly. Works with any
    policy: it calls :func:`~sp_grpo.rollout.sample_ode` with ``pl_module.policy`` and
    ``pl_module.sampler``. With a TensorBoard logger the frames are also logged as images.

    Args:
        prompts: The prompts to sample (one video each).
        seed: Seed of the initial noise.
        every_n_steps: Optimizer steps between writes; 0 writes only before and after training.
        video_format: ``"gif"`` (Pillow) or ``"mp4"`` (PyAV, H.264).
        scale: Nearest-neighbour upscaling of the frames.
        fps: Frames per second of the files.
        folder: Subfolder of the log folder.

    Raises:
        ValueError: If a setting is out of range.
    """

    def __init__(
        self,
        prompts: list[str],
        seed: int = 0,
        every_n_steps: int = 0,
        video_format: VideoFormat = "gif",
        scale: int = 8,
        fps: float = 4.0,
        folder: str = "samples",
    ) -> None:
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("`prompts` must be a non-empty list of non-empty strings.")
        if every_n_steps < 0:
            raise ValueError(f"`every_n_steps` ({every_n_steps}) must be 0 (only before and after) or positive.")
        if video_format not in ("gif", "mp4"):
            raise ValueError(f"`video_format` ({video_format!r}) must be one of ['gif', 'mp4'].")
        if scale < 1:
            raise ValueError(f"`scale` ({scale}) must be at least 1.")
        if fps <= 0:
            raise ValueError(f"`fps` ({fps}) must be positive.")
        self.prompts = list(prompts)
        self.seed = seed
        self.every_n_steps = every_n_steps
        self.video_format = video_format
        self.scale = scale
        self.fps = fps
        self.folder = folder
        self.written: list[Path] = []
        self._last_step = -1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _check_module(pl_module, type(self).__name__)
        self._write(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._write(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = int(trainer.global_step)
        if step == self._last_step:
            return  # already written at this step (e.g. the last batch and fit end)
        self._last_step = step
        videos = sample_fixed(pl_module, self.prompts, self.seed)
        path = _log_folder(trainer) / self.folder / f"step_{step:06d}.{self.video_format}"
        self._save(trainer, video_grid(videos, self.scale), step, path)

    @rank_zero_only
    def _save(self, trainer: pl.Trainer, grid: Tensor, step: int, path: Path) -> None:
        if self.video_format == "gif":
            write_gif(path, grid, self.fps)
        else:
            from sp_grpo.data.video import write_video

            write_video(path, grid, fps=self.fps)
        self.written.append(path)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_images"):  # TensorBoard's SummaryWriter
                experiment.add_images(f"{self.folder}/frames", grid, global_step=step)


class GoldEvaluation(Callback):
    """The shapes world's gold evaluation before and after training, printed as a table.

    Samples every prompt ``seeds`` times with the module's sampler as an ODE (fixed noise, so the
    before and after videos start from the same noise), scores them with
    :func:`~sp_grpo.toy.gold.gold_scores` and logs ``gold/<metric>``. At the end of fit it prints a
    before/after table and writes ``filename`` into the log folder. This is *not* a training reward.

    Args:
        prompts: Prompts to evaluate; ``None`` takes the held-out split
            (:func:`~sp_grpo.toy.world.prompts_for_split` ``("test")``).
        seeds: Samples per prompt.
        seed: Seed of the noise.
        every_n_steps: Also evaluate every this many optimizer steps; 0 only before and after.
        filename: JSON file of every evaluation, in the log folder; ``None`` writes none.
        verbose: Print the before/after table at the end of fit.

    Raises:
        ValueError: If ``seeds`` is below 1, ``every_n_steps`` negative or a prompt outside the grammar.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        seeds: int = 8,
        seed: int = 1234,
        every_n_steps: int = 0,
        filename: str | None = "gold.json",
        verbose: bool = True,
    ) -> None:
        if seeds < 1:
            raise ValueError(f"`seeds` ({seeds}) must be at least 1 (samples per prompt).")
        if every_n_steps < 0:
            raise ValueError(f"`every_n_steps` ({every_n_steps}) must be 0 (only before and after) or positive.")
        self.prompts = list(prompts) if prompts is not None else prompts_for_split("test")
        for prompt in self.prompts:
            parse_prompt(prompt)
        self.seeds = seeds
        self.seed = seed
        self.every_n_steps = every_n_steps
        self.filename = filename
        self.verbose = verbose
        #: ``step -> metric -> value`` of every evaluation, in order.
        self.results: dict[int, dict[str, float]] = {}

    def evaluate(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """Gold means over ``prompts x seeds`` samples of the module's current policy."""
        prompts = self.prompts * self.seeds
        scores = gold_scores(sample_fixed(pl_module, prompts, self.seed), prompts)
        return {name: float(scores[name].mean()) for name in GOLD_METRICS}

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = int(trainer.global_step)
        if step in self.results:
            return
        self.results[step] = self.evaluate(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics({f"gold/{k}": v for k, v in self.results[step].items()}, step=step)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _check_module(pl_module, type(self).__name__)
        self._run(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._run(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module)
        self._report(_log_folder(trainer))

    def table(self) -> str:
        """The first and last evaluation side by side, as a Markdown table."""
        steps = sorted(self.results)
        first, last = self.results[steps[0]], self.results[steps[-1]]
        lines = [
            f"| gold metric ({len(self.prompts)} held-out prompts x {self.seeds} seeds) | step {steps[0]} | step {steps[-1]} | change |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {k} | {first[k]:.3f} | {last[k]:.3f} | {last[k] - first[k]:+.3f} |" for k in GOLD_METRICS]
        return "\n".join(lines)

    @rank_zero_only
    def _report(self, folder: Path) -> None:
        if self.verbose:
            print("\n" + self.table() + "\n")
        if self.filename is not None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / self.filename).write_text(json.dumps({str(k): v for k, v in self.results.items()}, indent=1))

    def state_dict(self) -> dict[str, Any]:
        return {"results": {str(k): v for k, v in self.results.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = {int(k): v for k, v in state_dict.get("results", {}).items()}


__all__ = ["GoldEvaluation", "SampleVideos", "sample_fixed", "video_grid", "write_gif"]
