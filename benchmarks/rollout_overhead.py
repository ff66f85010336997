"""Rollout overhead: our sampler (with per-step log-probs) against diffusers' ``WanPipeline.__call__``.

Both run the same tiny Wan (random weights, built offline), the same number of steps, video size,
batch and guidance scale, in one process, alternating, and the median of several repeats is
compared. Ours records every latent and log-probability and samples with the Flow-GRPO SDE;
the pipeline runs the Euler ODE. Ours batches the two halves of classifier-free guidance into one
forward pass (``cfg_batched``); the pipeline runs two. Both variants of ours are reported.

    python benchmarks/rollout_overhead.py [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    args = parser.parse_args()

    from diffusers.utils import logging as diffusers_logging

    from sp_grpo.policies import WanPolicy, tiny_wan_components
    from sp_grpo.rollout import DenoisingConfig, sample_rollout

    diffusers_logging.disable_progress_bar()
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    components = tiny_wan_components(
        0, num_layers=args.layers, num_attention_heads=args.heads, attention_head_dim=args.head_dim, ffn_dim=4 * args.heads * args.head_dim
    )
    policy = WanPolicy(components=components, lora_rank=None, max_sequence_length=16).to(device)
    pipe = components.pipeline().to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red square moving left", "a blue circle moving right", "a green ball moving up", "a yellow box"][: args.prompts]
    config = DenoisingConfig(num_steps=args.steps, guidance_scale=4.5, num_frames=args.frames, height=args.size, width=args.size)

    def ours(batched: bool) -> None:
        policy.cfg_batched = batched
        sample_rollout(policy, prompts, args.group_size, config, generator=torch.Generator(device).manual_seed(0), device=device)

    def theirs() -> None:
        pipe(
            prompts,
            negative_prompt="",
            num_videos_per_prompt=args.group_size,
            height=args.size,
            width=args.size,
            num_frames=args.frames,
            num_inference_steps=args.steps,
            guidance_scale=4.5,
            max_sequence_length=16,
            generator=torch.Generator(device).manual_seed(0),
            output_type="pt",
        )

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    runs = {"pipeline": theirs, "ours_batched_cfg": lambda: ours(True), "ours_two_pass_cfg": lambda: ours(False)}
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"device={device} steps={args.steps} batch={args.prompts}x{args.group_size} video={args.frames}x{args.size}x{args.size} "
          f"layers={args.layers} width={args.heads * args.head_dim} repeats={args.repeats}")
    for name, value in median.items():
        print(f"  {name:20s} median {value * 1000:8.1f} ms   (min {min(times[name]) * 1000:.1f}, max {max(times[name]) * 1000:.1f})")
    print(f"ratio ours(batched CFG) / WanPipeline   = {median['ours_batched_cfg'] / median['pipeline']:.3f}   (target <= 1.10)")
    print(f"ratio ours(two-pass CFG) / WanPipeline  = {median['ours_two_pass_cfg'] / median['pipeline']:.3f}   (same work as the pipeline)")


if __name__ == "__main__":
    main()
