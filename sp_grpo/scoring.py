"""``sp-grpo score``: score a folder of videos with a reward config, write a CSV, print a summary.

Example::

    sp-grpo score --videos samples/ --rewards configs/rewards/model_free.yaml --out scores.csv

Prompts come from ``--prompts`` (``.json`` name -> prompt, or ``.csv``/``.tsv`` with columns
``video,prompt``) or, without it, from VBench-style file names ``<prompt>-<index>.mp4``.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import torch
from jsonargparse import ActionYesNo, ArgumentParser

from sp_grpo.data.video import VideoDecodeError, VideoFolder
from sp_grpo.rewards.mixture import RewardSet

__all__ = ["build_parser", "format_summary", "score_main"]


def build_parser() -> ArgumentParser:
    """The ``sp-grpo score`` argument parser.

    Returns:
        A jsonargparse parser; ``--rewards`` takes a reward YAML (a ``RewardSet`` class_path/init_args).
    """
    parser = ArgumentParser(prog="sp-grpo score", description="Score a folder of videos with a reward config.")
    parser.add_argument("--videos", type=str, required=True, help="Folder of videos (.mp4, .avi, .mov, .mkv, .webm, .gif).")
    parser.add_argument("--rewards", type=RewardSet, required=True, enable_path=True, help="Reward config YAML, e.g. configs/rewards/model_free.yaml.")
    parser.add_argument("--prompts", type=str | None, default=None, help="Prompt file (.json, .csv, .tsv); default: VBench-style names.")
    parser.add_argument("--out", type=str, default="scores.csv", help="Output CSV, one row per video.")
    parser.add_argument("--num_frames", "--num-frames", type=int | None, default=None, help="Frames decoded per video, evenly spaced.")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=8, help="Videos scored together (same-shaped neighbours).")
    parser.add_argument("--device", type=str, default="cpu", help="Device for the rewards, e.g. cuda.")
    parser.add_argument("--skip_corrupt", "--skip-corrupt", action=ActionYesNo, default=False, help="Skip videos that fail to decode and report them.")
    return parser


def format_summary(columns: dict[str, list[float]]) -> str:
    """A plain-text table of mean, std, min and max per column.

    Args:
        columns: column name -> values.

    Returns:
        The table, one line per column.
    """
    width = max(len("reward"), *(len(name) for name in columns))
    lines = [f"{'reward':<{width}}  {'mean':>9}  {'std':>9}  {'min':>9}  {'max':>9}"]
    for name, values in columns.items():
        t = torch.tensor(values, dtype=torch.float64)
        std = t.std(unbiased=False).item() if len(values) > 1 else 0.0
        lines.append(f"{name:<{width}}  {t.mean():9.4f}  {std:9.4f}  {t.min():9.4f}  {t.max():9.4f}")
    return "\n".join(lines)


def score_main(argv: list[str] | None = None) -> int:
    """Run ``sp-grpo score``.

    Args:
        argv: command-line arguments after ``score``; ``None`` reads ``sys.argv[2:]``.

    Returns:
        The exit status: 0 on success, 1 when a video cannot be decoded (without ``--skip-corrupt``)
        or nothing could be scored.
    """
    from tqdm.auto import tqdm

    parser = build_parser()
    cfg = parser.parse_args(sys.argv[2:] if argv is None else argv)
    rewards: RewardSet = parser.instantiate(cfg).rewards
    rewards = rewards.to(cfg.device).eval()
    dataset = VideoFolder(cfg.videos, prompts=cfg.prompts, num_frames=cfg.num_frames)

    rows: list[dict[str, object]] = []
    skipped: list[str] = []
    pending: list[dict[str, object]] = []

    def flush() -> None:
        if not pending:
            return
        videos = torch.stack([item["video"] for item in pending]).to(cfg.device)
        prompts = [item["prompt"] for item in pending]
        with torch.no_grad():
            out = rewards(videos, prompts)
        for i, item in enumerate(pending):
            row: dict[str, object] = {"video": Path(item["path"]).name, "prompt": item["prompt"]}
            row.update({name: float(scores[i]) for name, scores in out.per_reward.items()})
            row.update({f"aspect/{aspect}": float(scores[i]) for aspect, scores in out.per_aspect.items()})
            rows.append(row)
        pending.clear()

    for index in tqdm(range(len(dataset)), desc="scoring", unit="video", disable=len(dataset) < 2):
        try:
            item = dataset[index]
        except VideoDecodeError as err:
            if not cfg.skip_corrupt:
                print(f"sp-grpo score: {err}\nRemove the file or pass --skip-corrupt.", file=sys.stderr)
                return 1
            skipped.append(str(dataset.paths[index]))
            continue
        if pending and (item["video"].shape != pending[0]["video"].shape or len(pending) >= cfg.batch_size):
            flush()
        pending.append(item)
    flush()

    if skipped:
        print(f"sp-grpo score: skipped {len(skipped)} videos that could not be decoded: {skipped}", file=sys.stderr)
    if not rows:
        print("sp-grpo score: no video could be scored.", file=sys.stderr)
        return 1
    out_path = Path(cfg.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    numeric = {k: [float(r[k]) for r in rows] for k in rows[0] if k not in ("video", "prompt")}
    print(format_summary({k: v for k, v in numeric.items() if all(math.isfinite(x) for x in v)}))
    print(f"wrote {len(rows)} rows to {out_path}")
    return 0
