"""A callback that records, on every rank, what the two-process test compares."""

import lightning as L
import torch


class RecordRanks(L.Callback):
    """Save each rank's advantages, per-aspect rewards, reward weights and final trainable weights."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._weights = dict(pl_module.reward_weights)  # the weights this batch is trained with

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({
            "prompts": list(batch["prompts"]),
            "advantages": outputs["advantages"].cpu(),
            "aspect_rewards": {k: v.cpu() for k, v in outputs["aspect_rewards"].items()},
            "weights_used": self._weights,
            "weights_next": dict(pl_module.reward_weights),
        })

    def on_train_end(self, trainer, pl_module):
        trainable = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        torch.save({"steps": self.steps, "trainable": trainable}, f"{self.out_dir}/rank{trainer.global_rank}.pt")
