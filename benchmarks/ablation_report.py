"""Tables and figures of the reward-weighting ablation (``curriculum_ablation.py``) from its JSON lines.

Every run is one JSON line: ``arm``, ``seed``, ``start``, ``regime``, ``before`` / ``after`` (held-out gold
metrics), ``curve`` (step -> held-out gold, when evaluated during training), ``val_after``
(validation gold) and ``train`` (each aspect's mean training reward over the first and last
iterations). Arms are compared on the same seeds: each arm's paired difference from
``static_equal`` per seed, with a 95 % Student-t interval over seeds, for all-three-correct and for
cleanliness; a run "hacked" when its training reward rose while one of them fell (:func:`is_hacked`).
Per block, the figures are the curves of both metrics over iterations and the two hacking scatters.

    python benchmarks/ablation_report.py benchmarks/results/shapes/abl_weak100_kl0_cpu.jsonl --out DIR [--readout late]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

GOLD_METRICS = ("colour_acc", "shape_acc", "direction_acc", "all_correct", "cleanliness", "flicker")
ARM_ORDER = (
    "static_equal", "semantic_only", "paper_literal", "paper_calibrated", "self_paced", "self_paced_strict", "static_attr",
    "static_equal_sum",
)  # fmt: skip
BASELINE = "static_equal"
_LABELS = {"all_correct": "all-three-correct", "cleanliness": "cleanliness"}

# Two-sided 95 % quantiles of Student's t (degrees of freedom 1..30), from the standard table; the
# normal 1.960 beyond. Written out so the report needs no SciPy.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(dof: int) -> float:
    """The 97.5 % quantile of Student's t with ``dof`` degrees of freedom (1.960 above 30)."""
    if dof < 1:
        raise ValueError(f"a t interval needs at least 2 paired values (dof {dof}).")
    return _T975[dof - 1] if dof <= len(_T975) else 1.960


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and the 95 % t interval ``(mean, low, high)``; with one value the interval is the value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def arms_in(runs: Iterable[dict]) -> list[str]:
    present = {r["arm"] for r in runs}
    return [a for a in ARM_ORDER if a in present] + sorted(present - set(ARM_ORDER))


def train_gain(run: dict) -> float:
    """Change of the mean training reward over the aspects, last iterations minus first ones."""
    first, last = run["train"]["first"], run["train"]["last"]
    return statistics.fmean(last[a] - first[a] for a in first)


#: Held-out metrics whose fall under a rising training reward counts as hacking, with the fall that
#: counts: any fall of all-three-correct; a fall of cleanliness (clean frames, what the fidelity
#: reward stands in for) of more than 0.01, twice its spread over seeds at one checkpoint.
HACKING_MARGINS = {"all_correct": 0.0, "cleanliness": 0.01}


def is_hacked(run: dict, metric: str = "all_correct") -> bool:
    """The training reward went up while held-out ``metric`` fell by more than its margin in :data:`HACKING_MARGINS`."""
    return train_gain(run) > 0 and run["after"][metric] < run["before"][metric] - HACKING_MARGINS.get(metric, 0.0)


def late_mean(run: dict, metric: str = "all_correct") -> float:
    """Mean of the held-out ``metric`` over the evaluations in the second half of training (step > last / 2).

    One evaluation of 16 prompts x 8 seeds reads all-three-correct with a binomial standard error of
    about 0.04, as large as the gaps between arms; averaging the late evaluations steadies the readout.
    Runs without a curve fall back to the final evaluation.
    """
    curve = {int(step): values for step, values in run.get("curve", {}).items()}
    if metric not in next(iter(curve.values()), {}):
        return run["after"][metric]
    last = max(curve)
    late = [values[metric] for step, values in curve.items() if step > last / 2]
    return statistics.fmean(late)


def outcome(run: dict, metric: str = "all_correct", readout: str = "final") -> float:
    """``run``'s held-out ``metric``: ``"final"`` (after training) or ``"late"`` (:func:`late_mean`)."""
    if readout not in ("final", "late"):
        raise ValueError(f"`readout` ({readout!r}) must be 'final' or 'late'.")
    return run["after"][metric] if readout == "final" else late_mean(run, metric)


def paired_differences(runs: Sequence[dict], arm: str, metric: str = "all_correct", readout: str = "final") -> list[float]:
    """Per seed, ``arm`` minus ``static_equal`` (:func:`outcome`); seeds missing from either arm are left out."""
    base = {r["seed"]: outcome(r, metric, readout) for r in runs if r["arm"] == BASELINE}
    return [
        outcome(r, metric, readout) - base[r["seed"]]
        for r in sorted(runs, key=lambda r: r["seed"])
        if r["arm"] == arm and r["seed"] in base
    ]


