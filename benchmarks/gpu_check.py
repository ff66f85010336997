"""Check the GPU path at real size with random weights: bf16 Wan2.1-1.3B transformer, real Wan VAE.

Nothing is downloaded: the transformer and VAE are built from Wan2.1-T2V-1.3B's published configs
with random weights; the text encoder is a 2-layer UMT5 of the real width (4096) instead of the
5.7B-parameter UMT5-XXL, which only changes the cost of encoding prompts. It prints time and peak
memory of one rollout (with log-probs) and of one training micro-batch (LoRA, gradient
checkpointing), and the on-policy log-ratio of the first update in bf16.

    python benchmarks/gpu_check.py [--frames 81 --height 480 --width 832 --steps 4]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--decode-chunk", type=int, default=1)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device.")

    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from sp_grpo.functional.advantages import group_advantages
    from sp_grpo.module import SelfPacedGRPO
    from sp_grpo.policies import WanComponents, WanPolicy, build_tokenizer
    from sp_grpo.rewards import RewardSet, Sharpness, TemporalFlickering
    from sp_grpo.rollout import DenoisingConfig, sample_rollout

    device = torch.device("cuda")
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):
        transformer = WanTransformer3DModel(  # Wan2.1-T2V-1.3B's transformer config
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6,
        ).to(torch.bfloat16)
        vae = AutoencoderKLWan()  # Wan's VAE config is the class default
        tokenizer = build_tokenizer()
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=1024, num_layers=2, num_heads=8, dropout_rate=0.0)).to(torch.bfloat16)
    components = WanComponents(transformer, vae, text_encoder, tokenizer, FlowMatchEulerDiscreteScheduler(shift=3.0))
    policy = WanPolicy(
        components=components, torch_dtype="bfloat16", lora_rank=32, gradient_checkpointing=True,
        max_sequence_length=64, decode_chunk_size=args.decode_chunk,
    ).to(device)
    print(f"built in {time.perf_counter() - start:.1f}s; transformer {sum(p.numel() for p in transformer.parameters()) / 1e9:.2f}B params,"
          f" LoRA {sum(p.numel() for p in policy.trainable_parameters()) / 1e6:.1f}M trainable")

    config = DenoisingConfig(num_steps=args.steps, guidance_scale=5.0, num_frames=args.frames, height=args.height, width=args.width)
    print(f"latent shape per sample {policy.latent_shape(args.frames, args.height, args.width)}")
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    rollout = sample_rollout(policy, ["a red square moving left"], args.group_size, config, generator=torch.Generator(device).manual_seed(0), device=device)
    torch.cuda.synchronize()
    print(f"rollout: {args.group_size} videos x {args.steps} steps, CFG batched: {time.perf_counter() - start:.1f}s,"
          f" peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; videos {tuple(rollout.videos.shape)} {rollout.videos.dtype},"
          f" range [{rollout.videos.min():.2f}, {rollout.videos.max():.2f}], log-probs finite: {bool(torch.isfinite(rollout.log_probs).all())}")

    rewards = RewardSet({"sharp": Sharpness(), "flicker": TemporalFlickering()}).to(device)
    module = SelfPacedGRPO(policy, rewards, group_size=args.group_size, sampler=config, micro_batch_size=args.micro_batch).to(device)
    advantages = group_advantages(torch.arange(args.group_size, dtype=torch.float32, device=device), args.group_size)
    pairs = rollout.train_mask.nonzero()[: args.micro_batch]
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = module.accumulate_gradients(rollout, advantages, pairs)
    torch.cuda.synchronize()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in policy.trainable_parameters() if p.grad is not None]))
    print(f"train micro-batch of {len(pairs)} (sample, step) pairs, forward+backward with checkpointing: {time.perf_counter() - start:.1f}s,"
          f" peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; on-policy |log_ratio| max {out['log_ratio'].abs().max():.2e},"
          f" grad norm {grad_norm:.3e}")


if __name__ == "__main__":
    main()
