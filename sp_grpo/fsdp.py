"""Sharding a policy under Lightning's ``FSDPStrategy``, each large network as its own FSDP root.

Lightning would otherwise wrap the whole LightningModule in one FSDP root. ``training_step`` runs
inside that root's forward and steps the optimizer after each backward pass, which FSDP does not
allow. Here each network's forward and backward complete on their own: the policy's
``shard(wrap, device)`` says which networks to wrap (see ``DiffusersVideoPolicy.shard``), and the
strategy's ``auto_wrap_policy``, ``sharding_strategy``, precision and CPU offload apply to each
root. Lightning then finds the module already wrapped and leaves it as it is.
"""

from __future__ import annotations

import warnings

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim import Optimizer

__all__ = ["clip_grad_norm", "shard_policy"]

# FSDP warns once per unit that mixes frozen and trained weights, naming every parameter.
_MIXED_UNIT = "has both parameters with requires_grad=True and False"
# Where the module keeps its trained FSDP root: in its __dict__, out of the module tree (a plain
# attribute would register the network a second time).
_ROOT = "_fsdp_root"


def shard_policy(module: L.LightningModule, strategy: FSDPStrategy) -> None:
    """Shard ``module.policy``'s large networks with ``strategy``'s settings.

    Called from ``SelfPacedGRPO.setup`` rather than ``configure_model``: Lightning's
    ``WeightAveraging`` warns about any module that overrides ``configure_model``, under DDP too.
    A policy sharded by an earlier fit is left as it is.

    Args:
        module: The LightningModule, attached to a ``Trainer``, with a ``policy`` attribute.
        strategy: The trainer's FSDP strategy.

    The one FSDP root that holds every trainable weight is kept for :func:`clip_grad_norm`.

    Raises:
        ValueError: With a ``WeightAveraging`` callback, when an FSDP unit mixes dtypes, or when the
            trainable weights are not all in one sharded network.
        TypeError: If the policy has no ``shard`` method.
    """
    from lightning.pytorch.callbacks import WeightAveraging
    from torch.distributed.fsdp import FullyShardedDataParallel

    policy = module.policy
    if any(isinstance(callback, WeightAveraging) for callback in module.trainer.callbacks):
        raise ValueError(
            "`trainer.callbacks` has a WeightAveraging callback (e.g. EMAWeightAveraging), which keeps an unsharded"
            " copy of the module and cannot average sharded weights: remove it, or use `strategy: ddp`."
        )
    if _ROOT in module.__dict__:
        rank_zero_warn("The policy was sharded by an earlier fit; this strategy's FSDP settings are not applied to it.")
        return
    shard = getattr(policy, "shard", None)
    if shard is None:
        raise TypeError(
            f"`trainer.strategy` is FSDP, but {type(policy).__name__} has no `shard(wrap, device)` method to"
            " say which of its networks to shard. Add one (see DiffusersVideoPolicy.shard) or use `strategy: ddp`."
        )
    if getattr(strategy, "_state_dict_type", None) == "full":
        rank_zero_warn(
            "FSDP with `state_dict_type: full` gathers every weight, frozen ones included, in rank 0's CPU memory"
            " at each checkpoint (the frozen ones are dropped only afterwards); for large models use `sharded`."
        )
    # Frozen (base weights under LoRA) and trainable parameters share units, which FSDP only
    # flattens together when it keeps the original parameters.
    strategy.kwargs.setdefault("use_orig_params", True)
    settings = dict(
        cpu_offload=strategy.cpu_offload,
        mixed_precision=strategy.mixed_precision_config,
        sharding_strategy=strategy.sharding_strategy,
        device_id=module.device,
        **strategy.kwargs,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            shard(lambda network: FullyShardedDataParallel(network, **settings), module.device)
        except ValueError as error:
            if "uniform dtype" not in str(error):
                raise
            raise ValueError(
                "FSDP flattens each unit into one tensor of one dtype, but a unit mixes dtypes (bf16 base weights"
                " with fp32 LoRA weights, or modules diffusers keeps in fp32). Load the model in fp32 with"
                " `model.policy.init_args.torch_dtype: float32`; `trainer.precision: bf16-mixed` still computes"
                " in bf16."
            ) from error
    mixed = [w for w in caught if _MIXED_UNIT in str(w.message)]
    for w in caught:
        if w not in mixed:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if mixed:
        rank_zero_warn(
            f"{len(mixed)} FSDP units mix frozen and trained weights (LoRA): FSDP keeps a gradient buffer the size"
            " of each whole unit (sharded over the ranks), not only of the adapters."
        )
    for child in module.children():
        if child is not policy:
            child.to(module.device)
    # Applied above; left in place, Lightning would warn that it ignores it.
    strategy.kwargs.pop("auto_wrap_policy", None)
    module.__dict__[_ROOT] = _trained_root(module)


def clip_grad_norm(module: L.LightningModule, optimizer: Optimizer, max_norm: float | None) -> None:
    """Clip the gradients' norm to ``max_norm`` (``None``: no clipping), under FSDP over every rank's shard.

    Lightning does not clip by norm under FSDP; the sharded network's own ``clip_grad_norm_`` does
    (:func:`shard_policy` checked that it holds every trainable weight). Elsewhere Lightning's own
    clipping runs, through the strategy's precision plugin.
    """
    if max_norm is None:
        return
    if isinstance(module.trainer.strategy, FSDPStrategy):
        module.__dict__[_ROOT].clip_grad_norm_(max_norm)
    else:
        module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")


def _trained_root(module: L.LightningModule) -> nn.Module:
    """The one FSDP root with trainable weights, checked to hold every trainable weight of the policy."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    roots = FullyShardedDataParallel.fsdp_modules(module, root_only=True)
    roots = [root for root in roots if any(p.requires_grad for p in root.parameters())]
    trained = {id(p) for p in module.policy.trainable_parameters()}
    loose = trained - {id(p) for root in roots for p in root.parameters()}
    if len(roots) != 1 or loose:
        raise ValueError(
            f"Under FSDP every trainable weight must sit in one sharded network (found {len(roots)} sharded networks"
            f" with trainable weights and {len(loose)} trainable tensors outside them): {type(module.policy).__name__}"
            ".shard must wrap the network that `trainable_parameters()` comes from."
        )
    return roots[0]
