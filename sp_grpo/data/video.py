"""Reading videos with decord, writing them with PyAV, and a dataset over a folder of videos."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["VIDEO_EXTENSIONS", "VideoDecodeError", "VideoFolder", "load_prompts", "prompt_from_name", "read_video", "write_video"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")


class VideoDecodeError(RuntimeError):
    """A video file could not be opened or decoded; the message names the file."""


def read_video(
    path: str | os.PathLike,
    num_frames: int | None = None,
    stride: int | None = None,
    size: tuple[int, int] | None = None,
) -> Tensor:
    """Read a video into ``(T, 3, H, W)`` float32 in ``[0, 1]`` with decord.

    Args:
        path: the video file.
        num_frames: keep this many evenly spaced frames (first and last included); a shorter video is
            read whole. ``None`` keeps all.
        stride: keep every ``stride``-th frame. Not together with ``num_frames``.
        size: ``(height, width)`` to resize to while decoding; ``None`` keeps the native size.

    Returns:
        ``(T, 3, H, W)`` float32 frames in ``[0, 1]``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If both ``num_frames`` and ``stride`` are set, or either is not positive.
        VideoDecodeError: If decord cannot open or decode the file.
    """
    if num_frames is not None and stride is not None:
        raise ValueError(f"read_video: set `num_frames` ({num_frames}) or `stride` ({stride}), not both.")
    for name, value in (("num_frames", num_frames), ("stride", stride)):
        if value is not None and value < 1:
            raise ValueError(f"read_video: `{name}` ({value}) must be a positive integer or None.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_video: no such video file: {str(path)!r}.")
    # decord is imported here: it is slow to import and only the readers need it.
    import decord

    height, width = size if size is not None else (-1, -1)
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), width=width, height=height)
        total = len(reader)
        if total == 0:
            raise VideoDecodeError("no frames")
        if stride is not None:
            index = list(range(0, total, stride))
        elif num_frames is not None and num_frames < total:
            index = np.linspace(0, total - 1, num_frames).round().astype(int).tolist()
        else:
            index = list(range(total))
        try:
            frames = reader.get_batch(index).asnumpy()  # (T, H, W, 3) uint8
        except decord.DECORDError:
            # decord 0.6 pads rows to 32 bytes for some widths and then fails its own size check;
            # single frames come back padded, which _unpad_rows undoes.
            frames = np.stack([_unpad_rows(reader[i].asnumpy()) for i in index])
    except Exception as err:  # decord raises its own DECORDError and RuntimeError subclasses
        raise VideoDecodeError(f"cannot decode video {str(path)!r}: {err}".strip()) from err
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)


def _unpad_rows(frame: np.ndarray) -> np.ndarray:
    """Undo decord's row padding: ``(H, W, C')`` bytes with rows padded -> ``(H, W, 3)``."""
    if frame.shape[-1] == 3:
        return frame
    height, width = frame.shape[:2]
    return frame.reshape(height, -1)[:, : width * 3].reshape(height, width, 3)


def write_video(path: str | os.PathLike, video: Tensor, fps: float = 8.0, crf: int = 10) -> Path:
    """Write ``(T, 3, H, W)`` frames in ``[0, 1]`` to an H.264 mp4 with PyAV.

    Odd heights or widths are padded by one pixel (edge-replicated): yuv420p needs even sizes.

    Args:
        path: output file; parent folders are created.
        video: ``(T, 3, H, W)`` float in ``[0, 1]`` (values outside are clamped).
        fps: frames per second.
        crf: x264 constant rate factor, 0 (lossless luma) to 51; lower is higher quality.

    Returns:
        The written path.

    Raises:
        ValueError: If ``video`` is not ``(T, 3, H, W)`` with ``T >= 1``.
    """
    if video.ndim != 4 or video.shape[1] != 3 or video.shape[0] < 1:
        raise ValueError(f"write_video: `video` must have shape (T, 3, H, W) with T >= 1, got {tuple(video.shape)}.")
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = (video.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    pad_h, pad_w = frames.shape[2] % 2, frames.shape[3] % 2
    if pad_h or pad_w:
        frames = torch.nn.functional.pad(frames.float(), (0, pad_w, 0, pad_h), mode="replicate").to(torch.uint8)
    array = frames.permute(0, 2, 3, 1).numpy()  # (T, H, W, 3)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height = array.shape[2], array.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in array:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def prompt_from_name(path: str | os.PathLike) -> str:
    """The prompt of a VBench-style file name ``<prompt>-<index>.mp4``.

    Args:
        path: the video path.

    Returns:
        The file stem without a trailing ``-<digits>``.

    Example:
        >>> prompt_from_name("videos/a red car driving-3.mp4")
        'a red car driving'
    """
    stem = Path(path).stem
    head, sep, tail = stem.rpartition("-")
    return head if sep and tail.isdigit() else stem


def load_prompts(path: str | os.PathLike) -> dict[str, str]:
    """Read a video-name -> prompt table.

    Formats: ``.json`` (an object ``{"name.mp4": "prompt", ...}``) or ``.csv``/``.tsv`` with a header
    holding the columns ``video`` and ``prompt``. Names are matched on the file name (no folder).

    Args:
        path: the file.

    Returns:
        File name -> prompt.

    Raises:
        ValueError: If the format is unknown or the columns are missing.
    """
    path = Path(path)
    if path.suffix == ".json":
        table = json.loads(path.read_text())
        if not isinstance(table, dict):
            raise ValueError(f"load_prompts: {str(path)!r} must hold a JSON object {{video name: prompt}}.")
        return {Path(k).name: str(v) for k, v in table.items()}
    if path.suffix in (".csv", ".tsv"):
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ","))
        if rows and not {"video", "prompt"} <= set(rows[0]):
            raise ValueError(f"load_prompts: {str(path)!r} needs the header columns 'video' and 'prompt', got {list(rows[0])}.")
        return {Path(row["video"]).name: row["prompt"] for row in rows}
    raise ValueError(f"load_prompts: unknown prompt file format {path.suffix!r} for {str(path)!r}; use .json, .csv or .tsv.")


class VideoFolder(Dataset):
    """The videos of a folder (sorted by name), with their prompts.

    Each item is ``{"video": (T, 3, H, W) float in [0, 1], "prompt": str, "path": str}``. Prompts come
    from ``prompts`` when given (every video must have one), otherwise from VBench-style names.

    Args:
        root: the folder; searched non-recursively for :data:`VIDEO_EXTENSIONS`.
        prompts: file name -> prompt, or a prompt file path (see :func:`load_prompts`).
        num_frames: frames per video, evenly spaced (see :func:`read_video`).
        stride: keep every ``stride``-th frame instead.
        size: ``(height, width)`` to resize to while decoding.

    Raises:
        FileNotFoundError: If ``root`` is not a folder or holds no videos.
        KeyError: If ``prompts`` misses a video.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        prompts: Mapping[str, str] | str | os.PathLike | None = None,
        num_frames: int | None = None,
        stride: int | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"VideoFolder: {str(self.root)!r} is not a folder.")
        self.paths = sorted(p for p in self.root.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
        if not self.paths:
            raise FileNotFoundError(f"VideoFolder: no videos ({', '.join(VIDEO_EXTENSIONS)}) in {str(self.root)!r}.")
        table = load_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else prompts
        if table is not None:
            missing = [p.name for p in self.paths if p.name not in table]
            if missing:
                raise KeyError(f"VideoFolder: no prompt for {len(missing)} videos, e.g. {missing[:3]}; add them to the prompt file.")
            self.prompts = [table[p.name] for p in self.paths]
        else:
            self.prompts = [prompt_from_name(p) for p in self.paths]
        self.num_frames, self.stride, self.size = num_frames, stride, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        video = read_video(path, num_frames=self.num_frames, stride=self.stride, size=self.size)
        return {"video": video, "prompt": self.prompts[index], "path": str(path)}
