"""A toy LightningModule that follows the reward-weights contract but is not SelfPacedGRPO.

Its "generator" has one skill per aspect; each step the skills grow in proportion to the reward
weights the module reads (as GRPO would improve the weighted aspects), and the step returns noisy
per-aspect rewards around the skills. Rewards depend only on (rank, step) and the skills, which
are a buffer, so a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

ASPECTS = ("fidelity", "temporal", "semantic")


class ToyRewardModule(pl.LightningModule):
    def __init__(
        self,
        rate: float = 0.002,
        noise: float = 0.1,
        prompts_per_step: int = 4,
        group_size: int = 4,
        automatic: bool = False,
        aspects: tuple[str, ...] = ASPECTS,
        crash_at_step: int | None = None,
        rising: bool = True,
    ) -> None:
        super().__init__()
        self.automatic_optimization = automatic
        self.rate, self.noise, self.rising = rate, noise, rising
        self.prompts_per_step, self.group_size = prompts_per_step, group_size
        self.aspects = aspects
        self.crash_at_step = crash_at_step
        self.reward_weights: dict[str, float] = {a: 1.0 / len(aspects) for a in aspects}
        self.register_buffer("skill", torch.zeros(len(aspects)))
        self.param = nn.Parameter(torch.ones(1))
        self.seen_weights: list[dict[str, float]] = []

    def training_step(self, batch, batch_idx):
        step = self.trainer.global_step
        if self.crash_at_step is not None and step == self.crash_at_step:
            raise RuntimeError("simulated crash")
        self.seen_weights.append(dict(self.reward_weights))
        weights = torch.tensor([self.reward_weights[a] for a in self.aspects])
        if self.rising:
            self.skill += self.rate * weights
        generator = torch.Generator().manual_seed(10_000 * self.global_rank + step)
        n = self.prompts_per_step * self.group_size
        rewards = 0.3 + self.skill[:, None] + self.noise * torch.randn(len(self.aspects), n, generator=generator)
        prompts = [f"prompt {(step * self.prompts_per_step + p) % 7}" for p in range(self.prompts_per_step)]
        loss = (self.param**2).sum()  # lr is 0: the policy is simulated by `skill`
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        out = {
            "aspect_rewards": {a: rewards[k] for k, a in enumerate(self.aspects)},
            "group_size": self.group_size,
            "prompts": [p for p in prompts for _ in range(self.group_size)],
        }
        if self.automatic_optimization:
            out["loss"] = loss
        return out

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        # Content unused: rewards and prompts come from the step, so restarts replay them exactly.
        return DataLoader(list(range(10_000)), batch_size=1)


class DumpWeights(pl.Callback):
    """Writes what each rank ended with, for the multi-process test."""

    def __init__(self, folder: str, curriculum, difficulty) -> None:
        self.folder, self.curriculum, self.difficulty = folder, curriculum, difficulty

    def on_fit_end(self, trainer, pl_module) -> None:
        record = {
            "reward_weights": pl_module.reward_weights,
            "history": self.curriculum.history,
            "competence": self.curriculum.current_competence(),
            "prompt_weights": self.difficulty.weights_for([f"prompt {i}" for i in range(7)]).tolist(),
        }
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
