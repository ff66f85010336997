"""Difficulty-aware prompts: spend rollouts where groups still have reward spread.

A group whose rewards are all equal has zero group-relative advantage and teaches nothing. That
happens for prompts the generator has mastered (all samples good) and for prompts it cannot yet do
(all samples bad). :class:`PromptDifficulty` keeps, per prompt, an EMA of how informative its groups
were; :class:`DifficultyAwareSampler` draws prompts in proportion to it, with a floor so that no
prompt is dropped for good (a hopeless prompt may become learnable later).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Sampler

from sp_grpo.functional.curriculum import group_informativeness, group_means


class PromptDifficulty:
    """Per-prompt record of how much each prompt's groups teach.

    For each prompt ``p`` the tracker keeps an EMA of its group informativeness
    (:func:`~sp_grpo.functional.curriculum.group_informativeness`) and of its group mean, and turns
    the first into a sampling weight:

    .. math:: I_p \\leftarrow \\beta I_p + (1 - \\beta) i_p, \\qquad w_p = w_{\\min} + (1 - w_{\\min}) I_p

    Prompts never seen have weight 1, so new prompts are tried first.

    Args:
        decay: EMA factor :math:`\\beta` in ``[0, 1)`` for each prompt's statistics.
        min_weight: Weight :math:`w_{\\min}` in ``(0, 1]`` of a prompt whose groups are always flat;
            1 disables down-weighting.

    Raises:
        ValueError: If a setting is out of range.

    Example:
        >>> tracker = PromptDifficulty(decay=0.0, min_weight=0.1)
        >>> tracker.update(["a", "a", "b", "b"], torch.tensor([0.0, 1.0, 1.0, 1.0]), group_size=2)
        >>> tracker.weights_for(["a", "b", "c"]).tolist()
        [1.0, 0.10000000149011612, 1.0]
    """

    def __init__(self, decay: float = 0.5, min_weight: float = 0.1) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"`decay` ({decay}) must be in [0, 1): it is the per-prompt EMA factor.")
        if not 0.0 < min_weight <= 1.0:
            raise ValueError(
                f"`min_weight` ({min_weight}) must be in (0, 1]: a zero weight would never retry a prompt; "
                "use 1.0 to switch down-weighting off."
            )
        self.decay = decay
        self.min_weight = min_weight
        self.informativeness: dict[str, float] = {}
        self.mean_reward: dict[str, float] = {}
        self.groups_seen: dict[str, int] = {}

    def update(self, prompts: Sequence[str], rewards: Tensor, group_size: int) -> None:
        """Fold one batch of groups into the per-prompt statistics.

        Args:
            prompts: One prompt per sample, length ``P*G``, prompt-major (the group's prompt repeated).
            rewards: The reward the policy optimises (e.g. the curriculum-weighted sum), shape ``(P*G,)``.
            group_size: Samples per prompt ``G``.

        Raises:
            ValueError: If lengths disagree.
        """
        if len(prompts) != rewards.shape[-1]:
            raise ValueError(
                f"`prompts` has {len(prompts)} entries but `rewards` has {rewards.shape[-1]}: pass one prompt "
                "per sample, prompt-major."
            )
        info = group_informativeness(rewards, group_size).tolist()
        means = group_means(rewards, group_size).tolist()
        for p, (i, m) in enumerate(zip(info, means)):
            prompt = prompts[p * group_size]
            if prompt in self.informativeness:
                self.informativeness[prompt] = self.decay * self.informativeness[prompt] + (1 - self.decay) * i
                self.mean_reward[prompt] = self.decay * self.mean_reward[prompt] + (1 - self.decay) * m
            else:
                self.informativeness[prompt], self.mean_reward[prompt] = i, m
            self.groups_seen[prompt] = self.groups_seen.get(prompt, 0) + 1

    def weights_for(self, prompts: Sequence[str]) -> Tensor:
        """Sampling weights for ``prompts``; unseen prompts get 1.

        Args:
            prompts: Prompts to weigh.

        Returns:
            Weights in ``[min_weight, 1]``, shape ``(len(prompts),)``, fp32.
        """
        info = torch.tensor([self.informativeness.get(p, 1.0) for p in prompts], dtype=torch.float32)
        return self.min_weight + (1.0 - self.min_weight) * info

    def status(self, prompt: str, flat_below: float = 0.2) -> str:
        """Classify a prompt for inspection: ``"unseen"``, ``"learning"``, ``"mastered"`` or ``"hopeless"``.

        A prompt with informativeness below ``flat_below`` is mastered if its mean reward is at
        least the mean over all tracked prompts, hopeless otherwise.

        Args:
            prompt: The prompt.
            flat_below: Informativeness under which groups count as flat.

        Returns:
            The status.
        """
        if prompt not in self.informativeness:
            return "unseen"
        if self.informativeness[prompt] >= flat_below:
            return "learning"
        overall = sum(self.mean_reward.values()) / len(self.mean_reward)
        return "mastered" if self.mean_reward[prompt] >= overall else "hopeless"

    def state_dict(self) -> dict:
        """The per-prompt statistics, for checkpoints."""
        return {
            "informativeness": dict(self.informativeness),
            "mean_reward": dict(self.mean_reward),
            "groups_seen": dict(self.groups_seen),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore statistics written by :meth:`state_dict`.

        Args:
            state: The saved statistics.
        """
        self.informativeness = dict(state["informativeness"])
        self.mean_reward = dict(state["mean_reward"])
        self.groups_seen = dict(state["groups_seen"])


class DifficultyAwareSampler(Sampler[int]):
    """Draw prompt indices with probability proportional to :meth:`PromptDifficulty.weights_for`.

    Weights are re-read at every ``__iter__`` (every epoch), so the draw follows training. Every
    rank draws the same sequence from ``seed + epoch`` and keeps its own slice, so the tracker must be
    identical on all ranks (:class:`~sp_grpo.callbacks.SelfPacedCurriculum` gathers prompts across
    ranks for this).

    Args:
        prompts: The prompt pool; index ``i`` is ``prompts[i]``.
        tracker: Statistics that set the weights.
        num_samples: Indices drawn per epoch across all ranks (with replacement).
        seed: Base seed of the draw.
        rank: This process's rank.
        world_size: Number of processes; each rank yields ``num_samples // world_size`` indices.

    Raises:
        ValueError: If the pool is empty or ranks/sizes are inconsistent.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        tracker: PromptDifficulty,
        num_samples: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(prompts) == 0:
            raise ValueError("`prompts` is empty: the sampler needs at least one prompt to draw.")
        if num_samples < world_size:
            raise ValueError(
                f"`num_samples` ({num_samples}) must be at least `world_size` ({world_size}): every rank draws one or more."
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"`rank` ({rank}) must be in [0, {world_size}) for `world_size` {world_size}.")
        self.prompts = list(prompts)
        self.tracker = tracker
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the next draw (Lightning calls this on samplers that have it)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        weights = self.tracker.weights_for(self.prompts).double()
        drawn = torch.multinomial(weights, len(self) * self.world_size, replacement=True, generator=generator)
        return iter(drawn[self.rank :: self.world_size].tolist())
