"""A small OpenAI-compatible chat-completions server for the ServerJudge tests (standard library only).

Run as a separate process: ``python fake_chat_server.py --mode MODE`` prints ``PORT <n>`` once it
listens on 127.0.0.1. Modes:

* ``brightness``: answers with ``top_logprobs`` where P("Yes") is the mean brightness of the images;
* ``rating``: no logprobs; asked for a 1..N rating it replies the brightness as that integer;
* ``qwen``: runs the tiny Qwen2.5-VL from ``--model-dir`` on the decoded frames and returns the 20
  most likely first tokens with their log-softmax values, as vLLM does;
* ``garbage``: HTTP 200 with a body that is not JSON;
* ``nonsense``: valid JSON whose answer is neither yes nor no nor a rating;
* ``flaky``: the first ``--failures`` requests get HTTP 503, later ones behave like ``brightness``;
* ``slow``: sleeps ``--delay`` seconds, then behaves like ``brightness``.

``--fail-after N`` answers like ``nonsense`` from request ``N + 1`` on (a judge that breaks mid-run).

``GET /stats`` returns ``{"requests": n, "max_in_flight": m}``.
"""

import argparse
import base64
import io
import json
import math
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE = {"requests": 0, "in_flight": 0, "max_in_flight": 0}
LOCK = threading.Lock()


def decode_images(content):
    from PIL import Image  # a real PNG decoder: checks the client's hand-written encoder

    frames = []
    for part in content:
        if part.get("type") == "image_url":
            url = part["image_url"]["url"]
            assert url.startswith("data:image/png;base64,"), url[:40]
            frames.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    return frames


def brightness(frames):
    total = count = 0
    for frame in frames:
        data = frame.tobytes()
        total += sum(data)
        count += len(data)
    return total / count / 255


def chat_reply(content=None, top=None):
    first = None if top is None else {"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]}
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": first, "finish_reason": "stop"}],
    }


def yes_no_top(p):
    p = min(max(p, 1e-6), 1 - 1e-6)
    top = [{"token": "Yes", "logprob": math.log(p)}, {"token": "No", "logprob": math.log(1 - p)}, {"token": " the", "logprob": -30.0}]
    return sorted(top, key=lambda t: -t["logprob"])


class QwenScorer:
    def __init__(self, model_dir):
        import torch

        from sp_grpo.rewards.vlm_judge import load_frozen_vlm

        self.torch, self.vlm = torch, load_frozen_vlm(model_dir, "float32")
        self.lock = threading.Lock()

    def top_logprobs(self, frames, system, question, k=20):
        from sp_grpo.rewards.vlm_judge import QwenVLJudge

        torch = self.torch
        video = torch.stack([torch.frombuffer(bytearray(f.tobytes()), dtype=torch.uint8).view(f.height, f.width, 3) for f in frames])
        video = video.permute(0, 3, 1, 2).float() / 255
        judge = QwenVLJudge(self.vlm, {"q": question}, num_frames=len(frames), system=system, batch_size=1)
        captured = []
        with self.lock:
            handle = self.vlm.model.register_forward_hook(lambda module, args, out: captured.append(out.logits[0, -1]))
            try:
                judge(video[None], [""])
            finally:
                handle.remove()
        logprobs = captured[0].float().log_softmax(-1)
        values, ids = logprobs.topk(min(k, logprobs.numel()))
        tokens = self.vlm.tokenizer.convert_ids_to_tokens(ids.tolist())
        return [{"token": t, "logprob": float(v)} for t, v in zip(tokens, values)]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, status, body, content_type="application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.send(200, {"requests": STATE["requests"], "max_in_flight": STATE["max_in_flight"]})

    def do_POST(self):
        with LOCK:
            STATE["requests"] += 1
            STATE["in_flight"] += 1
            STATE["max_in_flight"] = max(STATE["max_in_flight"], STATE["in_flight"])
            number = STATE["requests"]
        try:
            self.answer(number)
        finally:
            with LOCK:
                STATE["in_flight"] -= 1

    def answer(self, number):
        args = self.server.args
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self.path.endswith("/chat/completions"):
            return self.send(404, {"error": f"no route {self.path}"})
        time.sleep(args.delay)
        mode = args.mode
        if args.fail_after is not None and number > args.fail_after:
            mode = "nonsense"
        if mode == "flaky":
            if number <= args.failures:
                return self.send(503, {"error": "warming up"})
            mode = "brightness"
        if mode == "slow":
            mode = "brightness"
        if mode == "garbage":
            return self.send(200, "<html>502 Bad Gateway</html>", "text/html")
        system = request["messages"][0]["content"]
        content = request["messages"][-1]["content"]
        question = next(part["text"] for part in content if part.get("type") == "text")
        frames = decode_images(content)
        if mode == "nonsense":
            return self.send(200, chat_reply("Well, it depends.", [{"token": "Well", "logprob": -0.1}, {"token": ",", "logprob": -3.0}]))
        if mode == "rating":
            scale = re.search(r"from 1 \(certainly no\) to (\d+)", question)
            if scale is None:  # asked for logprobs, which this server does not give
                return self.send(200, chat_reply("Yes"))
            n = int(scale.group(1))
            return self.send(200, chat_reply(str(1 + round(brightness(frames) * (n - 1)))))
        if mode == "qwen":
            top = self.server.scorer.top_logprobs(frames, system, question, k=request.get("top_logprobs", 20))
            return self.send(200, chat_reply(top[0]["token"], top))
        p = brightness(frames)
        return self.send(200, chat_reply("Yes" if p >= 0.5 else "No", yes_no_top(p)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--failures", type=int, default=2)
    parser.add_argument("--fail-after", type=int, default=None)
    parser.add_argument("--model-dir", default=None)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.args = args
    server.scorer = QwenScorer(args.model_dir) if args.mode == "qwen" else None
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
