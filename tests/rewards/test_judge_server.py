"""ServerJudge against real server processes on loopback.

``fake_chat_server.py`` answers from the frames' brightness (exact expected scores, failure modes);
``tiny_vlm_server.py`` runs the tiny random Qwen2.5-VL and returns the model's own logprobs.
"""

import io
import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from sp_grpo.rewards import JudgeReward, RewardSet
from sp_grpo.rewards.judge_server import JudgeServerError, ServerJudge, encode_png
from sp_grpo.rewards.vlm_judge import QwenVLJudge

SERVER = Path(__file__).with_name("fake_chat_server.py")
VLM_SERVER = Path(__file__).with_name("tiny_vlm_server.py")
ROOT = Path(__file__).resolve().parents[2]


class Server:
    """A chat server script in its own process; stopped (by its own pid) when the test ends."""

    def __init__(self, *args, script=SERVER):
        self.process = subprocess.Popen(
            [sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        line = self.process.stdout.readline()  # blocks until the server prints its port (or exits)
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"fake server did not start: {line!r} {self.process.stderr.read()[-2000:]}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}/v1"

    def stats(self):
        with urllib.request.urlopen(self.url.rsplit("/v1", 1)[0] + "/stats", timeout=5) as reply:
            return json.loads(reply.read())

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def serve():
    servers = []

    def start(*args, script=SERVER):
        servers.append(Server(*args, script=script))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def grey_videos(levels, frames=3, size=8):
    return torch.stack([torch.full((frames, 3, size, size), level) for level in levels])


def test_png_encoder_round_trips_through_a_real_decoder():
    from PIL import Image

    frame = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    decoded = Image.open(io.BytesIO(encode_png(frame)))
    assert decoded.size == (7, 5) and decoded.mode == "RGB"
    pixels = torch.frombuffer(bytearray(decoded.tobytes()), dtype=torch.uint8).view(5, 7, 3).permute(2, 0, 1)
    assert torch.equal(pixels, (frame * 255).round().to(torch.uint8))


def test_logprob_scores_are_p_yes_per_video_and_head(serve):
    server = serve("--mode", "brightness")
    judge = ServerJudge(server.url, "fake", {"VQ": "Good?", "TA": "Shows {prompt}?"}, num_frames=2, backoff=0.0)
    levels = [0.2, 0.8, 0.5]
    out = judge(grey_videos(levels), ["a", "b", "c"])
    assert judge.scoring == "logprobs"  # "auto" found logprobs
    # The server's P(Yes) is the brightness of the PNG frames it decoded: k/255 for grey level round(255 * level).
    expected = torch.tensor([round(255 * level) / 255 for level in levels])
    for head in ("VQ", "TA"):
        torch.testing.assert_close(out[head], expected, atol=1e-5, rtol=0)
    assert server.stats()["requests"] == 6


def test_without_logprobs_auto_switches_to_a_strict_rating(serve, caplog):
    server = serve("--mode", "rating")
    judge = ServerJudge(server.url, "fake", {"VQ": "Good?"}, rating_scale=5, backoff=0.0)
    out = judge(grey_videos([0.0, 0.3, 1.0]), ["a", "b", "c"])
    assert judge.scoring == "rating" and "returned no logprobs" in caplog.text
    # ratings 1 + round(b * 4) -> (r - 1) / 4
    torch.testing.assert_close(out["VQ"], torch.tensor([0.0, 0.25, 1.0]))


def test_requests_run_concurrently_up_to_the_limit(serve):
    # The server holds the first 3 requests until all 3 are in flight (a barrier, no sleeps), so reaching
    # the limit does not depend on timing; it counts a request out before answering it, so a client that
    # sends its next request on an answer is never counted twice: no more than 3 is exact too.
    server = serve("--mode", "brightness", "--gather", "3")
    judge = ServerJudge(server.url, "fake", {"VQ": "Good?", "MQ": "Smooth?"}, scoring="logprobs", max_concurrency=3)
    judge(grey_videos([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), list("abcdef"))
    stats = server.stats()
    assert not stats["gather_broken"]
    assert stats["requests"] == 12 and stats["max_in_flight"] == 3


def test_retries_with_backoff_then_succeeds(serve):
    server = serve("--mode", "flaky", "--failures", "2")
    judge = ServerJudge(server.url, "fake", {"VQ": "Good?"}, scoring="logprobs", retries=2, backoff=0.05)
    out = judge(grey_videos([0.6]), ["a"])
    assert server.stats()["requests"] == 3
    torch.testing.assert_close(out["VQ"], torch.tensor([153 / 255]))


def test_a_down_server_names_the_url_and_the_settings():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = ServerJudge(f"http://127.0.0.1:{port}/v1", "fake", {"VQ": "Good?"}, retries=1, backoff=0.01)
    with pytest.raises(JudgeServerError, match=rf"no answer from http://127.0.0.1:{port}/v1/chat/completions after 2 attempts.*`url`"):
        judge(grey_videos([0.5]), ["a"])


def test_a_slow_server_times_out_with_the_timeout_setting(serve):
    server = serve("--mode", "slow", "--delay", "3")
    judge = ServerJudge(server.url, "fake", {"VQ": "Good?"}, scoring="logprobs", timeout=0.5, retries=0)
    with pytest.raises(JudgeServerError, match=r"no answer from .* after 1 attempts .*`timeout` \(0.5 s\)"):
        judge(grey_videos([0.5]), ["a"])


def test_garbage_and_nonsense_raise_instead_of_scoring(serve):
    garbage = serve("--mode", "garbage")
    with pytest.raises(JudgeServerError, match=rf"{garbage.url}/chat/completions answered with something that is not JSON"):
        ServerJudge(garbage.url, "fake", {"VQ": "Good?"}, backoff=0.0)(grey_videos([0.5]), ["a"])
    nonsense = serve("--mode", "nonsense")
    with pytest.raises(JudgeServerError, match=r"no probability on a yes/no answer \(top tokens \['Well', 'Well', ','\]\)"):
        ServerJudge(nonsense.url, "fake", {"VQ": "Good?"}, scoring="logprobs")(grey_videos([0.5]), ["a"])
    with pytest.raises(JudgeServerError, match=r"answered 'Well, it depends.' where an integer from 1 to 10 was asked for"):
        ServerJudge(nonsense.url, "fake", {"VQ": "Good?"}, scoring="rating")(grey_videos([0.5]), ["a"])
    # Inside a RewardSet the error propagates: no NaN, no zero.
    rewards = RewardSet({"vq": JudgeReward(ServerJudge(nonsense.url, "fake", {"VQ": "Good?"}), "VQ", aspect="fidelity")})
    with pytest.raises(JudgeServerError):
        rewards(grey_videos([0.5]), ["a"])


def test_bad_settings_say_what_to_fix():
    with pytest.raises(ValueError, match="`scoring` \\('yes'\\) must be one of 'auto', 'logprobs', 'rating'"):
        ServerJudge("http://127.0.0.1:1/v1", "m", scoring="yes")
    with pytest.raises(ValueError, match="`rating_scale` \\(1\\) must be at least 2"):
        ServerJudge("http://127.0.0.1:1/v1", "m", rating_scale=1)
    with pytest.raises(ValueError, match="`url` \\('localhost:8000/v1'\\) must start with http:// or https://"):
        ServerJudge("localhost:8000/v1", "m")
    with pytest.raises(ValueError, match="`api_key_env` names 'SP_GRPO_NO_SUCH_KEY', which is not set"):
        ServerJudge("http://127.0.0.1:1/v1", "m", api_key_env="SP_GRPO_NO_SUCH_KEY")
    # An empty batch asks nothing (port 1 is closed, so any request would fail).
    empty = ServerJudge("http://127.0.0.1:1/v1", "m", scoring="auto")(torch.zeros(0, 3, 3, 8, 8), [])
    assert empty and all(value.shape == (0,) for value in empty.values())


def test_yes_and_no_count_in_every_spelling_the_server_returns(serve):
    # P(Yes) = brightness, split over " Yes" and "yes"; P(No) is " No": the judge sums the yes spellings.
    server = serve("--mode", "brightness", "--yes-spellings", " Yes,yes", "--no-spellings", " No")
    out = ServerJudge(server.url, "fake", {"VQ": "Good?"}, scoring="logprobs")(grey_videos([0.2, 0.7]), ["a", "b"])
    torch.testing.assert_close(out["VQ"], torch.tensor([51 / 255, 178 / 255]), atol=1e-5, rtol=0)


def test_served_tiny_qwen_matches_the_in_process_judge(serve, tiny_qwen_vl_dir):
    # A separate process loads the tiny Qwen2.5-VL folder and answers chat requests with the model's own
    # first-token logprobs (tiny_vlm_server.py). The random tiny model spreads its mass over its whole
    # ~50-token vocabulary, so top_logprobs=64 covers it (a trained judge puts nearly all mass on yes/no).
    # Tolerance 1e-5: fp32 on CPU, the in-process judge runs left-padded batches, the server one request each.
    server = serve("--model-dir", str(tiny_qwen_vl_dir), script=VLM_SERVER)
    videos = (torch.rand(4, 6, 3, 32, 32, generator=torch.Generator().manual_seed(9)) * 255).round() / 255  # PNG-exact
    prompts = ["a red ball", "a dog", "a blue cat", "a yellow dog video"]
    local = QwenVLJudge(str(tiny_qwen_vl_dir), num_frames=4, dtype="float32")(videos, prompts)
    remote = ServerJudge(server.url, "tiny", num_frames=4, max_side=None, top_logprobs=64, max_concurrency=2)(videos, prompts)
    for head in local:
        torch.testing.assert_close(remote[head], local[head], atol=1e-5, rtol=0)
        assert remote[head].argsort().tolist() == local[head].argsort().tolist()
        assert local[head].max() - local[head].min() > 1e-3  # the ranking compares scores that differ


def test_judges_with_equal_settings_send_each_request_once(serve):
    server = serve("--mode", "brightness")
    questions = {"VQ": "Good?", "MQ": "Smooth?", "TA": "Shows {prompt}?"}
    judges = [ServerJudge(server.url, "fake", questions, scoring="logprobs") for _ in range(3)]
    rewards = RewardSet({
        "vq": JudgeReward(judges[0], "VQ", aspect="fidelity"),
        "mq": JudgeReward(judges[1], "MQ", aspect="temporal"),
        "ta": JudgeReward(judges[2], "TA", aspect="semantic"),
    })
    out = rewards(grey_videos([0.2, 0.9]), ["a", "b"])
    assert server.stats()["requests"] == 2 * 3
    torch.testing.assert_close(out.per_reward["mq"], torch.tensor([51 / 255, 230 / 255]))
