"""RewardSet: named rewards evaluated together, shared backbones run once, per-aspect aggregates."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sp_grpo.functional.aspects import ASPECTS, aspect_means, standardize
from sp_grpo.rewards.backbones import SharedModel
from sp_grpo.rewards.base import VideoReward, check_videos

__all__ = ["RewardOutput", "RewardSet"]

log = logging.getLogger(__name__)

OnNonFinite = Literal["raise", "drop_group"]


@dataclass
class RewardOutput:
    """What :class:`RewardSet` returns for one batch.

    Attributes:
        per_reward: reward name -> ``(B,)`` raw scores, as the reward returned them.
        per_aspect: aspect -> ``(B,)`` aggregate, in curriculum order: the weighted mean of that
            aspect's rewards after optional normalization, with ``higher_is_better=False`` rewards
            negated, so that larger is always better.
        keep: ``(B,)`` bool, ``False`` for samples of groups dropped for non-finite rewards. Dropped
            samples carry 0 in ``per_reward`` and ``per_aspect``.
    """

    per_reward: dict[str, Tensor]
    per_aspect: dict[str, Tensor]
    keep: Tensor


class RewardSet(nn.Module):
    """Named rewards evaluated together on one batch.

    Every shared model (backbone or judge) used by the rewards memoizes its outputs for the duration
    of one call, so a backbone that several rewards use runs once per batch (give those rewards the
    same frame subsampling).

    Aggregation per aspect (:func:`~sp_grpo.functional.aspects.aspect_means`):

    .. math:: a_k = \\frac{\\sum_{i \\in k} w_i\\, \\sigma_i\\, \\tilde r_i}{\\sum_{i \\in k} w_i},\\qquad
        \\sigma_i = \\begin{cases}+1 & \\text{higher is better}\\\\ -1 & \\text{otherwise}\\end{cases}

    where :math:`\\tilde r_i = (r_i - \\mu_i) / \\sqrt{v_i + \\epsilon}` with running statistics when
    ``normalize`` is set (:func:`~sp_grpo.functional.aspects.standardize`; updated in training mode
    only, with the current batch included) and :math:`\\tilde r_i = r_i` otherwise. ``per_reward``
    always holds the raw scores, so a curriculum that reads absolute levels should not depend on
    normalized aggregates. Under several processes (``torch.distributed`` initialized) each batch's
    mean and variance are pooled over the kept samples of every rank before they enter the running
    statistics, so every rank standardizes identically; every rank must then call the set in
    training mode on each step, as a training step does.

    Args:
        rewards: name -> reward. Names become keys of the outputs and CSV columns.
        weights: name -> non-negative weight inside its aspect; missing names weigh 1.
        normalize: standardize each reward with running mean and variance before aggregating.
        momentum: update rate of the running statistics (exponential moving average).
        on_nonfinite: ``"raise"``: a NaN or inf score raises an error naming the reward;
            ``"drop_group"``: the samples' GRPO groups are dropped (``keep`` False) with a logged
            warning; needs ``group_size`` at call time.
        eps: added to the running variance.

    Raises:
        ValueError: On an empty reward mapping, unknown weight names, negative weights, an aspect
            whose weights sum to zero, ``momentum`` outside ``(0, 1]`` or an unknown ``on_nonfinite``.
        TypeError: If a value of ``rewards`` is not a :class:`~sp_grpo.rewards.VideoReward`.

    Example:
        >>> from sp_grpo.rewards.temporal import TemporalFlickering
        >>> from sp_grpo.rewards.fidelity import NoiseLevel
        >>> rewards = RewardSet({"flicker": TemporalFlickering(), "noise": NoiseLevel()})
        >>> out = rewards(torch.full((2, 3, 3, 8, 8), 0.5), ["a", "b"])
        >>> rewards.aspects, out.per_aspect["temporal"]
        (['fidelity', 'temporal'], tensor([1., 1.]))
    """

    def __init__(
        self,
        rewards: Mapping[str, VideoReward],
        weights: Mapping[str, float] | None = None,
        normalize: bool = False,
        momentum: float = 0.05,
        on_nonfinite: OnNonFinite = "raise",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if not rewards:
            raise ValueError("RewardSet: `rewards` is empty; give at least one named reward, e.g. {'flicker': TemporalFlickering()}.")
        for name, reward in rewards.items():
            if not isinstance(reward, VideoReward):
                raise TypeError(f"RewardSet: reward {name!r} is a {type(reward).__name__}, expected a VideoReward.")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(rewards))
        if unknown:
            raise ValueError(f"RewardSet: `weights` names unknown rewards {unknown}; known rewards are {sorted(rewards)}.")
        for name, weight in weights.items():
            if weight < 0:
                raise ValueError(f"RewardSet: weight of {name!r} ({weight}) must be non-negative.")
        if not 0 < momentum <= 1:
            raise ValueError(f"RewardSet: `momentum` ({momentum}) must be in (0, 1].")
        if on_nonfinite not in ("raise", "drop_group"):
            raise ValueError(f"RewardSet: `on_nonfinite` ({on_nonfinite!r}) must be one of 'raise', 'drop_group'.")
        self.rewards = nn.ModuleDict(dict(rewards))
        self.weights = {name: float(weights.get(name, 1.0)) for name in rewards}
        self.aspects: list[str] = [a for a in ASPECTS if any(r.aspect == a for r in rewards.values())]
        for aspect in self.aspects:
            if sum(w for n, w in self.weights.items() if rewards[n].aspect == aspect) <= 0:
                raise ValueError(f"RewardSet: the weights of aspect {aspect!r} sum to zero; give one of its rewards a positive weight.")
        self.normalize, self.momentum, self.on_nonfinite, self.eps = normalize, momentum, on_nonfinite, eps
        self.register_buffer("running_mean", torch.zeros(len(rewards)))
        self.register_buffer("running_var", torch.ones(len(rewards)))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._warn_unshared_subsampling()

    @property
    def graded_aspects(self) -> list[str]:
        """Aspects with at least one graded reward (see :attr:`VideoReward.graded`), in curriculum order."""
        return [a for a in self.aspects if any(r.graded and r.aspect == a for r in self.rewards.values())]

    @property
    def strictness(self) -> dict[str, float]:
        """Aspect -> strictness of its graded rewards (the largest, if they differ)."""
        return {
            a: max(r.strictness for r in self.rewards.values() if r.graded and r.aspect == a)
            for a in self.graded_aspects
        }

    def set_strictness(self, strictness: Mapping[str, float]) -> None:
        """Set the strictness of every graded reward of the given aspects.

        Args:
            strictness: Aspect -> strictness in ``[0, 1]``; aspects without a graded reward are ignored.

        Raises:
            ValueError: If an aspect is unknown or a value is outside ``[0, 1]``.
        """
        unknown = sorted(set(strictness) - set(ASPECTS))
        if unknown:
            raise ValueError(f"RewardSet.set_strictness: unknown aspects {unknown}; allowed: {list(ASPECTS)}.")
        for reward in self.rewards.values():
            if reward.graded and reward.aspect in strictness:
                reward.set_strictness(strictness[reward.aspect])

    def _shared_models(self) -> list[SharedModel]:
        return [m for m in self.modules() if isinstance(m, SharedModel)]

    def _warn_unshared_subsampling(self) -> None:
        for model in self._shared_models():
            users = {
                name: (r.num_frames, r.frame_stride)
                for name, r in self.rewards.items()
                if any(m is model for m in r.modules())
            }
            if len(set(users.values())) > 1:
                log.warning(
                    "RewardSet: rewards %s share %s but subsample frames differently (num_frames, frame_stride) = %s; "
                    "the model then runs once per distinct subsampling. Give them the same `num_frames`.",
                    sorted(users), type(model).__name__, users,
                )

    def forward(self, videos: Tensor, prompts: Sequence[str], group_size: int | None = None) -> RewardOutput:
        """Evaluate every reward on the batch and aggregate per aspect.

        Args:
            videos: ``(B, T, 3, H, W)`` float in ``[0, 1]``.
            prompts: ``B`` prompts.
            group_size: ``G`` for prompt-major GRPO groups; needed by ``on_nonfinite="drop_group"``.

        Returns:
            :class:`RewardOutput` with ``per_reward``, ``per_aspect`` and ``keep``.

        Raises:
            ValueError: On malformed inputs, a ``group_size`` that does not divide ``B``, or (with
                ``on_nonfinite="raise"``) a NaN or inf score; the message names the reward.
        """
        check_videos(videos, prompts, "RewardSet")
        batch = videos.shape[0]
        if group_size is not None and (group_size < 1 or batch % group_size != 0):
            raise ValueError(
                f"RewardSet: `group_size` ({group_size}) must be a positive divisor of the batch size ({batch}); "
                "batches are `num_prompts * group_size` samples, prompt-major."
            )
        if self.on_nonfinite == "drop_group" and group_size is None:
            raise ValueError(
                "RewardSet: on_nonfinite='drop_group' needs `group_size`; call `reward_set(videos, prompts, group_size=G)`."
            )
        keep = torch.ones(batch, dtype=torch.bool, device=videos.device)
        per_reward: dict[str, Tensor] = {}
        with ExitStack() as stack:
            for model in self._shared_models():
                stack.enter_context(model.caching())
            for name, reward in self.rewards.items():
                scores = reward(videos, prompts).to(videos.device)
                bad = ~torch.isfinite(scores)
                if bad.any():
                    keep &= ~self._handle_nonfinite(name, bad, prompts, group_size)
                per_reward[name] = scores
        per_reward = {name: torch.where(keep, s, torch.zeros_like(s)) for name, s in per_reward.items()}
        return RewardOutput(per_reward=per_reward, per_aspect=self._aggregate(per_reward, keep), keep=keep)

    def _handle_nonfinite(self, name: str, bad: Tensor, prompts: Sequence[str], group_size: int | None) -> Tensor:
        rows = bad.nonzero().flatten().tolist()
        if self.on_nonfinite == "raise":
            raise ValueError(
                f"RewardSet: reward {name!r} returned NaN or inf for samples {rows} (prompts {[prompts[i] for i in rows][:3]}); "
                "fix the reward or its inputs, or set `on_nonfinite='drop_group'` to drop those GRPO groups."
            )
        groups = sorted({i // group_size for i in rows})
        log.warning("RewardSet: reward %r returned NaN or inf for samples %s; dropping groups %s.", name, rows, groups)
        dropped = torch.zeros_like(bad)
        for g in groups:
            dropped[g * group_size : (g + 1) * group_size] = True
        return dropped

    def _aggregate(self, per_reward: dict[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
        scores = torch.stack([per_reward[name].float() for name in self.rewards])  # (R, B), fp32
        if self.normalize:
            if self.training:
                self._update_statistics(scores, keep)
            scores = standardize(scores, self.running_mean, self.running_var, self.eps)
        rewards = list(self.rewards.values())
        per_aspect = aspect_means(
            scores,
            [self.weights[name] for name in self.rewards],
            [r.higher_is_better for r in rewards],
            [r.aspect for r in rewards],
            self.aspects,
        )
        return {aspect: torch.where(keep, row, torch.zeros_like(row)) for aspect, row in zip(self.aspects, per_aspect)}

    @torch.no_grad()
    def _update_statistics(self, scores: Tensor, keep: Tensor) -> None:
        """Fold the kept samples of this batch, over every rank, into the running mean and variance."""
        if _world_size() > 1:
            batch = _global_moments(scores[:, keep])
        elif keep.any():
            kept = scores[:, keep]
            batch = kept.mean(dim=1), kept.var(dim=1, unbiased=False)
        else:
            batch = None
        if batch is None:
            return  # no sample kept on any rank
        mean, var = batch
        # Exponential moving average; the first batch initializes, so early scores are not shrunk to 0.
        if self.num_updates == 0:
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
        else:
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
        self.num_updates += 1


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _global_moments(kept: Tensor) -> tuple[Tensor, Tensor] | None:
    """Mean and population variance per reward of ``kept`` ``(R, N_rank)`` pooled over every rank.

    Every rank must call it (it runs two all-reduces), also one that kept no sample. Like a
    torchmetrics state reduced with ``sum``: counts and sums are summed over ranks, then the squared
    deviations from the global mean (two passes: a sum of squares minus the squared mean loses the
    small spread of rewards that sit far from 0 in fp32).

    Returns:
        ``(mean, var)``, each ``(R,)``, identical on every rank; ``None`` when no rank kept a sample.
    """
    totals = torch.cat([kept.new_tensor([kept.shape[1]]), kept.sum(dim=1)])
    dist.all_reduce(totals)
    count = totals[0]
    if count == 0:
        return None
    mean = totals[1:] / count
    squares = ((kept - mean[:, None]) ** 2).sum(dim=1)
    dist.all_reduce(squares)
    return mean, squares / count
