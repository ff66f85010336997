"""Reward weighting on the shapes world: static weights, the paper's v4 weighting and the curriculum, at equal compute.

Arms, each a ``configs/demo.yaml`` run (same model, sampler, optimizer, steps, seeds) that differs
only in what sets the reward weights:

* ``static_equal``: :class:`~sp_grpo.callbacks.StaticWeights`, fidelity = temporal = semantic
  (the baseline every other arm is paired with);
* ``semantic_only``: :class:`~sp_grpo.callbacks.StaticWeights`, semantic alone (a fixed-reward
  text-alignment pipeline);
* ``paper_literal``: :class:`~sp_grpo.callbacks.GroupRewardWeighting` with the paper's literal
  setting (tau 0.75, beta 0.3, slope 1) and its aggregation (``sum_then_normalize``);
* ``paper_calibrated``: the same with tau calibrated from the history of group means (median of
  the last 50 batches after 10);
* ``self_paced``: :class:`~sp_grpo.callbacks.SelfPacedCurriculum` with the demo's settings;
* ``static_equal_sum`` (not run by default): equal weights with the paper's aggregation, to tell
  the paper's weights from its aggregation;
* ``self_paced_strict`` (not run by default): the curriculum with growing strictness (the graded
  shapes rewards start coarse: semantic credit as the mean of colour, shape and direction, the
  fidelity tolerance loose; each tightens by 0.5 when its aspect becomes competent);
* ``static_attr`` (not run by default): equal static weights on the coarse semantic reward (the mean
  of per-attribute credit), the fair static baseline for ``self_paced_strict``.

Results record ``competence: "v3"`` for curriculum arms run with the redesigned competence averaged
over steps (``persistence``, default 0.9); ``"v2"`` rows had the redesigned competence without that
average (a gain over each prompt's own first score that must clear its standard error); rows
without the key used the first design (the batch mean against the run's start).

``--start weak`` runs from ``sp_grpo/toy/checkpoint_weak/`` (an earlier checkpoint of the
pre-training, see the README) instead of the shipped one. ``--set key=value`` overrides a value
of the config by its dotted path (e.g. ``--set model.kl_coef=0``), so a regime needs no copied
config file. Each finished run is appended as one JSON line to ``--out``; the tables (paired
differences from ``static_equal`` with 95 % intervals) and figures come from
``ablation_report.py``. Objects are built in Python from the YAML's values (not through the CLI)::

    python benchmarks/curriculum_ablation.py --start weak --set model.kl_coef=0.1 --seeds 8 --workers 2
    python benchmarks/curriculum_ablation.py --start weak --seeds 8 --workers 8 --device cuda   # a GPU

The README's 8-seed block used a cheaper screen recipe (2-step window, 150 iterations, 16 gold seeds;
about 3.7 min per run on one core), and ``--resume`` to continue an interrupted block::

    python benchmarks/curriculum_ablation.py --seeds 8 --workers 2 --max-steps 150 --set model.sampler.train_steps=window \
        --gold-seeds 16 --gold-every 50 --val-seeds 0 --out benchmarks/results/shapes/abl_window150_shipped_kl0.1_cpu.jsonl --resume

The weak-start blocks (README) used the same window with fewer iterations, 100 at ``kl_coef: 0`` and
60 at 0.1 (gold every 30), to fit a CPU session::

    python benchmarks/curriculum_ablation.py --start weak --arms static_equal semantic_only paper_literal paper_calibrated \
        self_paced self_paced_strict --seeds 8 --workers 2 --max-steps 100 --set model.sampler.train_steps=window \
        --set model.kl_coef=0 --gold-seeds 16 --gold-every 50 --val-seeds 0 \
        --out benchmarks/results/shapes/abl_weak100_kl0_cpu.jsonl --resume
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import yaml
from ablation_report import load, report

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
ARMS = ("static_equal", "semantic_only", "paper_literal", "paper_calibrated", "self_paced")
EXTRA_ARMS = ("static_equal_sum", "self_paced_strict", "static_attr")
#: Iterations averaged at the start and at the end of training for the training-reward change.
TRAIN_WINDOW = 20


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The YAML at ``path`` (default ``configs/demo.yaml``) with ``key.sub=value`` overrides (values parsed as YAML).

    Every section on the way must exist; the last key may be new (a setting the YAML leaves at its default).
    """
    config = yaml.safe_load(Path(path or CONFIG).read_text())
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"`--set {item}` must be key=value with a dotted key, e.g. `--set model.kl_coef=0`.")
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise KeyError(f"`--set {item}`: the config has no section {part!r} on the way to {key!r}.")
            node = node[part]
        # A key the YAML leaves at its default may be added; a misspelt one fails when the object is built.
        node[leaf] = _yaml_value(raw)
    return config


