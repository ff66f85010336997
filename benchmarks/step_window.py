"""Step window: the per-iteration speed-up of training a 2-step window over training all 10 steps.

Two SelfPacedGRPO modules around the same tiny Wan, identical but for ``sampler.train_steps``:
``"all"`` (every step stochastic and trained) and ``"window"`` (2 consecutive steps stochastic and
trained, Euler ODE elsewhere; Flow-GRPO-Fast / MixGRPO). Rounds alternate the two arms and, between
them, measure the isolated model compute (as in ``iteration_overhead.py``). The ideal speed-up
follows from the isolated costs, with the rollout, decode and rewards shared by both arms:

.. math:: s_{ideal} = \\frac{E + P_{all}\\, c}{E + P_{window}\\, c}

where ``E`` is text encoding + rollout forwards + decode + rewards, ``c`` the forward/backward
cost of one trained (sample, step) pair and ``P`` the trained pairs. Printed: the measured speed-up
(ratio of median iteration times), the ideal one, and measured / ideal, as the median of per-round
ratios (target at least 0.9).

    python benchmarks/step_window.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from iteration_overhead import add_model_args, build, isolated_costs, timed_iteration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--window", type=int, default=2, help="steps in the window")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    arms = {"all": build(args, train_steps="all"), "window": build(args, train_steps="window", window_size=args.window)}
    n = args.prompts * args.group_size
    pairs = {"all": n * args.steps, "window": n * args.window}
    for setup in arms.values():  # warm-up
        timed_iteration(setup)
    isolated_costs(arms["all"], n)
    times: dict[str, list[float]] = {name: [] for name in arms}
    shared, per_pair = [], []
    for _ in range(args.rounds):
        for name, setup in arms.items():
            times[name].append(timed_iteration(setup))
        costs = isolated_costs(arms["all"], pairs["all"])
        per_pair.append(costs.pop("train_forward_backward") / pairs["all"])
        shared.append(sum(costs.values()))
    e, c = statistics.median(shared), statistics.median(per_pair)
    ideal = (e + pairs["all"] * c) / (e + pairs["window"] * c)
    t_all, t_window = statistics.median(times["all"]), statistics.median(times["window"])
    measured = t_all / t_window
    print(
        f"tiny Wan: layers={args.layers} width={args.heads * args.head_dim}, video {args.frames}x{args.size}x{args.size},"
        f" {args.prompts} prompts x G={args.group_size}, {args.steps} steps, micro-batch {args.micro_batch},"
        f" torch threads {torch.get_num_threads()}, rounds {args.rounds}"
    )
    for name in arms:
        values = times[name]
        print(f"  iteration train_steps={name:6s} ({pairs[name]:3d} pairs) median {statistics.median(values):7.3f} s  (min {min(values):.3f}, max {max(values):.3f})")
    print(f"  isolated: shared (encode+rollout+decode+rewards) median {e:.3f} s (min {min(shared):.3f}, max {max(shared):.3f});"
          f" per trained pair {c * 1000:.1f} ms (min {min(per_pair) * 1000:.1f}, max {max(per_pair) * 1000:.1f})")
    # Paired per round (both arms and the isolated costs back to back) against load from other processes.
    per_round = [
        (a / w) / ((sh + pairs["all"] * pp) / (sh + pairs["window"] * pp))
        for a, w, sh, pp in zip(times["all"], times["window"], shared, per_pair)
    ]
    print(f"speed-up measured {measured:.3f} (ratio of medians), ideal {ideal:.3f}")
    print(
        f"ratio measured / ideal speed-up = {statistics.median(per_round):.3f}   (median of per-round ratios; min"
        f" {min(per_round):.3f}, max {max(per_round):.3f}; from medians {measured / ideal:.3f}; target >= 0.9)"
    )

if __name__ == "__main__":
    main()
