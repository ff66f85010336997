"""Choose the ablation's weak start: pre-training checkpoints scored on the validation split.

For each checkpoint folder (written by ``python -m sp_grpo.toy.pretrain``) and the shipped one, the
demo's ODE sampler draws every validation prompt ``--seeds`` times from fixed noise; printed are the
three training rewards (fidelity, temporal, semantic: what GRPO sees) and the gold metrics. The
weak start is the checkpoint whose fidelity and temporal rewards are clearly below the shipped
one's while its colour is already learned (so GRPO has groups with spread to learn from). Only the
validation split is read here; the held-out split is left for the ablation's results.

    python benchmarks/weak_start.py runs/pretrain_cpu/step_000400 runs/pretrain_cpu/step_000600 --seeds 8
"""

from __future__ import annotations

import argparse

import torch


def score(path: str | None, seeds: int, split: str = "val") -> dict[str, float]:
    """Mean training rewards and gold metrics of ODE samples of ``split``'s prompts from the checkpoint at ``path``."""
    from sp_grpo.rollout import sample_ode
    from sp_grpo.toy import ShapesFidelity, ShapesSemantic, ShapesTemporal, ShapesWanPolicy
    from sp_grpo.toy.gold import GOLD_METRICS, gold_scores
    from sp_grpo.toy.pretrain import EVAL_SAMPLER
    from sp_grpo.toy.world import prompts_for_split

    policy = ShapesWanPolicy(pretrained_path=path)
    prompts = prompts_for_split(split) * seeds
    with torch.no_grad():
        videos = sample_ode(policy, prompts, EVAL_SAMPLER, generator=torch.Generator().manual_seed(1234))
        out = {name: float(reward(videos, prompts).mean()) for name, reward in
               (("fidelity", ShapesFidelity()), ("temporal", ShapesTemporal()), ("semantic", ShapesSemantic()))}
        gold = gold_scores(videos, prompts)
    out.update({m: float(gold[m].mean()) for m in GOLD_METRICS})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="Checkpoint folders; the shipped checkpoint is always added.")
    parser.add_argument("--seeds", type=int, default=8, help="Samples per validation prompt.")
    args = parser.parse_args()
    rows = {"shipped": score(None, args.seeds)} | {path: score(path, args.seeds) for path in args.checkpoints}
    columns = list(next(iter(rows.values())))
    print("| checkpoint (validation split) | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
