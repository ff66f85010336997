"""Plot a curriculum history: weights, competence and stage over training steps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_curriculum(history: Sequence[dict], aspects: Sequence[str], path: str | Path) -> Path:
    """Write a PNG with the reward weights (top) and competence with the stage (bottom) per step.

    Args:
        history: One record per update, each with ``"step"``, ``"weights"`` and ``"competence"``
            (dicts aspect -> float) and ``"stage"`` (int).
        aspects: Aspects to draw, in curriculum order.
        path: Output file; parent folders are created.

    Returns:
        The path written.
    """
    # Figure + Agg canvas directly: no pyplot global state, and no display needed on servers.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = [record["step"] for record in history]
    figure = Figure(figsize=(7.0, 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    for aspect in aspects:
        top.plot(steps, [record["weights"][aspect] for record in history], label=aspect)
        bottom.plot(steps, [record["competence"][aspect] for record in history], label=aspect)
    top.set_ylabel("reward weight")
    top.set_ylim(-0.02, 1.02)
    top.legend(loc="upper right")
    bottom.set_ylabel("competence")
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_xlabel("step")
    stage_axis = bottom.twinx()
    stage_axis.step(steps, [record["stage"] for record in history], where="post", color="black", linestyle=":")
    stage_axis.set_ylabel("stage (dotted)")
    stage_axis.set_yticks(range(len(aspects)))
    figure.savefig(path, dpi=100)
    return path
