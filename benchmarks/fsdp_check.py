"""Smoke-check training under Lightning's FSDPStrategy on the GPUs of this machine (bf16-mixed).

A tiny Wan (full fine-tuning, or LoRA with ``--lora``) with the transformer blocks as FSDP units,
activation checkpointing and a KL term: a few GRPO iterations with gradient clipping by the global
norm (FSDP's ``clip_grad_norm_``). It prints the loss and how many trainable tensors changed, from the full state dict gathered at the
end of training. Needs at least one CUDA device; ``tests/test_fsdp.py`` checks the same path in CPU
processes against DDP.

    python benchmarks/fsdp_check.py [--devices 1] [--steps 3]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora", action="store_true", help="LoRA instead of full fine-tuning")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fsdp_check needs a CUDA device.")

    import lightning as L
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock
    from lightning.pytorch.strategies import FSDPStrategy

    from sp_grpo import DenoisingConfig, PromptDataModule, SelfPacedGRPO
    from sp_grpo.callbacks import SelfPacedCurriculum
    from sp_grpo.policies import TinyWanPolicy
    from sp_grpo.rewards import RewardSet, Sharpness, TemporalFlickering

    class GatherWeights(L.Callback):
        """The full state dict, gathered while the process group is still up (every rank must call it)."""

        def on_train_end(self, trainer, pl_module):
            self.state = trainer.strategy.lightning_module_state_dict()

    policy = TinyWanPolicy(seed=0, lora_rank=4 if args.lora else None, reference_copy=not args.lora, gradient_checkpointing=True)
    before = {n: p.detach().clone() for n, p in policy.transformer.named_parameters() if p.requires_grad}
    module = SelfPacedGRPO(
        policy,
        RewardSet({"sharp": Sharpness(), "flicker": TemporalFlickering()}),
        group_size=4,
        sampler=DenoisingConfig(num_steps=4, num_frames=5, height=32, width=32, guidance_scale=2.0),
        learning_rate=1e-3,
        max_grad_norm=1.0,
        kl_coef=0.01,
    )
    strategy = FSDPStrategy(auto_wrap_policy={WanTransformerBlock}, state_dict_type="full")
    gather = GatherWeights()
    trainer = L.Trainer(accelerator="gpu", devices=args.devices, strategy=strategy, precision="bf16-mixed", max_steps=args.steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[SelfPacedCurriculum(), gather])
    trainer.fit(module, datamodule=PromptDataModule(prompts=["a red square moving left", "a blue circle moving up"] * 2, batch_size=2))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    if trainer.is_global_zero:
        print("FSDP", "LoRA" if args.lora else "full", f"devices={args.devices} steps={trainer.global_step}")
        print({k: round(v, 5) for k, v in sorted(metrics.items()) if k in ("train/loss", "train/reward_weighted", "train/approx_kl")})
    if trainer.is_global_zero:
        state = gather.state  # full weights on rank 0
        changed = [n for n in before if not torch.equal(state[f"policy.transformer.{n}"].cpu().float(), before[n].float())]
        print(f"trainable tensors changed: {len(changed)} of {len(before)}")


if __name__ == "__main__":
    main()
