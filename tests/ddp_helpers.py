"""What the multi-process tests share: a callback that records each rank, and FSDP on CPU processes."""

from contextlib import contextmanager
from unittest import mock

import lightning as L
import lightning.pytorch.strategies.fsdp as lightning_fsdp
import torch
from lightning.pytorch.strategies import FSDPStrategy


class RecordRanks(L.Callback):
    """Save each rank's advantages, per-aspect rewards, reward weights and final trainable weights.

    Under FSDP they are the gathered full state dict on rank 0, which holds only trainable weights
    (frozen ones are omitted from checkpoints) and the rewards' buffers.
    """

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
        if isinstance(trainer.strategy, FSDPStrategy):  # gather full weights, whatever the checkpoints' format
            with full_state_dict_context(pl_module, trainer.world_size):
                trainable = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        else:
            trainable = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        torch.save({"steps": self.steps, "trainable": trainable}, f"{self.out_dir}/rank{trainer.global_rank}.pt")


class RecordCallbackStates(L.Callback):
    """After ``on_fit_end`` (in ``teardown``), save each rank's callback states and trainable weights to ``rank<r>.pt``.

    ``teardown`` runs after every callback's ``on_fit_end``, so the file exists only when the run got
    through fit end on that rank.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def teardown(self, trainer, pl_module, stage):
        states = {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks if cb is not self}
        trainable = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        torch.save({"callbacks": states, "trainable": trainable}, f"{self.out_dir}/rank{trainer.global_rank}.pt")


def full_state_dict_context(module, world_size, rank0_only=True):
    """Lightning's full-state-dict context for ``module``'s FSDP units, without ``offload_to_cpu``."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


@contextmanager
def _full_state_dict_without_offload():
    with mock.patch.object(lightning_fsdp, "_get_full_state_dict_context", full_state_dict_context):
        yield


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy in CPU processes (gloo), so the FSDP path is tested without GPUs.

    Two things differ from a GPU run, both test scaffolding around the code under test:
    Lightning refuses ``strategy: fsdp`` with ``accelerator: cpu`` by name (a subclass passes its
    check; torch's FSDP itself runs on the CPU), and full state dicts are gathered without
    ``offload_to_cpu``, which on tensors already in CPU memory crashes torch 2.13 (segfault).
    """

    def lightning_module_state_dict(self):
        with _full_state_dict_without_offload():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer):
        with _full_state_dict_without_offload():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path, *args, **kwargs):
        with _full_state_dict_without_offload():
            return super().load_checkpoint(checkpoint_path, *args, **kwargs)
