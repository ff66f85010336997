"""A small OpenAI-compatible chat-completions server for the ServerJudge tests (standard library only).

Run as a separate process: ``python fake_chat_server.py --mode MODE`` prints ``PORT <n>`` once it
listens on 127.0.0.1. Modes:

* ``brightness``: answers with ``top_logprobs`` where P("Yes") is the mean brightness of the images,
  split evenly over the spellings ``--yes-spellings`` (and P("No") over ``--no-spellings``);
* ``rating``: no logprobs; asked for a 1..N rating it replies the brightness as that integer;
* ``garbage``: HTTP 200 with a body that is not JSON;
* ``nonsense``: valid JSON whose answer is neither yes nor no nor a rating;
* ``flaky``: the first ``--failures`` requests get HTTP 503, later ones behave like ``brightness``;
* ``slow``: sleeps ``--delay`` seconds, then behaves like ``brightness``.

``--fail-after N`` answers like ``nonsense`` from request ``N + 1`` on (a judge that breaks mid-run).

``--gather N`` holds the first ``N`` requests until all ``N`` are in flight at once (a barrier, so a
client that keeps ``N`` requests in flight is seen doing so however slow the machine is). A request
counts as in flight from its arrival until just before its answer is written: the client cannot send
its next request before the count went down, so the count never exceeds the client's concurrency.

``GET /stats`` returns ``{"requests": n, "max_in_flight": m, "gather_broken": bool}``.

The tiny Qwen2.5-VL served with real logprobs is ``tiny_vlm_server.py``.
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

STATE = {"requests": 0, "in_flight": 0, "max_in_flight": 0, "gather_broken": False}
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


def yes_no_top(p, yes_spellings=("Yes",), no_spellings=("No",)):
    p = min(max(p, 1e-6), 1 - 1e-6)
    top = [{"token": t, "logprob": math.log(p / len(yes_spellings))} for t in yes_spellings]
    top += [{"token": t, "logprob": math.log((1 - p) / len(no_spellings))} for t in no_spellings]
    top.append({"token": " the", "logprob": -30.0})
    return sorted(top, key=lambda t: -t["logprob"])


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
        self.send(200, {key: STATE[key] for key in ("requests", "max_in_flight", "gather_broken")})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with LOCK:
            STATE["requests"] += 1
            STATE["in_flight"] += 1
            STATE["max_in_flight"] = max(STATE["max_in_flight"], STATE["in_flight"])
            number = STATE["requests"]
        try:
            if number <= self.server.args.gather:
                try:  # the timeout only keeps a client that never sends N at once from hanging the test
                    self.server.gather.wait(timeout=60)
                except threading.BrokenBarrierError:
                    STATE["gather_broken"] = True
            reply = self.answer(request, number)
        finally:
            with LOCK:
                STATE["in_flight"] -= 1  # before answering: the client's next request comes after this
        self.send(*reply)

    def answer(self, request, number):
        """``(status, body[, content type])`` of the reply."""
        args = self.server.args
        if not self.path.endswith("/chat/completions"):
            return 404, {"error": f"no route {self.path}"}
        time.sleep(args.delay)
        mode = args.mode
        if args.fail_after is not None and number > args.fail_after:
            mode = "nonsense"
        if mode == "flaky":
            if number <= args.failures:
                return 503, {"error": "warming up"}
            mode = "brightness"
        if mode == "slow":
            mode = "brightness"
        if mode == "garbage":
            return 200, "<html>502 Bad Gateway</html>", "text/html"
        content = request["messages"][-1]["content"]
        question = next(part["text"] for part in content if part.get("type") == "text")
        frames = decode_images(content)
        if mode == "nonsense":
            return 200, chat_reply("Well, it depends.", [{"token": "Well", "logprob": -0.1}, {"token": ",", "logprob": -3.0}])
        if mode == "rating":
            scale = re.search(r"from 1 \(certainly no\) to (\d+)", question)
            if scale is None:  # asked for logprobs, which this server does not give
                return 200, chat_reply("Yes")
            n = int(scale.group(1))
            return 200, chat_reply(str(1 + round(brightness(frames) * (n - 1))))
        p = brightness(frames)
        top = yes_no_top(p, args.yes_spellings.split(","), args.no_spellings.split(","))
        return 200, chat_reply(top[0]["token"], top)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--failures", type=int, default=2)
    parser.add_argument("--fail-after", type=int, default=None)
    parser.add_argument("--gather", type=int, default=0)
    parser.add_argument("--yes-spellings", default="Yes", help="comma-separated, e.g. ' Yes,yes'")
    parser.add_argument("--no-spellings", default="No")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.args = args
    server.gather = threading.Barrier(max(args.gather, 1))
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
