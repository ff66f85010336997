"""Training-step memory: LoRA with gradient checkpointing against full fine-tuning without it.

Each arm runs in its own fresh subprocess (so no arm inherits another's allocator high-water mark),
arms interleaved over repeats. A subprocess builds a tiny Wan, a rollout of random latents with the
shapes a real rollout has (no sampling, so the rollout's own peak cannot mask the training step's),
then runs one training step: ``SelfPacedGRPO.accumulate_gradients`` over every (sample, step) pair in
micro-batches, then ``AdamW.step``. What is measured, on the CPU: the process's peak resident set
size (``ru_maxrss``) during the step, minus its resident set size just before it (read from
``/proc/self/statm``). That delta is the step's extra memory: activations kept for the backward
pass, gradients and AdamW states (the latter two created by the step). The weights are counted
before the step and are the same in every arm. glibc is told to return large freed blocks to the
system (``MALLOC_MMAP_THRESHOLD_``), so the resident set follows live tensors rather than cached pages.

    python benchmarks/train_memory.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

ARMS = {
    "lora_ckpt": {"lora_rank": 8, "gradient_checkpointing": True},
    "lora": {"lora_rank": 8, "gradient_checkpointing": False},
    "full_ckpt": {"lora_rank": None, "gradient_checkpointing": True},
    "full": {"lora_rank": None, "gradient_checkpointing": False},
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_arm(name: str, args) -> dict:
    """Build, make a rollout, run one training step; return memory figures in bytes."""
    import torch

    from sp_grpo.module import SelfPacedGRPO
    from sp_grpo.policies import VideoPolicy  # noqa: F401  (import cost before the baseline)
    from sp_grpo.policies.tiny import tiny_wan_components
    from sp_grpo.policies.wan import WanPolicy
    from sp_grpo.rewards import RewardSet, TemporalFlickering
    from sp_grpo.rollout import DenoisingConfig, Rollout

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    width = args.heads * args.head_dim
    components = tiny_wan_components(0, num_layers=args.layers, num_attention_heads=args.heads, attention_head_dim=args.head_dim, ffn_dim=4 * width)
    policy = WanPolicy(components=components, max_sequence_length=16, **ARMS[name])
    sampler = DenoisingConfig(num_steps=args.steps, guidance_scale=4.5, num_frames=args.frames, height=args.size, width=args.size)
    module = SelfPacedGRPO(policy, RewardSet({"flicker": TemporalFlickering()}), group_size=args.group_size, sampler=sampler, micro_batch_size=args.micro_batch)
    policy.train()
    n = args.group_size
    shape = policy.latent_shape(args.frames, args.size, args.size)
    embeds = policy.encode_prompts(["a red square moving left"], guidance=True).repeat_interleave(n)
    rollout = Rollout(
        prompts=["a red square moving left"] * n,
        group_size=n,
        latents=torch.randn(n, args.steps + 1, *shape),
        log_probs=torch.zeros(n, args.steps),
        sigmas=policy.sigmas(args.steps),
        stochastic=torch.ones(args.steps, dtype=torch.bool),
        train_mask=torch.ones(n, args.steps, dtype=torch.bool),
        embeds=embeds,
        videos=torch.zeros(n, args.frames, 3, args.size, args.size),
    )
    advantages = torch.linspace(-1, 1, n)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4)
    pairs = rollout.train_mask.nonzero()

    before = rss_bytes()
    module.accumulate_gradients(rollout, advantages, pairs)
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    trainable = sum(p.numel() for p in policy.trainable_parameters())
    return {"before": before, "peak": peak, "delta": peak - before, "trainable": trainable, "pairs": len(pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="denoising steps, all trained")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arm", choices=sorted(ARMS), help=argparse.SUPPRESS)  # internal: run one arm and print JSON
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args)))
        return

    forwarded = [a for a in sys.argv[1:] if a != "--arm"]
    results: dict[str, list[dict]] = {name: [] for name in ARMS}
    # glibc serves blocks above this size with mmap and returns them on free, so the resident set
    # follows the live tensors instead of keeping freed arena pages.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for _ in range(args.repeats):
        for name in ARMS:
            out = subprocess.run(
                [sys.executable, __file__, *forwarded, "--arm", name], capture_output=True, text=True, check=True, env=env
            )
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    mib = 2**20
    print(
        f"tiny Wan: layers={args.layers} width={args.heads * args.head_dim}, video {args.frames}x{args.size}x{args.size},"
        f" one training step over {results['full'][0]['pairs']} (sample, step) pairs, micro-batch {args.micro_batch} (x2 rows with CFG),"
        f" AdamW; repeats {args.repeats}; CPU peak RSS during the step minus RSS before it"
    )
    medians = {}
    for name, runs in results.items():
        deltas = [r["delta"] / mib for r in runs]
        medians[name] = statistics.median(deltas)
        print(
            f"  {name:10s} trainable {runs[0]['trainable'] / 1e6:7.3f}M  step memory median {medians[name]:8.1f} MiB"
            f" (min {min(deltas):.1f}, max {max(deltas):.1f}); RSS before {statistics.median(r['before'] for r in runs) / mib:.0f} MiB"
        )
    print(f"ratio step memory LoRA+checkpointing / full fine-tuning without = {medians['lora_ckpt'] / medians['full']:.3f}")


if __name__ == "__main__":
    main()
