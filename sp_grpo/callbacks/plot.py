"""Plot a run's curriculum from its logged metrics: weights, competence and stage over training steps."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from sp_grpo.functional.aspects import ASPECTS

__all__ = ["plot_curriculum"]


def plot_curriculum(metrics_csv: str | Path, path: str | Path, aspects: Sequence[str] | None = None) -> Path:
    """Write a PNG with the reward weights (top) and competence with the stage (bottom) per step.

    Reads the ``curriculum/*`` columns that :class:`~sp_grpo.callbacks.SelfPacedCurriculum` (or
    :class:`~sp_grpo.callbacks.StaticWeights`, weights only) logs, from a
    :class:`~lightning.pytorch.loggers.CSVLogger`'s ``metrics.csv``. A panel whose columns were not
    logged stays empty.

    Args:
        metrics_csv: The logger's ``metrics.csv``.
        path: Output file; parent folders are created.
        aspects: Aspects to draw, in curriculum order; ``None`` draws every aspect with a
            ``curriculum/weight_<aspect>`` column.

    Returns:
        The path written.

    Raises:
        ValueError: If the file has no ``curriculum/weight_<aspect>`` column with a value.
    """
    # Figure + Agg canvas directly: no pyplot global state, and no display needed on servers.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with open(metrics_csv, newline="") as file:
        rows = list(csv.DictReader(file))
    columns = set(rows[0]) if rows else set()
    aspects = [a for a in (aspects or ASPECTS) if f"curriculum/weight_{a}" in columns]
    # Other rows hold other metrics (validation, epoch ends): keep the curriculum's.
    rows = [row for row in rows if aspects and row[f"curriculum/weight_{aspects[0]}"] not in ("", None)]
    if not rows:
        raise ValueError(
            f"{str(metrics_csv)!r} has no logged `curriculum/weight_<aspect>` values: plot the metrics.csv of a run "
            "with SelfPacedCurriculum or StaticWeights in `trainer.callbacks` and a CSVLogger."
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = [int(float(row["step"])) for row in rows]

    def series(name: str) -> list[float] | None:
        return [float(row[name]) for row in rows] if name in columns else None

    figure = Figure(figsize=(7.0, 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    for aspect in aspects:
        top.plot(steps, series(f"curriculum/weight_{aspect}"), label=aspect)
        if (values := series(f"curriculum/competence_{aspect}")) is not None:
            bottom.plot(steps, values, label=aspect)
    top.set_ylabel("reward weight")
    top.set_ylim(-0.02, 1.02)
    top.legend(loc="upper right")
    bottom.set_ylabel("competence")
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_xlabel("step")
    if (stages := series("curriculum/stage")) is not None:
        stage_axis = bottom.twinx()
        stage_axis.step(steps, stages, where="post", color="black", linestyle=":")
        stage_axis.set_ylabel("stage (dotted)")
        stage_axis.set_yticks(range(len(aspects)))
    figure.savefig(path, dpi=100)
    return path
