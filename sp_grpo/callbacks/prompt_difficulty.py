"""``PromptDifficulty``: spend rollouts where groups still have reward spread.

A group whose rewards are all equal has zero group-relative advantage and teaches nothing. That
happens for prompts the generator has mastered (all samples good) and for prompts it cannot yet do
(all samples bad). :class:`PromptDifficulty` keeps, per prompt, an EMA of how informative its groups
were, and gives :class:`~sp_grpo.data.PromptDataModule` (with ``difficulty_sampling``) weights to
draw prompts by, with a floor so that no prompt is dropped for good (a hopeless prompt may become
learnable later).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from sp_grpo.callbacks.base import check_aspects, gather_step, read_step_outputs
from sp_grpo.data.prompts import PromptDataModule
from sp_grpo.functional.curriculum import group_informativeness, group_means

__all__ = ["PromptDifficulty"]


class PromptDifficulty(Callback):
    """Per-prompt record of how much each prompt's groups teach; the weights of difficulty-aware sampling.

    For each prompt ``p`` the tracker keeps an EMA of its group informativeness
    (:func:`~sp_grpo.functional.curriculum.group_informativeness`) and of its group mean, and turns
    the first into a sampling weight:

    .. math:: I_p \\leftarrow \\beta I_p + (1 - \\beta) i_p, \\qquad w_p = w_{\\min} + (1 - w_{\\min}) I_p

    Prompts never seen have weight 1, so new prompts are tried first.

    As a callback it reads what the module's ``training_step`` returns (``aspect_rewards``,
    ``group_size`` and ``prompts``; see :mod:`sp_grpo.callbacks.base`), gathers all ranks' groups so
    the statistics are identical on every rank, and scores each group by the reward the policy
    optimised for that batch: the aspects weighed with the ``pl_module.reward_weights`` read when the
    batch started. In ``setup`` it links itself to the trainer's
    :class:`~sp_grpo.data.PromptDataModule` (:meth:`~sp_grpo.data.PromptDataModule.set_prompt_weights`),
    which draws by :meth:`weights_for` when ``difficulty_sampling`` is on, and unlinks in ``teardown``.
    The statistics are the callback's ``state_dict``, so a resumed run continues them.

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
        super().__init__()
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
        self._batch_weights: dict[str, float] | None = None

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

    # -- Lightning hooks -----------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.datamodule, PromptDataModule):
            trainer.datamodule.set_prompt_weights(self.weights_for)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.datamodule, PromptDataModule) and trainer.datamodule.prompt_weights == self.weights_for:
            trainer.datamodule.set_prompt_weights(None)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # The weights this batch is trained with; a weight callback may rewrite them at batch end.
        weights = getattr(pl_module, "reward_weights", None)
        if not isinstance(weights, dict) or not weights:
            raise AttributeError(
                f"PromptDifficulty scores groups by the reward the module optimises, `pl_module.reward_weights`, which "
                f"{type(pl_module).__name__} lacks or leaves empty: give the module a `reward_weights: dict[str, float]`."
            )
        self._batch_weights = dict(weights)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        aspects = check_aspects(list(self._batch_weights), "pl_module.reward_weights")
        read = read_step_outputs(outputs, aspects, type(self).__name__)
        if read is None:
            return
        rewards, group_size, prompts = read
        if prompts is None:
            raise KeyError(
                "PromptDifficulty needs `training_step` to return 'prompts' (one per sample, prompt-major) beside "
                "'aspect_rewards'; add them, or remove PromptDifficulty from `trainer.callbacks`."
            )
        rewards, prompts = gather_step(trainer, rewards, prompts)
        weights = torch.tensor([self._batch_weights[a] for a in aspects])
        self.update(prompts, weights @ rewards.cpu(), group_size)

    # -- checkpointing -------------------------------------------------------------------------------

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
