"""The PNG plots of ``steer-fast reproduce``, from results.json alone: accuracy.png (each reported
row's accuracy per task, +- its standard error) and loss.png (the training loss of each row's
first seed, per task)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .summary import summarize


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Write accuracy.png and loss.png into ``out``; returns them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarize(results)
    tasks = list(table)
    labels = list(dict.fromkeys(row.label for rows in table.values() for row in rows))
    files = []
    figure, axes = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) * max(1, len(labels)) / 3), 4.5))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        xs, ys, errors = [], [], []
        for t, task in enumerate(tasks):
            row = next((r for r in table[task] if r.label == label), None)
            if row is not None:
                xs.append(t + (i - (len(labels) - 1) / 2) * width)
                ys.append(100 * row.accuracy)
                errors.append(100 * row.stderr)
        axes.bar(xs, ys, width, yerr=errors, capsize=2, label=label)
    axes.set_xticks(range(len(tasks)), tasks)
    axes.set_ylabel("test accuracy (%), +- 1 SE")
    axes.set_ylim(0, 100)
    if labels:
        axes.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    files.append(out / "accuracy.png")
    figure.savefig(files[-1], dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(
        1, max(1, len(tasks)), figsize=(5 * max(1, len(tasks)), 4), squeeze=False
    )
    for axis, task in zip(axes[0], tasks):
        for row in table[task]:
            run = row.runs[0]
            if run.get("train"):
                losses = [math.nan if v is None else v for v in run["train"]["losses"]]
                axis.plot(range(1, len(losses) + 1), losses, label=row.label)
        axis.set_title(task)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("training loss")
        axis.set_yscale("log")
        if axis.get_lines():
            axis.legend(fontsize=6)
    figure.tight_layout()
    files.append(out / "loss.png")
    figure.savefig(files[-1], dpi=120)
    plt.close(figure)
    return files