def _yaml_value(raw: str) -> Any:
    """A YAML value, with numbers such as ``1e-3`` (a string to YAML 1.1, which wants ``1.0e-3``) as floats."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _curriculum_args(config: dict) -> dict:
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("SelfPacedCurriculum"):
            return dict(callback.get("init_args", {}))
    raise KeyError("the config has no SelfPacedCurriculum callback to compare against.")


def _weights_callback(arm: str, config: dict) -> tuple[Any, dict]:
    """The arm's weighting callback and the module settings it needs."""
    from sp_grpo.callbacks import GroupRewardWeighting, SelfPacedCurriculum, StaticWeights

    equal = {"fidelity": 1.0, "temporal": 1.0, "semantic": 1.0}
    paper = {"aggregation": "sum_then_normalize"}  # the paper sums the weighted rewards, then standardises
    arms = {
        "static_equal": lambda: (StaticWeights(equal), {}),
        "semantic_only": lambda: (StaticWeights({"semantic": 1.0}), {}),
        "paper_literal": lambda: (GroupRewardWeighting(thresholds=0.75, beta=0.3, slope=1.0), paper),
        "paper_calibrated": lambda: (GroupRewardWeighting(calibrate=True, beta=0.3, slope=1.0), paper),
        "self_paced": lambda: (SelfPacedCurriculum(**{**_curriculum_args(config), "plot_filename": None}), {}),
        "static_equal_sum": lambda: (StaticWeights(equal), paper),
        "self_paced_strict": lambda: (
            SelfPacedCurriculum(
                **{**_curriculum_args(config), "plot_filename": None, "strictness_step": 0.5, "strictness_start": 0.0}
            ),
            {},
        ),
        "static_attr": lambda: (StaticWeights(equal), {}),
    }
    if arm not in arms:
        raise ValueError(f"unknown arm {arm!r}; choose from {list(arms)}.")
    return arms[arm]()


