"""Self-paced curriculum against static reward weights on the shapes world, at equal compute.

Three arms, each a ``configs/demo.yaml`` run (same model, sampler, optimizer, steps) that differs
only in the callback that sets the reward weights:

* ``self_paced``: :class:`~sp_grpo.callbacks.SelfPacedCurriculum` with the demo's settings;
* ``static_equal``: :class:`~sp_grpo.callbacks.StaticWeights`, fidelity = temporal = semantic;
* ``semantic_only``: :class:`~sp_grpo.callbacks.StaticWeights`, semantic alone (what a
  fixed-reward text-alignment pipeline would use).

Each arm runs with ``--seeds`` seeds (rollout noise, data order); the gold evaluation on the
held-out prompts (:class:`~sp_grpo.toy.GoldEvaluation`) is printed as mean and spread per arm.
Objects are built in Python from the YAML's values (not through the CLI), so the script also runs
where jsonargparse is not installed::

    python benchmarks/curriculum_ablation.py --seeds 5 --workers 2              # 2 CPU cores
    python benchmarks/curriculum_ablation.py --seeds 5 --workers 5 --device cuda
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import yaml

CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"
ARMS = ("self_paced", "static_equal", "semantic_only")


def _config(path: str | None) -> dict:
    return yaml.safe_load(Path(path or CONFIG).read_text())


def _curriculum_args(config: dict) -> dict:
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("SelfPacedCurriculum"):
            return dict(callback.get("init_args", {}))
    raise KeyError(f"{CONFIG} has no SelfPacedCurriculum callback to compare against.")


def run_arm(arm: str, seed: int, device: str, max_steps: int | None, threads: int, gold_seeds: int, config_path: str | None = None) -> dict:
    """Train one arm with one seed; returns the gold evaluation before and after."""
    import lightning.pytorch as pl
    import torch

    from sp_grpo.callbacks.curriculum import SelfPacedCurriculum, StaticWeights
    from sp_grpo.data.prompts import PromptDataModule
    from sp_grpo.module import SelfPacedGRPO
    from sp_grpo.rewards.mixture import RewardSet
    from sp_grpo.rollout import SamplerConfig
    from sp_grpo.toy import GoldEvaluation, ShapesFidelity, ShapesSemantic, ShapesTemporal, ShapesWanPolicy

    torch.set_num_threads(threads)
    config = _config(config_path)
    model_args = {k: v for k, v in config["model"].items() if k not in ("policy", "rewards", "sampler")}
    policy = ShapesWanPolicy(**config["model"]["policy"].get("init_args", {}))
    rewards = RewardSet({"fidelity": ShapesFidelity(), "temporal": ShapesTemporal(), "semantic": ShapesSemantic()})
    pl.seed_everything(seed, verbose=False)
    module = SelfPacedGRPO(policy, rewards, sampler=SamplerConfig(**config["model"]["sampler"]), **{**model_args, "seed": seed})
    data = PromptDataModule(prompts=config["data"]["prompts"], batch_size=config["data"]["batch_size"], seed=seed)
    weights = {
        "self_paced": lambda: SelfPacedCurriculum(**{**_curriculum_args(config), "plot_filename": None}),
        "static_equal": lambda: StaticWeights({"fidelity": 1.0, "temporal": 1.0, "semantic": 1.0}),
        "semantic_only": lambda: StaticWeights({"semantic": 1.0}),
    }[arm]()
    gold = GoldEvaluation(seeds=gold_seeds, filename=None, verbose=False)
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_steps=max_steps or config["trainer"]["max_steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[weights, gold],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    steps = sorted(gold.results)
    return {
        "arm": arm,
        "seed": seed,
        "minutes": (time.perf_counter() - start) / 60,
        "before": gold.results[steps[0]],
        "after": gold.results[steps[-1]],
    }


def _run(job: tuple) -> dict:
    result = run_arm(*job)
    print(f"{result['arm']:>14} seed {result['seed']}: all_correct {result['before']['all_correct']:.3f} -> "
          f"{result['after']['all_correct']:.3f} ({result['minutes']:.1f} min)", flush=True)
    return result


def table(results: list[dict]) -> str:
    """Mean ± std over seeds of each gold metric after training, per arm (and the shared start)."""
    from sp_grpo.toy.gold import GOLD_METRICS

    def cell(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {spread:.3f}"

    lines = ["| arm | " + " | ".join(GOLD_METRICS) + " |", "|---|" + "---:|" * len(GOLD_METRICS)]
    lines.append("| pretrained (before) | " + " | ".join(cell([r["before"][m] for r in results]) for m in GOLD_METRICS) + " |")
    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm]
        if runs:
            lines.append(f"| {arm} (n={len(runs)}) | " + " | ".join(cell([r["after"][m] for r in runs]) for m in GOLD_METRICS) + " |")
    lines.append("")
    for arm in ARMS:
        runs = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"])
        if runs:
            per_seed = ", ".join(f"{r['seed']}: {r['after']['all_correct']:.3f}" for r in runs)
            lines.append(f"all_correct per seed, {arm}: {per_seed}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="A demo-like YAML; default configs/demo.yaml.")
    parser.add_argument("--seeds", type=int, default=5, help="Seeds per arm.")
    parser.add_argument("--first-seed", type=int, default=0, help="Seeds are first-seed .. first-seed + seeds - 1.")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=1, help="Runs in parallel (processes).")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per run.")
    parser.add_argument("--max-steps", type=int, default=None, help="Override the demo's max_steps.")
    parser.add_argument("--gold-seeds", type=int, default=8, help="Samples per held-out prompt in the gold evaluation.")
    parser.add_argument("--out", default="runs/ablation.jsonl", help="Where to write every run's results, one JSON line each.")
    args = parser.parse_args()

    jobs = [(arm, seed, args.device, args.max_steps, args.threads, args.gold_seeds, args.config) for seed in range(args.first_seed, args.first_seed + args.seeds) for arm in args.arms]
    start = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    # Each finished run is appended at once (JSON lines), so an interrupted ablation keeps what it did.
    with out.open("w") as sink:
        if args.workers > 1:
            with mp.get_context("spawn").Pool(args.workers) as pool:
                finished = pool.imap_unordered(_run, jobs, chunksize=1)
                for result in finished:
                    results.append(result)
                    sink.write(json.dumps(result) + "\n")
                    sink.flush()
        else:
            for job in jobs:
                results.append(_run(job))
                sink.write(json.dumps(results[-1]) + "\n")
                sink.flush()
    print(f"\n{len(results)} runs, {(time.perf_counter() - start) / 60:.1f} min on {args.device}; gold evaluation on the"
          " held-out prompts after training (mean ± std over seeds):\n")
    print(table(results))


if __name__ == "__main__":
    main()
