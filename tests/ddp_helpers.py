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
    """After ``on_fit_end`` (in ``teardown``), save each rank's callback states, trainable weights and last
    ``val/*`` metrics to ``rank<r>.pt``.

    ``teardown`` runs after every callback's ``on_fit_end``, so the file exists only when the run got
    through fit end on that rank.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def teardown(self, trainer, pl_module, stage):
        states = {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks if cb is not self}
        trainable = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        validation = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        record = {"callbacks": states, "trainable": trainable, "validation": validation}
        torch.save(record, f"{self.out_dir}/rank{trainer.global_rank}.pt")


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


# -- uneven ranks: `python -m tests.ddp_helpers RANK INIT_FILE OUT_DIR`, two processes on gloo -------------
UNEVEN_GROUPS = (3, 1)  # prompt groups of G = 2 samples on rank 0 and on rank 1


def uneven_rewards(rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s rewards per aspect: a different number of samples on each rank."""
    generator = torch.Generator().manual_seed(rank)
    samples = 2 * UNEVEN_GROUPS[rank]
    return {aspect: torch.rand(samples, generator=generator) for aspect in ("fidelity", "temporal")}


def uneven_ranks_main(rank: int, init_file: str, out_dir: str) -> None:
    """Gather, agree and compute the module's advantages with 6 samples on rank 0 and 2 on rank 1."""
    from types import SimpleNamespace

    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies import DDPStrategy

    from sp_grpo import SelfPacedGRPO
    from sp_grpo.distributed import all_gather_uneven, min_over_ranks
    from sp_grpo.policies import TinyWanPolicy
    from sp_grpo.rewards import RewardSet, Sharpness, TemporalFlickering

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    environment = LightningEnvironment()
    environment.set_world_size(2)
    environment.set_global_rank(rank)
    strategy = DDPStrategy(cluster_environment=environment)  # its all_gather and world_size, as in a Trainer
    rewards = uneven_rewards(rank)
    per_group = {"fidelity": torch.rand(UNEVEN_GROUPS[rank], generator=torch.Generator().manual_seed(10 + rank)), "temporal": 0.5}
    module = SelfPacedGRPO(
        TinyWanPolicy(seed=0), RewardSet({"sharp": Sharpness(), "flicker": TemporalFlickering()}), group_size=2,
        advantage_scale="batch",
    )
    module.trainer = SimpleNamespace(strategy=strategy, global_rank=rank, world_size=2)
    result = {
        "parts": all_gather_uneven(strategy, torch.stack([rewards["fidelity"], rewards["temporal"]])),
        "smallest": min_over_ranks(strategy, 5 if rank == 0 else 3),
        "advantages": module.compute_advantages(rewards, {"fidelity": 0.7, "temporal": 0.3}),
        "group_weighted": module.compute_advantages(rewards, per_group),
        "per_group": per_group["fidelity"],
    }
    torch.save(result, f"{out_dir}/uneven{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    import sys

    uneven_ranks_main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