def _training_rewards():
    import lightning.pytorch as pl

    class TrainingRewards(pl.Callback):
        """Each iteration's mean training reward per aspect."""

        def __init__(self) -> None:
            self.rows: list[dict[str, float]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.rows.append({a: float(v.float().mean()) for a, v in outputs["aspect_rewards"].items()})

        def summary(self) -> dict:
            n = min(TRAIN_WINDOW, max(1, len(self.rows) // 2))
            mean = lambda rows: {a: sum(r[a] for r in rows) / len(rows) for a in rows[0]}  # noqa: E731
            return {"first": mean(self.rows[:n]), "last": mean(self.rows[-n:]), "iterations": len(self.rows)}

    return TrainingRewards()


def run_arm(
    arm: str,
    seed: int,
    device: str = "cpu",
    max_steps: int | None = None,
    threads: int = 1,
    gold_seeds: int = 8,
    config_path: str | None = None,
    *,
    start: str = "shipped",
    overrides: list[str] = (),
    gold_every: int = 0,
    val_seeds: int = 0,
) -> dict:
    """Train one arm with one seed; returns the held-out gold before, after and over steps.

    Args:
        arm: One of :data:`ARMS` or :data:`EXTRA_ARMS`.
        seed: Seed of the rollout noise and data order (the same seed in every arm).
        device: ``"cpu"`` or ``"cuda"``.
        max_steps: Override the config's ``trainer.max_steps``.
        threads: Torch threads of this process.
        gold_seeds: Samples per held-out prompt in each gold evaluation.
        config_path: A demo-like YAML; default ``configs/demo.yaml``.
        start: ``"shipped"`` (the packaged checkpoint) or ``"weak"`` (``sp_grpo/toy/checkpoint_weak``).
        overrides: ``key.sub=value`` strings applied to the config.
        gold_every: Also evaluate the held-out gold every this many iterations (for the curves).
        val_seeds: Samples per validation prompt evaluated after training (0: none); settings are
            chosen on these, never on the held-out numbers.
    """
    import lightning.pytorch as pl
    import torch

    from sp_grpo.data.prompts import PromptDataModule
    from sp_grpo.module import SelfPacedGRPO
    from sp_grpo.rewards.mixture import RewardSet
    from sp_grpo.rollout import DenoisingConfig
    from sp_grpo.toy import (
        WEAK_CHECKPOINT_DIR,
        GoldEvaluation,
        ShapesFidelity,
        ShapesSemantic,
        ShapesTemporal,
        ShapesWanPolicy,
    )
    from sp_grpo.toy.world import prompts_for_split

    if start not in ("shipped", "weak"):
        raise ValueError(f"`start` ({start!r}) must be 'shipped' or 'weak'.")
    torch.set_num_threads(threads)
    config = load_config(config_path, list(overrides))
    weights, module_settings = _weights_callback(arm, config)
    model_args = {k: v for k, v in config["model"].items() if k not in ("policy", "rewards", "sampler")}
    policy_args = dict(config["model"]["policy"].get("init_args", {}))
    if start == "weak":
        policy_args["pretrained_path"] = str(WEAK_CHECKPOINT_DIR)
    policy = ShapesWanPolicy(**policy_args)
    # The coarse semantic reward (mean of per-attribute credit) for the static baseline of the strictness arm.
    semantic = ShapesSemantic(strictness=0.0 if arm == "static_attr" else 1.0)
    rewards = RewardSet({"fidelity": ShapesFidelity(), "temporal": ShapesTemporal(), "semantic": semantic})
    pl.seed_everything(seed, verbose=False)
    module = SelfPacedGRPO(
        policy, rewards, sampler=DenoisingConfig(**config["model"]["sampler"]), **{**model_args, **module_settings, "seed": seed}
    )
    data = PromptDataModule(prompts=config["data"]["prompts"], batch_size=config["data"]["batch_size"], seed=seed)
    gold = GoldEvaluation(seeds=gold_seeds, every_n_steps=gold_every, filename=None, verbose=False)
    training = _training_rewards()
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
        callbacks=[weights, gold, training],
    )
    begin = time.perf_counter()
    trainer.fit(module, datamodule=data)
    steps = sorted(gold.results)
    result = {
        "arm": arm,
        "seed": seed,
        "start": start,
        "regime": f"kl{model_args.get('kl_coef', 0.0):g}",
        "overrides": list(overrides),
        "minutes": (time.perf_counter() - begin) / 60,
        "before": gold.results[steps[0]],
        "after": gold.results[steps[-1]],
        "curve": {str(s): dict(gold.results[s]) for s in steps},
        "max_steps": trainer.max_steps,
        "gold_seeds": gold_seeds,
        "train": training.summary(),
    }
    if arm.startswith("self_paced"):
        result["competence"] = "v3"
        result["final_weights"] = dict(module.reward_weights)
        result["final_strictness"] = weights.current_strictness()
    if val_seeds:
        result["val_after"] = GoldEvaluation(prompts=prompts_for_split("val"), seeds=val_seeds, filename=None, verbose=False).evaluate(module)
    return result


def run_key(arm: str, seed: int, start: str, overrides: list[str], max_steps: int) -> tuple:
    """What identifies a run for ``--resume``: arm, seed, start, overrides and iterations."""
    return arm, int(seed), start, tuple(overrides), int(max_steps)


def finished_runs(path: Path) -> set[tuple]:
    """The :func:`run_key` of every run in the JSON-lines file at ``path`` that records its ``max_steps``."""
    if not path.exists():
        return set()
    return {run_key(r["arm"], r["seed"], r["start"], r["overrides"], r["max_steps"]) for r in load([path]) if "max_steps" in r}


def _run(job: dict) -> dict:
    result = run_arm(**job)
    print(
        f"{result['arm']:>16} seed {result['seed']} ({result['start']}, {result['regime']}): all_correct "
        f"{result['before']['all_correct']:.3f} -> {result['after']['all_correct']:.3f}, cleanliness "
        f"{result['after']['cleanliness']:.3f} ({result['minutes']:.1f} min)",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="A demo-like YAML; default configs/demo.yaml.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config value by dotted key, e.g. model.kl_coef=0 (repeatable).")
    parser.add_argument("--start", default="shipped", choices=["shipped", "weak"], help="Pre-trained checkpoint to start from.")
    parser.add_argument("--seeds", type=int, default=8, help="Seeds per arm (the same seeds in every arm).")
    parser.add_argument("--first-seed", type=int, default=0, help="Seeds are first-seed .. first-seed + seeds - 1.")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS + EXTRA_ARMS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=1, help="Runs in parallel (processes).")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per run.")
    parser.add_argument("--max-steps", type=int, default=None, help="Override the config's max_steps.")
    parser.add_argument("--gold-seeds", type=int, default=8, help="Samples per held-out prompt in each gold evaluation.")
    parser.add_argument("--gold-every", type=int, default=50, help="Iterations between held-out evaluations for the curves (0: before and after only).")
    parser.add_argument("--val-seeds", type=int, default=4, help="Samples per validation prompt after training (0: none).")
    parser.add_argument("--out", default="runs/ablation.jsonl", help="Every run's results, one JSON line each (appended).")
    parser.add_argument("--resume", action="store_true",
                        help="Skip the runs --out already holds (same arm, seed, start, overrides and iterations).")
    parser.add_argument("--figures", default=None, help="Folder for the curves and hacking figures; default: beside --out.")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)  # a bad --set fails here, before any run starts

    common = dict(device=args.device, max_steps=args.max_steps, threads=args.threads, gold_seeds=args.gold_seeds,
                  config_path=args.config, start=args.start, overrides=args.overrides, gold_every=args.gold_every,
                  val_seeds=args.val_seeds)
    jobs = [dict(arm=arm, seed=seed, **common) for seed in range(args.first_seed, args.first_seed + args.seeds) for arm in args.arms]
    out = Path(args.out)
    if args.resume:
        done = finished_runs(out)
        jobs = [job for job in jobs if run_key(job["arm"], job["seed"], args.start, args.overrides, args.max_steps or config["trainer"]["max_steps"]) not in done]
        print(f"--resume: {len(done)} runs already in {out}; {len(jobs)} to run.", flush=True)
    begin = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    # Each finished run is appended at once, so an interrupted ablation keeps what it did.
    with out.open("a") as sink:
        if args.workers > 1:
            with mp.get_context("spawn").Pool(args.workers) as pool:
                for result in pool.imap_unordered(_run, jobs, chunksize=1):
                    results.append(result)
                    sink.write(json.dumps(result) + "\n")
                    sink.flush()
        else:
            for job in jobs:
                results.append(_run(job))
                sink.write(json.dumps(results[-1]) + "\n")
                sink.flush()
    print(f"\n{len(results)} runs, {(time.perf_counter() - begin) / 60:.1f} min on {args.device}; held-out gold after"
          " training, every run in --out (mean ± std over seeds), paired differences from static_equal with 95 % intervals:\n")
    print(report(load([out]), args.figures or out.parent))  # every run in the file, earlier ones included


if __name__ == "__main__":
    main()
