"""A toy LightningModule with the per-group weighting contract that is not SelfPacedGRPO.

Each step it draws per-aspect rewards for ``P`` groups of ``G`` samples around a skill per aspect;
the groups differ in level and spread, so the per-group weights differ. When ``group_weighting`` is
set it weighs each group with it (as SelfPacedGRPO's advantage step does), records the weights, and
the skills grow with the mean weights. Rewards depend only on (rank, step) and the skills, a buffer,
so a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

ASPECTS = ("fidelity", "temporal", "semantic")


class GroupWeightedToy(pl.LightningModule):
    def __init__(self, rate: float = 0.01, groups: int = 4, group_size: int = 4, crash_at_step: int | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.rate, self.groups, self.group_size, self.crash_at_step = rate, groups, group_size, crash_at_step
        self.reward_weights: dict[str, float] = {a: 1.0 / 3 for a in ASPECTS}
        self.group_weighting = None
        self.register_buffer("skill", torch.tensor([0.6, 0.4, 0.1]))
        self.param = nn.Parameter(torch.ones(1))
        self.seen: list[dict] = []  # per step: rewards, thresholds used and the per-group weights

    def training_step(self, batch, batch_idx):
        step = self.trainer.global_step
        if self.crash_at_step is not None and step == self.crash_at_step:
            raise RuntimeError("simulated crash")
        generator = torch.Generator().manual_seed(10_000 * self.global_rank + step)
        level = self.skill[:, None, None] + 0.1 * torch.randn(3, self.groups, 1, generator=generator)
        spread = 0.2 * torch.rand(3, self.groups, 1, generator=generator)
        noise = torch.rand(3, self.groups, self.group_size, generator=generator) - 0.5
        rewards = (level + spread * noise).clamp(0, 1).reshape(3, -1)
        aspect_rewards = {a: rewards[k] for k, a in enumerate(ASPECTS)}
        if self.group_weighting is not None:
            weights = self.group_weighting(aspect_rewards, self.group_size)
            self.seen.append(
                {
                    "rewards": rewards.tolist(),
                    "thresholds": list(self.group_weighting.thresholds),
                    "weights": {a: w.tolist() for a, w in weights.items()},
                }
            )
            self.skill += self.rate * torch.stack([weights[a].mean() for a in ASPECTS])
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward((self.param**2).sum())  # lr is 0: the policy is simulated by `skill`
        optimizer.step()
        return {"aspect_rewards": aspect_rewards, "group_size": self.group_size}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(list(range(10_000)), batch_size=1)


class DumpSeen(pl.Callback):
    """Writes what each rank saw and ended with, for the multi-process test."""

    def __init__(self, folder: str, weighting) -> None:
        self.folder, self.weighting = folder, weighting

    def on_fit_end(self, trainer, pl_module) -> None:
        record = {"seen": pl_module.seen, "state": self.weighting.state_dict(), "rank": trainer.global_rank}
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