def table(runs: Sequence[dict], readout: str = "final") -> str:
    """Markdown: per arm, held-out gold (mean ± std over seeds; ``readout`` as in :func:`outcome`), the
    paired differences of all-three-correct and of cleanliness from ``static_equal`` with their 95 %
    intervals, and the runs that hacked each (:func:`is_hacked`)."""

    def cell(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.3f} ± {spread:.3f}"

    def delta(arm: str, metric: str) -> str:
        diffs = paired_differences(runs, arm, metric, readout)
        if arm == BASELINE or not diffs:
            return "—"
        mean, low, high = mean_interval(diffs)
        return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] (n={len(diffs)})"

    paired = list(HACKING_MARGINS)  # the metrics with a paired column and a hacking count
    header = ["arm", "all_correct", "cleanliness", "colour", "shape", "direction"]
    header += [f"Δ {m} vs {BASELINE} [95 % CI]" for m in paired] + [f"hacked: {m}" for m in paired]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    metrics = ("all_correct", "cleanliness", "colour_acc", "shape_acc", "direction_acc")
    before = " | ".join(cell([r["before"][m] for r in runs]) for m in metrics)
    lines.append(f"| pretrained (before) | {before} |" + " |" * (2 * len(paired)))
    for arm in arms_in(runs):
        arm_runs = [r for r in runs if r["arm"] == arm]
        trained = all("train" in r for r in arm_runs)
        hacked = [str(sum(is_hacked(r, m) for r in arm_runs)) if trained else "—" for m in paired]
        cells = " | ".join(cell([outcome(r, m, readout) for r in arm_runs]) for m in metrics)
        deltas = " | ".join(delta(arm, m) for m in paired)
        lines.append(f"| {arm} (n={len(arm_runs)}) | {cells} | {deltas} | {' | '.join(hacked)} |")
    for metric in paired:
        lines.append("")
        for arm in arms_in(runs):
            arm_runs = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
            values = ", ".join(f"{r['seed']}: {outcome(r, metric, readout):.3f}" for r in arm_runs)
            lines.append(f"{metric} per seed, {arm}: {values}")
    return "\n".join(lines)


def _axis(size: tuple[float, float]):
    # Figure + Agg canvas directly: no pyplot global state, and no display needed on servers.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def plot_curves(runs: Sequence[dict], path: str | Path, title: str = "", metric: str = "all_correct") -> Path:
    """Held-out ``metric`` over training steps per arm: mean over seeds and a min-max band."""
    figure, axis = _axis((7.0, 4.2))
    for arm in arms_in(runs):
        curves = [{int(s): v[metric] for s, v in r["curve"].items()} for r in runs if r["arm"] == arm and r.get("curve")]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = [[c[s] for c in curves] for s in steps]
        line = axis.plot(steps, [statistics.fmean(v) for v in values], label=f"{arm} (n={len(curves)})")[0]
        axis.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.15)
    axis.set_xlabel("GRPO iteration")
    axis.set_ylabel(f"held-out {_LABELS.get(metric, metric)}")
    axis.set_title(title or "mean over seeds, band: min to max")
    axis.legend(loc="best", fontsize=8)
    return _save(figure, path)


def plot_hacking(runs: Sequence[dict], path: str | Path, title: str = "", metric: str = "all_correct") -> Path:
    """Each run: change of the training reward (x) against change of held-out ``metric`` (y).

    The lower-right quadrant is reward hacking: the training reward rose while the gold fell (by more
    than the metric's margin in :data:`HACKING_MARGINS`, drawn as a dashed line).
    """
    figure, axis = _axis((6.0, 4.5))
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.axvline(0.0, color="grey", linewidth=0.8)
    if HACKING_MARGINS.get(metric, 0.0):
        axis.axhline(-HACKING_MARGINS[metric], color="grey", linewidth=0.8, linestyle="--")
    for arm in arms_in(runs):
        arm_runs = [r for r in runs if r["arm"] == arm and "train" in r]
        axis.scatter(
            [train_gain(r) for r in arm_runs],
            [r["after"][metric] - r["before"][metric] for r in arm_runs],
            label=f"{arm}: {sum(is_hacked(r, metric) for r in arm_runs)} of {len(arm_runs)} hacked",
            s=18,
        )
    axis.set_xlabel("training reward change (mean of aspects, last - first iterations)")
    axis.set_ylabel(f"held-out {_LABELS.get(metric, metric)} change")
    axis.set_title(title or "lower right: reward up, gold down (hacking)")
    axis.legend(loc="best", fontsize=8)
    return _save(figure, path)


def load(paths: Iterable[str | Path], fill: dict[str, str] | None = None) -> list[dict]:
    """Every run of the JSON-lines files; ``fill`` supplies fields that older files lack (e.g. the regime)."""
    runs = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines() if line.strip()]
    return [{**(fill or {}), **run} for run in runs]


def report(runs: Sequence[dict], out: str | Path | None = None, title: str = "", readout: str = "final") -> str:
    """Print-ready tables, one per (start, regime) block; with ``out``, the two figures per block too."""
    blocks: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        blocks[(run.get("start", "shipped"), run.get("regime", ""))].append(run)
    parts = []
    for (start, regime), block in sorted(blocks.items()):
        name = f"start {start}" + (f", {regime}" if regime else "")
        label = "" if readout == "final" else " (late readout: mean of the evaluations in the second half of training)"
        parts.append(f"### {name}{label}\n\n{table(block, readout)}")
        if out is not None:
            stem = f"{start}_{regime}".strip("_").replace(" ", "").replace("=", "")
            for metric in HACKING_MARGINS:  # all_correct keeps the plain file names
                prefix = "" if metric == "all_correct" else f"{metric}_"
                label = _LABELS[metric]
                plot_curves(block, Path(out) / f"curves_{prefix}{stem}.png", f"{title}{name}: held-out {label}", metric)
                plot_hacking(block, Path(out) / f"hacking_{prefix}{stem}.png", f"{title}{name}: training reward vs {label}", metric)
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="JSON-lines files written by curriculum_ablation.py.")
    parser.add_argument("--out", default=None, help="Folder for the figures; none written without it.")
    parser.add_argument("--fill", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Fields for runs that lack them, e.g. regime=kl0.1 for files written before runs recorded it.")
    parser.add_argument("--readout", default="final", choices=["final", "late"],
                        help="The held-out outcome: after training, or the mean of the second half's evaluations.")
    parser.add_argument("--arms", nargs="*", default=None, help="Only these arms (default: every arm in the files).")
    args = parser.parse_args()
    fill = dict(item.split("=", 1) for item in args.fill)
    runs = [run for run in load(args.results, fill) if args.arms is None or run["arm"] in args.arms]
    print(report(runs, args.out, readout=args.readout))


if __name__ == "__main__":
    main()
