"""Classifier-free guidance as one batched pass of 2B rows, or as two passes of B rows: which is faster here.

The measurement behind ``cfg_batched: auto`` (sp_grpo.policies.guidance.cfg_batched_on). Two tiny Wans
with random weights (built offline): the one of ``configs/tiny.yaml`` and the wider one of
``benchmarks/iteration_overhead.py``. For each, the two arms run interleaved in one process, each
repeat timing both back to back:

* rollout: ``--steps`` guided velocity calls on B samples under inference mode;
* update: guided velocity + backward on B (sample, step) pairs, LoRA as trained.

Printed: medians and the ratio batched / two passes (below 1: batched is faster).

    python benchmarks/cfg_batching.py [--repeats 7] [--device cpu] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

MODELS = {
    # name: (tiny_wan_components kwargs, frames, size, samples)
    "tiny.yaml": ({"num_layers": 2}, 5, 32, 8),
    "iteration_overhead": ({"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 512}, 9, 64, 8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=6, help="guided calls per rollout repeat")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0 keeps torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sp_grpo.policies.tiny import tiny_wan_components
    from sp_grpo.policies.wan import WanPolicy

    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    print(f"device={device} torch threads={torch.get_num_threads()} repeats={args.repeats}")
    for name, (kwargs, frames, size, n) in MODELS.items():
        policy = WanPolicy(components=tiny_wan_components(0, **kwargs), lora_rank=4, max_sequence_length=16).to(device)
        embeds = policy.encode_prompts(["a red square moving left"] * n, guidance=True)
        x = torch.randn(n, *policy.latent_shape(frames, size, size), device=device)
        sigma = torch.full((n,), 0.7, device=device)

        def rollout(batched: bool) -> None:
            policy.cfg_batched = batched
            with torch.inference_mode():
                for _ in range(args.steps):
                    policy.velocity(x, sigma, embeds, 4.5)

        def update(batched: bool) -> None:
            policy.cfg_batched = batched
            policy.velocity(x, sigma, embeds, 4.5).square().mean().backward()

        arms = {
            "rollout, batched": lambda: rollout(True),
            "rollout, two passes": lambda: rollout(False),
            "update, batched": lambda: update(True),
            "update, two passes": lambda: update(False),
        }
        for fn in arms.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        for _ in range(args.repeats):
            for arm, fn in arms.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[arm].append(time.perf_counter() - start)
        median = {arm: statistics.median(values) for arm, values in times.items()}
        print(f"{name}: {n} samples, video {frames}x{size}x{size}")
        for arm, value in median.items():
            print(f"  {arm:20s} median {value * 1000:8.1f} ms  (min {min(times[arm]) * 1000:.1f}, max {max(times[arm]) * 1000:.1f})")
        for part in ("rollout", "update"):
            ratios = [b / t for b, t in zip(times[f"{part}, batched"], times[f"{part}, two passes"])]
            print(
                f"  ratio {part} batched / two passes = {statistics.median(ratios):.3f}"
                f"  (median of per-repeat ratios; min {min(ratios):.3f}, max {max(ratios):.3f})"
            )


if __name__ == "__main__":
    main()
