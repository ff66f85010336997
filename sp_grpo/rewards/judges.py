"""Adapters for learned video judges (VLM scorers) behind one small interface.

A judge maps videos and prompts to a few named scores per sample ("heads"): VideoAlign-style reward
models give ``VQ`` (visual quality), ``MQ`` (motion quality) and ``TA`` (text alignment); a chat VLM
asked "does this video show <prompt>?" gives one head, e.g. the probability of "yes". Wrap any such
model by subclassing :class:`VideoJudge` (implement :meth:`VideoJudge.judge`) or by handing a function
to :class:`CallableJudge`; read each head with :class:`~sp_grpo.rewards.semantic.JudgeReward`.
Inside a :class:`~sp_grpo.rewards.RewardSet` the judge runs once per batch however many heads are read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sp_grpo.rewards.backbones import SharedModel

__all__ = ["CallableJudge", "VideoJudge"]


class VideoJudge(SharedModel):
    """Base adapter: one call scores a batch on every head.

    Subclasses set :attr:`heads` and implement :meth:`judge`. Calling the judge memoizes the result
    per batch while a :class:`~sp_grpo.rewards.RewardSet` is evaluating.

    Attributes:
        heads: the names of the scores :meth:`judge` returns.
    """

    heads: tuple[str, ...] = ()

    def judge(self, videos: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """Score videos against prompts on every head.

        Args:
            videos: ``(B, T, 3, H, W)`` in ``[0, 1]``.
            prompts: ``B`` prompts.

        Returns:
            Head name -> ``(B,)`` scores, for every name in :attr:`heads`.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `judge(videos, prompts)`.")

    @torch.no_grad()
    def forward(self, videos: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Run :meth:`judge` (once per batch while caching) and check its heads.

        Args:
            videos: ``(B, T, 3, H, W)`` in ``[0, 1]``.
            prompts: ``B`` prompts.

        Returns:
            Head name -> ``(B,)`` float32 scores.

        Raises:
            RuntimeError: If a head is missing or has the wrong shape.
        """
        prompts = tuple(prompts)
        out = self.memoized("judge", (videos, prompts), lambda: self.judge(videos, list(prompts)))
        for head in self.heads:
            if head not in out or out[head].shape != (videos.shape[0],):
                got = tuple(out[head].shape) if head in out else "missing"
                raise RuntimeError(
                    f"{type(self).__name__}.judge must return a ({videos.shape[0]},) tensor for head {head!r}, got {got}."
                )
        return {head: out[head].float() for head in self.heads}


class CallableJudge(VideoJudge):
    """A judge from a plain function, e.g. a closure around a chat VLM's scoring call.

    Args:
        fn: ``fn(videos, prompts) -> {head: (B,) tensor}``.
        heads: the head names ``fn`` returns.

    Raises:
        ValueError: If ``heads`` is empty.
    """

    def __init__(self, fn: Callable[[Tensor, list[str]], dict[str, Tensor]], heads: Sequence[str]) -> None:
        super().__init__()
        if not heads:
            raise ValueError("CallableJudge: `heads` must name at least one score the function returns, e.g. ['TA'].")
        self.fn = fn
        self.heads = tuple(heads)

    def judge(self, videos: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        return self.fn(videos, prompts)
