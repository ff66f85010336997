"""configs/rewards/qwen_vl_judge.yaml and judge_server.yaml: parsed by `sp-grpo fit` and run by `sp-grpo score`."""

import contextlib
import csv
import io
from pathlib import Path

import pytest
import torch
import yaml

from sp_grpo.cli import cli_main
from sp_grpo.data.video import write_video
from sp_grpo.rewards.judge_server import JudgeServerError
from sp_grpo.scoring import build_parser, score_main
from tests.rewards.test_judge_server import Server

ROOT = Path(__file__).resolve().parents[2]
JUDGE_CONFIGS = {
    "qwen_vl_judge.yaml": ("sp_grpo.rewards.QwenVLJudge", "/path/to/Qwen2.5-VL-7B-Instruct"),
    "judge_server.yaml": ("sp_grpo.rewards.ServerJudge", "http://127.0.0.1:8000/v1"),
}
HEADS = {"judge_visual_quality": ("VQ", "fidelity"), "judge_motion": ("MQ", "temporal"), "judge_text_alignment": ("TA", "semantic")}


@pytest.mark.parametrize("name", sorted(JUDGE_CONFIGS))
def test_judge_config_parses_for_fit_and_score(name):
    config = ROOT / "configs" / "rewards" / name
    judge_class, placeholder = JUDGE_CONFIGS[name]
    out = io.StringIO()
    demo = str(ROOT / "configs" / "demo.yaml")
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", demo, "--model.rewards", str(config), "--print_config"], run=True)
    assert exit_info.value.code in (0, None), out.getvalue()[-2000:]
    rewards = yaml.safe_load(out.getvalue())["model"]["rewards"]["init_args"]["rewards"]
    assert set(rewards) == set(HEADS)
    for reward_name, (head, aspect) in HEADS.items():
        init = rewards[reward_name]["init_args"]
        assert (init["head"], init["aspect"]) == (head, aspect)
        assert init["judge"]["class_path"] == judge_class
        assert placeholder in init["judge"]["init_args"].values()
        assert set(init["judge"]["init_args"]["questions"]) == {"VQ", "MQ", "TA"}
        if name == "judge_server.yaml":  # `auto` would decide per process: under DDP, per rank
            assert init["judge"]["init_args"]["scoring"] == "logprobs"
    # `sp-grpo score` reads the same file (parsing only; the placeholder is not loaded).
    build_parser().parse_args(["--videos", "videos", "--rewards", str(config)])


@pytest.fixture
def judged_videos(tmp_path):
    folder = tmp_path / "videos"
    g = torch.Generator().manual_seed(0)
    for i, prompt in enumerate(["a red ball", "a blue cat", "a dog"]):
        write_video(folder / f"{prompt}-{i}.mp4", torch.rand(4, 3, 16, 16, generator=g))
    return folder


def run_score(config_text, videos, tmp_path, capsys):
    config = tmp_path / "judge.yaml"
    config.write_text(config_text)
    out = tmp_path / "scores.csv"
    assert score_main(["--videos", str(videos), "--rewards", str(config), "--out", str(out), "--batch-size", "3"]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 and "wrote 3 rows" in printed
    for reward_name in HEADS:
        assert reward_name in printed  # the summary table names each head
        scores = [float(row[reward_name]) for row in rows]
        assert all(0.0 <= s <= 1.0 for s in scores)
    return rows


def test_score_with_the_qwen_judge_config_prints_the_three_heads(tiny_qwen_vl_dir, judged_videos, tmp_path, capsys):
    text = (ROOT / "configs/rewards/qwen_vl_judge.yaml").read_text()
    run_score(text.replace("/path/to/Qwen2.5-VL-7B-Instruct", str(tiny_qwen_vl_dir)), judged_videos, tmp_path, capsys)


def test_score_with_the_judge_server_config_prints_the_three_heads(judged_videos, tmp_path, capsys):
    server = Server("--mode", "brightness")
    try:
        text = (ROOT / "configs/rewards/judge_server.yaml").read_text()
        rows = run_score(text.replace("http://127.0.0.1:8000/v1", server.url), judged_videos, tmp_path, capsys)
        assert server.stats()["requests"] == 3 * 3  # three heads of one shared judge: each request once
    finally:
        server.stop()
    # The fake server's P(Yes) is the frames' brightness, the same for every question.
    for row in rows:
        assert float(row["judge_visual_quality"]) == pytest.approx(float(row["judge_text_alignment"]), abs=1e-6)


def test_a_judge_that_breaks_mid_fit_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    # 1 prompt x group 2 = 2 videos x 3 questions = 6 requests per step: steps 1-2 are judged, step 3 is not.
    server = Server("--mode", "brightness", "--fail-after", "12")
    try:
        text = (ROOT / "configs/rewards/judge_server.yaml").read_text().replace("http://127.0.0.1:8000/v1", server.url)
        (tmp_path / "judge.yaml").write_text(text)
        monkeypatch.chdir(tmp_path)
        args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--model.rewards", str(tmp_path / "judge.yaml"),
                "--data.batch_size", "1", "--model.group_size", "2", "--trainer.max_steps", "4", "--trainer.logger", "false"]
        with pytest.raises(JudgeServerError, match=rf"{server.url}/chat/completions put no probability on a yes/no answer"):
            cli_main(args)
    finally:
        server.stop()
    last = torch.load(tmp_path / "runs/tiny/checkpoints/last.ckpt", weights_only=False, map_location="cpu")
    assert last["global_step"] == 2
    assert not any("judge" in key for key in last["state_dict"])  # the frozen judge never enters the checkpoint
