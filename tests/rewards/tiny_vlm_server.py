"""An OpenAI-compatible chat server that runs a local Qwen2.5-VL / Qwen2-VL folder, for the ServerJudge tests.

``python tiny_vlm_server.py --model-dir DIR`` loads the folder (``local_files_only``), listens on
127.0.0.1 and prints ``PORT <n>``. ``POST /v1/chat/completions`` takes a system message and a user
message made of ``image_url`` parts (base64 PNG) and one ``text`` part, and answers the first token
greedily. With ``"logprobs": true`` it returns that token and the ``top_logprobs`` most likely first
tokens with their log-softmax over the whole vocabulary, each decoded to text, as vLLM does.

The images of one message are read as the frames of one video (resized within the folder's video
processor limits, grouped two frames per temporal patch): the convention under which a served judge
sees what :class:`~sp_grpo.rewards.vlm_judge.QwenVLJudge` sees. vLLM reads such a message as separate
images instead, so its scores differ from the in-process judge's.

transformers' own ``transformers serve`` is not used: in transformers 5.24 it needs FastAPI and
Uvicorn (not installed), its chat endpoint drops ``logprobs`` and ``top_logprobs`` as unsupported
fields (so it cannot give the probabilities the judge scores with), and its Qwen video processor
needs torchvision. This server writes the chat prompt and reads the model's logits itself, apart
from the judge's code; only the frame resizing and patch layout come from
:mod:`sp_grpo.functional.judges`, whose functions the tests check against transformers' processor.
"""

import argparse
import base64
import inspect
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch


class TinyVLM:
    """The model, its tokenizer and video settings; one forward pass at a time."""

    def __init__(self, model_dir, fps):
        import transformers

        folder = Path(model_dir)
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        cls = {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
               "qwen2_vl": transformers.Qwen2VLForConditionalGeneration}[config.model_type]
        self.model = cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        video = json.loads((folder / "video_preprocessor_config.json").read_text())
        self.limits = (video["size"]["shortest_edge"], video["size"]["longest_edge"])
        self.mean, self.std = video["image_mean"], video["image_std"]
        vision = config.vision_config
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        self.fps = fps
        self.takes = set(inspect.signature(self.model.forward).parameters)
        self.lock = threading.Lock()

    def first_token(self, system, frames, question, k):
        """The top ``k`` first answer tokens as ``[{"token", "logprob"}]``, most likely first."""
        from sp_grpo.functional.judges import patchify_video, resize_for_patches

        video = torch.stack(frames)
        factor = self.patch * self.merge
        pixels = resize_for_patches(video, factor, *self.limits, self.mean, self.std)
        patches, grid = patchify_video(pixels, self.patch, self.merge, self.temporal)
        pads = "<|video_pad|>" * (grid[0] * grid[1] * grid[2] // self.merge**2)
        prompt = (  # Qwen's chat template for a system message and a user turn of one video and a text
            f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|>{pads}<|vision_end|>"
            f"{question}<|im_end|>\n<|im_start|>assistant\n"
        )
        input_ids = torch.tensor([self.tokenizer.encode(prompt, add_special_tokens=False)])
        inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values_videos=patches,
                      video_grid_thw=torch.tensor([grid]))
        if "second_per_grid_ts" in self.takes:
            inputs["second_per_grid_ts"] = torch.tensor([self.temporal / self.fps])
        if "mm_token_type_ids" in self.takes:
            video_id = self.tokenizer.convert_tokens_to_ids("<|video_pad|>")
            inputs["mm_token_type_ids"] = (input_ids == video_id).int() * 2
        with self.lock, torch.no_grad():
            logits = self.model(**inputs).logits[0, -1]
        values, ids = logits.float().log_softmax(-1).topk(min(k, logits.numel()))
        return [{"token": self.tokenizer.decode([i]), "logprob": float(v)} for i, v in zip(ids.tolist(), values)]


def decode_frame(url):
    from PIL import Image

    if not url.startswith("data:image/png;base64,"):
        raise ValueError(f"expected a base64 PNG data URL, got {url[:40]!r}")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
    return pixels.permute(2, 0, 1).float() / 255


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self.path.endswith("/chat/completions"):
            return self.send(404, {"error": {"message": f"no route {self.path}"}})
        messages = request["messages"]
        system = next((m["content"] for m in messages if m["role"] == "system"), "You are a helpful assistant.")
        content = messages[-1]["content"]
        try:
            frames = [decode_frame(part["image_url"]["url"]) for part in content if part["type"] == "image_url"]
            question = "".join(part["text"] for part in content if part["type"] == "text")
            top = self.server.vlm.first_token(system, frames, question, int(request.get("top_logprobs") or 1))
        except (KeyError, ValueError, RuntimeError) as err:
            return self.send(400, {"error": {"message": f"{type(err).__name__}: {err}"}})
        chosen = top[0]
        logprobs = {"content": [{**chosen, "top_logprobs": top}]} if request.get("logprobs") else None
        message = {"role": "assistant", "content": chosen["token"]}
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": "length"}
        self.send(200, {"id": "chatcmpl-tiny", "object": "chat.completion", "model": request.get("model"), "choices": [choice]})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--fps", type=float, default=2.0, help="frame rate assumed for the frames of a message")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.vlm = TinyVLM(args.model_dir, args.fps)
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
