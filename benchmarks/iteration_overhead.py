"""Iteration overhead: a full GRPO iteration's wall time against the sum of its isolated model compute.

One process, one tiny Wan (random weights, built offline) sized so that an iteration takes more than
a second on a CPU. Each round runs one real iteration under a Lightning ``Trainer`` (rollout with
log-probs, decode, rewards, advantages, clipped updates, logging; timed between
``on_train_batch_start`` and ``on_train_batch_end``) and then, interleaved, the same model compute
in isolation with the same shapes:

* text encoding of the unique prompts;
* rollout forwards: ``num_steps`` guided velocity calls on all samples, under inference mode;
* decode of the final latents;
* reward forwards on the decoded videos;
* training forward/backward: guided velocity + backward, ``micro_batch_size`` (sample, step)
  pairs at a time, for every trained pair.

The median of the per-round ratios is printed (target at most 1.15), with its min..max. Other
processes share the machine, so rounds are repeated and medians compared, and torch runs one
thread by default (``--threads``) so that competing processes do not oversubscribe the cores.

    python benchmarks/iteration_overhead.py [--rounds 5] [--steps 10] [--train-steps all]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import dataclass

import lightning as L
import torch

PROMPTS = ["a red square moving left", "a blue circle moving right", "a green triangle moving up", "a yellow ball moving down"]


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--prompts", type=int, default=2, help="unique prompts per iteration")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=8, help="(sample, step) pairs per forward/backward")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1: other processes share this machine, and oversubscribed cores make timings erratic; 0 keeps torch's default)",
    )


@dataclass
class Setup:
    module: object
    datamodule: object
    prompts: list[str]


def build(args, train_steps: str = "all", window_size: int = 2) -> Setup:
    """A SelfPacedGRPO module around a tiny Wan with LoRA and model-free rewards of every aspect."""
    from sp_grpo.data.prompts import PromptDataModule
    from sp_grpo.module import SelfPacedGRPO
    from sp_grpo.policies.tiny import tiny_wan_components
    from sp_grpo.policies.wan import WanPolicy
    from sp_grpo.rewards import ColorPromptAlignment, RewardSet, Sharpness, TemporalFlickering
    from sp_grpo.rollout import DenoisingConfig

    components = tiny_wan_components(
        0, num_layers=args.layers, num_attention_heads=args.heads, attention_head_dim=args.head_dim, ffn_dim=4 * args.heads * args.head_dim
    )
    policy = WanPolicy(components=components, lora_rank=8, max_sequence_length=16)
    rewards = RewardSet({"sharpness": Sharpness(saturation=0.01), "flicker": TemporalFlickering(), "colour": ColorPromptAlignment()})
    sampler = DenoisingConfig(
        num_steps=args.steps, guidance_scale=4.5, num_frames=args.frames, height=args.size, width=args.size,
        train_steps=train_steps, window_size=window_size, window_placement="random",
    )
    # The isolated compute below recomputes the update's forward passes, so the iteration does too (reusing
    # the rollout's would skip work the baseline does; hot_path.py measures that).
    module = SelfPacedGRPO(
        policy, rewards, group_size=args.group_size, sampler=sampler, micro_batch_size=args.micro_batch, reuse_rollout_forward=False
    )
    prompts = PROMPTS[: args.prompts]
    datamodule = PromptDataModule(prompts=prompts, batch_size=len(prompts), shuffle=False)
    return Setup(module, datamodule, prompts)


class IterationTimer(L.Callback):
    """Records the wall time of each training batch (one GRPO iteration)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def timed_iteration(setup: Setup) -> float:
    """Run one GRPO iteration with a fresh Trainer (its setup is not timed) and return its wall time."""
    timer = IterationTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(setup.module, datamodule=setup.datamodule)
    return timer.seconds[0]


def isolated_costs(setup: Setup, trained_pairs: int) -> dict[str, float]:
    """Wall time of each piece of model compute of one iteration, run alone with the iteration's shapes."""
    module, policy = setup.module, setup.module.policy
    config, group = module.sampler, module.group_size
    n = len(setup.prompts) * group
    guidance = config.guidance_scale
    shape = policy.latent_shape(config.num_frames, config.height, config.width)
    gen = torch.Generator().manual_seed(0)
    costs: dict[str, float] = {}

    start = time.perf_counter()
    embeds = policy.encode_prompts(setup.prompts, guidance=guidance != 1.0).repeat_interleave(group)
    costs["text_encode"] = time.perf_counter() - start

    x = torch.randn((n, *shape), generator=gen)
    sigmas = policy.sigmas(config.num_steps)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(config.num_steps):
            policy.velocity(x, torch.full((n,), float(sigmas[i])), embeds, guidance)
    costs["rollout_forwards"] = time.perf_counter() - start

    start = time.perf_counter()
    videos = policy.decode(x)
    costs["decode"] = time.perf_counter() - start

    start = time.perf_counter()
    with torch.no_grad():
        module.rewards(videos, [p for p in setup.prompts for _ in range(group)], group_size=group)
    costs["reward_forwards"] = time.perf_counter() - start

    policy.train()
    params = policy.trainable_parameters()
    start = time.perf_counter()
    done = 0
    while done < trained_pairs:
        m = min(module.micro_batch_size, trained_pairs - done)
        rows = torch.arange(m) % n
        v = policy.velocity(x[rows], sigmas[torch.arange(m) % config.num_steps], embeds.index(rows), guidance)
        v.float().square().mean().backward()
        done += m
    costs["train_forward_backward"] = time.perf_counter() - start
    for p in params:
        p.grad = None
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--train-steps", choices=["all", "window"], default="all")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    setup = build(args, train_steps=args.train_steps)
    n = args.prompts * args.group_size
    trained = n * (args.steps if args.train_steps == "all" else 2)
    timed_iteration(setup)  # warm-up: first-call allocations, lazy imports
    isolated_costs(setup, trained)
    iterations, isolated = [], []
    for _ in range(args.rounds):
        iterations.append(timed_iteration(setup))
        isolated.append(isolated_costs(setup, trained))
    sums = [sum(c.values()) for c in isolated]
    print(
        f"tiny Wan: layers={args.layers} width={args.heads * args.head_dim}, video {args.frames}x{args.size}x{args.size},"
        f" {args.prompts} prompts x G={args.group_size}, {args.steps} steps, train_steps={args.train_steps} ({trained} pairs),"
        f" micro-batch {args.micro_batch}, torch threads {torch.get_num_threads()}, rounds {args.rounds}"
    )
    for key in isolated[0]:
        values = [c[key] for c in isolated]
        print(f"  isolated {key:24s} median {statistics.median(values):7.3f} s  (min {min(values):.3f}, max {max(values):.3f})")
    print(f"  isolated sum                      median {statistics.median(sums):7.3f} s  (min {min(sums):.3f}, max {max(sums):.3f})")
    print(f"  full iteration (Trainer)          median {statistics.median(iterations):7.3f} s  (min {min(iterations):.3f}, max {max(iterations):.3f})")
    # Each round's iteration and isolated compute run back to back, so their ratio is paired against
    # load from other processes; the median over rounds is the headline.
    ratios = [it / s for it, s in zip(iterations, sums)]
    print(
        f"ratio iteration / isolated compute = {statistics.median(ratios):.3f}   (median of per-round ratios;"
        f" min {min(ratios):.3f}, max {max(ratios):.3f}; ratio of medians {statistics.median(iterations) / statistics.median(sums):.3f};"
        " target <= 1.15)"
    )

if __name__ == "__main__":
    main()
