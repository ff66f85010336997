import csv
import json
from pathlib import Path

import pytest
import torch

from sp_grpo.data.video import write_video
from sp_grpo.scoring import format_summary, score_main

MODEL_FREE = str(Path(__file__).parents[1] / "configs" / "rewards" / "model_free.yaml")


def _colour_video(rgb, t=4, size=16, moving=False):
    video = torch.tensor(rgb).view(1, 3, 1, 1).expand(t, 3, size, size).clone()
    if moving:
        for i in range(t):
            video[i, :, 4:8, i * 2 : i * 2 + 4] = 1.0
    return video


@pytest.fixture
def video_dir(tmp_path):
    folder = tmp_path / "videos"
    write_video(folder / "a red ball-0.mp4", _colour_video((0.9, 0.1, 0.1)))
    write_video(folder / "a red ball-1.mp4", _colour_video((0.1, 0.1, 0.9), moving=True))
    write_video(folder / "a blue ball-0.mp4", _colour_video((0.1, 0.1, 0.9), t=6))
    return folder


def test_score_writes_csv_and_prints_summary(video_dir, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    assert score_main(["--videos", str(video_dir), "--rewards", MODEL_FREE, "--out", str(out), "--batch-size", "2"]) == 0
    rows = {row["video"]: row for row in csv.DictReader(out.open())}
    assert sorted(rows) == ["a blue ball-0.mp4", "a red ball-0.mp4", "a red ball-1.mp4"]
    assert rows["a red ball-1.mp4"]["prompt"] == "a red ball"
    expected_columns = {"sharpness", "noise", "exposure", "flicker", "smoothness", "dynamic", "colour", "aspect/temporal"}
    assert expected_columns <= set(rows["a red ball-0.mp4"])
    # Static videos have zero dynamic degree, the moving one does not; red matches "red" better than blue.
    assert float(rows["a red ball-0.mp4"]["dynamic"]) == 0.0 < float(rows["a red ball-1.mp4"]["dynamic"])
    assert float(rows["a red ball-0.mp4"]["colour"]) > float(rows["a red ball-1.mp4"]["colour"])
    printed = capsys.readouterr().out
    assert "mean" in printed and "dynamic" in printed and "wrote 3 rows" in printed


def test_score_reads_prompt_file_and_num_frames(video_dir, tmp_path):
    prompts = tmp_path / "prompts.json"
    names = ["a red ball-0.mp4", "a red ball-1.mp4", "a blue ball-0.mp4"]
    prompts.write_text(json.dumps({name: "a blue ball" for name in names}))
    out = tmp_path / "scores.csv"
    argv = ["--videos", str(video_dir), "--rewards", MODEL_FREE, "--prompts", str(prompts), "--out", str(out), "--num-frames", "3"]
    assert score_main(argv) == 0
    rows = list(csv.DictReader(out.open()))
    assert {row["prompt"] for row in rows} == {"a blue ball"}


def test_score_corrupt_video_names_the_file_or_is_skipped(video_dir, tmp_path, capsys):
    (video_dir / "broken-0.mp4").write_bytes(b"garbage" * 100)
    out = tmp_path / "scores.csv"
    argv = ["--videos", str(video_dir), "--rewards", MODEL_FREE, "--out", str(out)]
    assert score_main(argv) == 1
    assert "cannot decode video" in capsys.readouterr().err and not out.exists()
    assert score_main([*argv, "--skip-corrupt"]) == 0
    assert "skipped 1 videos" in capsys.readouterr().err
    assert len(list(csv.DictReader(out.open()))) == 3


def test_format_summary_by_hand():
    table = format_summary({"r": [1.0, 3.0]})
    assert table.splitlines()[1].split() == ["r", "2.0000", "1.0000", "1.0000", "3.0000"]
