"""Seconds per video of the in-process Qwen2.5-VL judge on this machine (issue 15's cost line).

A tiny random Qwen2.5-VL is built offline (the tests' builder), then ``QwenVLJudge`` scores 16 videos
of 16 frames at 32x32 (8 frames sampled, three questions each) in chunks of 4 after one warm-up
call. The tiny model says what the judge's own plumbing costs (frame sampling, resizing, patching,
batching); a real 7B judge is dominated by the model and needs a GPU.

    python benchmarks/judge_speed.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' offline tiny-model builder

from sp_grpo.rewards.vlm_judge import QwenVLJudge  # noqa: E402
from tests.rewards.conftest import build_tiny_qwen_vl  # noqa: E402


def main(videos: int = 16, chunk: int = 4) -> None:
    folder = build_tiny_qwen_vl(Path(tempfile.mkdtemp()))
    judge = QwenVLJudge(str(folder), num_frames=8, batch_size=6, dtype="float32")
    clips = torch.rand(videos, 16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red ball moving right"] * videos
    judge(clips[:2], prompts[:2])  # warm-up: first-call allocations and lazy imports
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, videos, chunk):
            judge(clips[i : i + chunk], prompts[i : i + chunk])
    elapsed = time.perf_counter() - start
    print(
        f"QwenVLJudge (tiny random Qwen2.5-VL, {torch.get_num_threads()} torch threads): {elapsed / videos:.3f} s per "
        f"video ({videos} videos, 8 frames of 32x32, 3 questions, chunks of {chunk})"
    )


if __name__ == "__main__":
    main()
