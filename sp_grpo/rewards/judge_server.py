"""A video judge served over HTTP by an OpenAI-compatible chat server (vLLM, SGLang, ``transformers serve``).

Large judges (Qwen2.5-VL 72B) do not fit beside the policy; they run behind a chat-completions
endpoint and every training rank calls it for its own samples (nothing is gathered across ranks).
Each (video, question) pair is one request: the sampled frames as base64 PNG images, then the
question. The score is, in order of preference:

* ``"logprobs"``: P("Yes") from the first answer token's ``top_logprobs``, summed over the spellings of
  yes and of no (:func:`~sp_grpo.functional.judges.answer_spellings`, shared with the in-process judge)
  and renormalized over the two (the quantity :class:`~sp_grpo.rewards.vlm_judge.QwenVLJudge` computes in
  process; but a chat server sees the frames as separate images, not as one video, so its scores
  differ from the in-process judge's on the same model);
* ``"rating"``: the question asks for one integer from 1 (no) to ``rating_scale`` (yes) and the reply
  must be exactly that integer; the score is :math:`(r - 1) / (N - 1)`.

``"auto"`` asks for logprobs and switches to ``"rating"`` (once, with a warning) when the server
returns none; each process decides on its own, so under several processes set the mode explicitly.
Requests run ``max_concurrency`` at a time with a ``timeout`` each; connection errors,
timeouts, HTTP 429 and 5xx are retried ``retries`` times with exponential backoff. A server that stays
down, or answers something that is not a valid score, raises :class:`JudgeServerError` naming the URL
and the setting to check; it never yields a silent 0 or NaN reward.

Judges with equal settings share their per-batch memo, so a YAML config that gives each
:class:`~sp_grpo.rewards.JudgeReward` its own ``ServerJudge`` block sends each request once.

Only the standard library is used for HTTP (``urllib``, ``concurrent.futures``) and PNG encoding
(``zlib``), so the judge adds no dependency.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import math
import os
import re
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from sp_grpo.functional.judges import answer_spellings, yes_probability
from sp_grpo.rewards.backbones import SharedModel
from sp_grpo.rewards.base import evenly_spaced_frames
from sp_grpo.rewards.judges import VideoJudge
from sp_grpo.rewards.vlm_judge import DEFAULT_QUESTIONS

__all__ = ["JudgeServerError", "ServerJudge", "encode_png"]

log = logging.getLogger(__name__)

Scoring = Literal["auto", "logprobs", "rating"]
_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class JudgeServerError(RuntimeError):
    """The judge server could not be reached or gave an answer that is not a score."""


# Judges with equal settings share one memo, so three YAML blocks for three heads send each request once.
_MEMOS: weakref.WeakValueDictionary[str, SharedModel] = weakref.WeakValueDictionary()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(frame: Tensor) -> bytes:
    """Encode one RGB frame as an 8-bit PNG (no filtering; zlib level 6).

    Written with ``zlib`` so the judge needs no imaging library; the file decodes with any PNG reader.

    Args:
        frame: ``(3, H, W)`` in ``[0, 1]``.

    Returns:
        The PNG file's bytes.
    """
    pixels = (frame.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().cpu()
    height, width = pixels.shape[:2]
    rows = pixels.view(height, width * 3)
    raw = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), rows], dim=1).numpy().tobytes()  # filter 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    chunks = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw, 6)) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


class ServerJudge(VideoJudge):
    """Ask an OpenAI-compatible chat server one yes/no question per head about each video.

    Args:
        url: the server's base URL (``http://host:8000/v1``) or the full ``.../chat/completions`` URL.
        model: the served model name sent in each request (e.g. ``Qwen/Qwen2.5-VL-72B-Instruct``).
        questions: head -> question; ``{prompt}`` is replaced by the sample's prompt. ``None`` uses
            :data:`~sp_grpo.rewards.vlm_judge.DEFAULT_QUESTIONS` (``VQ``, ``MQ``, ``TA``).
        scoring: ``"auto"``, ``"logprobs"`` or ``"rating"`` (see the module docstring).
        num_frames: frames sent per video, evenly spaced, first and last included.
        max_side: frames are downscaled so their longer side is at most this many pixels (smaller
            requests); ``None`` sends them as they are.
        system: the system message.
        yes_tokens: words meaning yes; a ``top_logprobs`` token counts when it is one of their spellings
            (``"Yes"``, ``" Yes"``, ``"yes"``, ``" yes"``), as in :class:`~sp_grpo.rewards.vlm_judge.QwenVLJudge`.
        no_tokens: words meaning no.
        top_logprobs: how many alternatives to ask for (vLLM allows up to 20).
        rating_scale: ``N`` of the 1..N rating.
        max_concurrency: requests in flight at once (per process; under DDP, per rank).
        timeout: seconds to wait for one answer.
        retries: extra attempts after a connection error, timeout, HTTP 429 or 5xx.
        backoff: seconds before the first retry; doubled each time.
        api_key_env: name of an environment variable holding a bearer token, or ``None``.

    Raises:
        ValueError: On an empty question mapping, an unknown ``scoring``, or non-positive sizes.
    """

    def __init__(
        self,
        url: str,
        model: str,
        questions: Mapping[str, str] | None = None,
        *,
        scoring: Scoring = "auto",
        num_frames: int = 8,
        max_side: int | None = 448,
        system: str = "You are a helpful assistant.",
        yes_tokens: Sequence[str] = ("Yes",),
        no_tokens: Sequence[str] = ("No",),
        top_logprobs: int = 20,
        rating_scale: int = 10,
        max_concurrency: int = 8,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        api_key_env: str | None = None,
    ) -> None:
        super().__init__()
        questions = dict(DEFAULT_QUESTIONS if questions is None else questions)
        if not questions:
            raise ValueError(
                "ServerJudge: `questions` is empty; give head -> question, e.g. {'TA': 'Does this video show \"{prompt}\"?'}."
            )
        if scoring not in ("auto", "logprobs", "rating"):
            raise ValueError(f"ServerJudge: `scoring` ({scoring!r}) must be one of 'auto', 'logprobs', 'rating'.")
        counts = {"num_frames": num_frames, "top_logprobs": top_logprobs, "max_concurrency": max_concurrency}
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"ServerJudge: `{name}` ({value}) must be a positive integer.")
        if rating_scale < 2:
            raise ValueError(f"ServerJudge: `rating_scale` ({rating_scale}) must be at least 2.")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(
                f"ServerJudge: `timeout` ({timeout}) must be positive, `retries` ({retries}) and `backoff` ({backoff}) "
                "non-negative."
            )
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"ServerJudge: `url` ({url!r}) must start with http:// or https://, e.g. http://127.0.0.1:8000/v1.")
        if api_key_env and not os.environ.get(api_key_env):
            raise ValueError(
                f"ServerJudge: `api_key_env` names {api_key_env!r}, which is not set; export it or set `api_key_env: null`."
            )
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.questions, self.heads = model, questions, tuple(questions)
        self.scoring: Scoring = scoring
        self.num_frames, self.max_side, self.system = num_frames, max_side, system
        self.yes, self.no = set(answer_spellings(yes_tokens)), set(answer_spellings(no_tokens))
        if both := self.yes & self.no:
            raise ValueError(
                f"ServerJudge: {sorted(both)} spell both a yes_tokens and a no_tokens word; keep the two lists apart."
            )
        self.top_logprobs, self.rating_scale = top_logprobs, rating_scale
        self.max_concurrency, self.timeout, self.retries, self.backoff = max_concurrency, timeout, retries, backoff
        self.api_key_env = api_key_env
        key = repr((self.url, model, sorted(questions.items()), scoring, num_frames, max_side, system, sorted(self.yes),
                    sorted(self.no), top_logprobs, rating_scale))
        self.memo = _MEMOS.get(key)
        if self.memo is None:
            self.memo = _MEMOS[key] = SharedModel()

    def frame_indices(self, total: int) -> list[int]:
        """Evenly spaced frame indices out of ``total``, first and last included."""
        return evenly_spaced_frames(total, self.num_frames)

    def encode_video(self, video: Tensor) -> list[str]:
        """The frames sent for one ``(T, 3, H, W)`` video, as ``data:image/png;base64,...`` URLs."""
        frames = video[self.frame_indices(video.shape[0])].float()
        height, width = frames.shape[-2:]
        if self.max_side is not None and max(height, width) > self.max_side:
            scale = self.max_side / max(height, width)
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            frames = F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)
        return ["data:image/png;base64," + base64.b64encode(encode_png(f)).decode("ascii") for f in frames]

    def judge(self, videos: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        return self.memo.memoized("judge", (videos, tuple(prompts)), lambda: self._ask(videos, prompts))

    def _ask(self, videos: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        if len(prompts) == 0:
            return {head: torch.zeros(0) for head in self.heads}
        images = [self.encode_video(video) for video in videos]
        pairs = [(b, head) for b in range(len(prompts)) for head in self.heads]  # video-major
        if self.scoring == "auto":
            # Ask once: whether the server returns logprobs decides the mode for every later request.
            b, head = pairs[0]
            first = [self._score_auto(images[b], self.questions[head].replace("{prompt}", prompts[b]))]
            pairs = pairs[1:]
        else:
            first = []

        def score(pair: tuple[int, str]) -> float:
            b, head = pair
            return self._score(images[b], self.questions[head].replace("{prompt}", prompts[b]), self.scoring)

        pool = ThreadPoolExecutor(max_workers=self.max_concurrency)
        try:
            scores = first + list(pool.map(score, pairs))
        except BaseException:
            # Report the first failure now, not after every queued request has spent its retries.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        table = torch.tensor(scores, dtype=torch.float32).view(len(prompts), len(self.heads))
        return dict(zip(self.heads, table.unbind(1)))

    def _score_auto(self, images: list[str], question: str) -> float:
        answer = self._post(self._request(images, question, "logprobs"))
        if _first_token_logprobs(answer) is not None:
            self.scoring = "logprobs"
            return self._logprob_score(answer)
        log.warning(
            "ServerJudge: %s returned no logprobs; scoring with a 1-%d rating instead (set `scoring='rating'` to skip "
            "this check).", self.url, self.rating_scale,
        )
        self.scoring = "rating"
        return self._score(images, question, "rating")

    def _score(self, images: list[str], question: str, scoring: str) -> float:
        answer = self._post(self._request(images, question, scoring))
        return self._logprob_score(answer) if scoring == "logprobs" else self._rating_score(answer)

    def _request(self, images: list[str], question: str, scoring: str) -> dict[str, Any]:
        if scoring == "rating":
            question = (
                f"{question} Reply with one integer from 1 (certainly no) to {self.rating_scale} (certainly yes) "
                "and nothing else."
            )
        content = [{"type": "image_url", "image_url": {"url": url}} for url in images]
        content.append({"type": "text", "text": question})
        request: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "system", "content": self.system}, {"role": "user", "content": content}],
            "temperature": 0.0,
            "max_tokens": 1 if scoring == "logprobs" else 4,
        }
        if scoring == "logprobs":
            request.update(logprobs=True, top_logprobs=self.top_logprobs)
        return request

    def _post(self, request: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.api_key_env, '')}"
        body = json.dumps(request).encode()
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                http_request = urllib.request.Request(self.url, body, headers)
                with urllib.request.urlopen(http_request, timeout=self.timeout) as reply:
                    text = reply.read().decode("utf-8", errors="replace")
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", errors="replace")[:300]
                if err.code not in _RETRYABLE_STATUS:
                    raise JudgeServerError(
                        f"ServerJudge: {self.url} answered HTTP {err.code}: {detail!r}; check `model` ({self.model!r}) "
                        "and that the server accepts images in chat requests."
                    ) from err
                failure = f"HTTP {err.code}: {detail!r}"
                continue
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError, OSError) as err:
                reason = getattr(err, "reason", err)
                failure = f"{type(reason).__name__}: {reason}"
                continue
            try:
                return json.loads(text)
            except json.JSONDecodeError as err:
                raise JudgeServerError(
                    f"ServerJudge: {self.url} answered with something that is not JSON ({text[:200]!r}); "
                    "check `url`: it must be an OpenAI-compatible chat-completions endpoint."
                ) from err
        raise JudgeServerError(
            f"ServerJudge: no answer from {self.url} after {self.retries + 1} attempts (last: {failure}); check that the "
            f"server is running and `url` is right, or raise `timeout` ({self.timeout} s) / `retries` ({self.retries})."
        )

    def _logprob_score(self, answer: dict[str, Any]) -> float:
        candidates = _first_token_logprobs(answer)
        if candidates is None:
            raise JudgeServerError(
                f"ServerJudge: {self.url} returned no logprobs for the first answer token; set `scoring` to 'rating' "
                "(or 'auto') for servers without logprobs."
            )
        logprobs: dict[str, float] = {}
        for item in candidates:
            token, logprob = str(item.get("token", "")), item.get("logprob")
            if isinstance(logprob, (int, float)) and math.isfinite(logprob) and (token in self.yes or token in self.no):
                logprobs.setdefault(token, float(logprob))  # the chosen token repeats in top_logprobs: count it once
        if not logprobs:
            tokens = [item.get("token") for item in candidates][:10]
            raise JudgeServerError(
                f"ServerJudge: {self.url} put no probability on a yes/no answer (top tokens {tokens}); the judge did not "
                "answer the question. Check `questions`, `yes_tokens`/`no_tokens` and `model`."
            )
        tokens = list(logprobs)
        yes_at = [i for i, token in enumerate(tokens) if token in self.yes]
        no_at = [i for i, token in enumerate(tokens) if token in self.no]
        return float(yes_probability(torch.tensor([list(logprobs.values())]), yes_at, no_at))

    def _rating_score(self, answer: dict[str, Any]) -> float:
        text = _first_message(answer)
        match = re.fullmatch(r"\s*(\d+)\s*\.?\s*", text or "")
        rating = int(match.group(1)) if match else None
        if rating is None or not 1 <= rating <= self.rating_scale:
            raise JudgeServerError(
                f"ServerJudge: {self.url} answered {text!r} where an integer from 1 to {self.rating_scale} was asked for "
                "(`scoring='rating'`); use a model that follows the format, or a server that returns logprobs."
            )
        return (rating - 1) / (self.rating_scale - 1)


def _first_message(answer: Any) -> str | None:
    try:
        content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _first_token_logprobs(answer: Any) -> list[dict[str, Any]] | None:
    """``choices[0].logprobs.content[0].top_logprobs`` (plus the chosen token), or ``None``."""
    try:
        first = answer["choices"][0]["logprobs"]["content"][0]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(first, dict):
        return None
    top = first.get("top_logprobs") or []
    chosen = [{"token": first.get("token"), "logprob": first.get("logprob")}] if "token" in first else []
    return [item for item in chosen + list(top) if isinstance(item, dict)] or None
