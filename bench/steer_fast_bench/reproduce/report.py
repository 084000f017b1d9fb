"""report.md and the PNG plots of ``steer-fast reproduce``, from results.json alone.

The learning rate of a method with a grid is chosen per (task, seed) on the validation split
(the highest accuracy; the smaller rate on a tie); the test accuracy of that run is reported.
With several seeds the accuracy is their mean. Every accuracy carries its binomial standard
error sqrt(p (1 - p) / n), n the number of test items (seeds on the same items do not shrink the
item-sampling noise); a difference between two methods carries sqrt(SE_a^2 + SE_b^2), and is
called a difference only beyond 2 of those standard errors. Methods are listed in a fixed
order, never ranked.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .evaluate import binomial_stderr
from .methods import METHOD_NAMES, METHODS

NOISE_SE = 2.0  # differences within this many standard errors of the difference are noise
REFERENCE = "full"

# The paper's claims (Adila, Cooper et al., "Weight Updates as Activation Shifts: A Principled
# Framework for Steering", arXiv 2603.00425, abstract), each as (claim, method, compared with,
# kind). "better": the method beats the others; "close": within a point of them.
CLAIMS = (
    (
        "post-block steering is within 0.2-0.9 points of full fine-tuning on average across tasks "
        "and models",
        "steer_silu",
        ("full",),
        "close",
    ),
    ("post-block steering outperforms LoRA", "steer_silu", ("lora",), "better"),
    ("post-block steering outperforms ReFT (LoReFT)", "steer_silu", ("loreft",), "better"),
    (
        "joint adaptation often surpasses weight and activation updates in isolation "
        "(here: the better of LoRA and post-block steering on the task)",
        "joint_orth",
        ("lora", "steer_silu"),
        "better",
    ),
)
PAPER_TRAINABLE_PERCENT = 0.04


@dataclass
class Summary:
    """One method on one task, over its seeds (the chosen learning rate of each)."""

    method: str
    runs: list[dict[str, Any]]
    grid: dict[int | None, list[tuple[float, float | None, float]]]

    @property
    def accuracy(self) -> float:
        return statistics.fmean(r["test"]["accuracy"] for r in self.runs)

    @property
    def n(self) -> int:
        return self.runs[0]["test"]["total"]

    @property
    def stderr(self) -> float:
        return binomial_stderr(self.accuracy, self.n)

    @property
    def trainable_percent(self) -> float:
        return self.runs[0]["trainable_percent"]

    def train_median(self, key: str) -> float | None:
        values = [
            r["train"][key] for r in self.runs if r.get("train") and r["train"].get(key) is not None
        ]
        return statistics.median(values) if values else None


def choose(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of a grid with the best validation accuracy (the smaller learning rate on a tie);
    the only run when there is no grid."""
    if len(runs) == 1:
        return runs[0]
    return max(
        sorted(runs, key=lambda r: r["learning_rate"]),
        key=lambda r: (r.get("validation") or {"accuracy": -1.0})["accuracy"],
    )


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Summary]]:
    """task -> method -> Summary, tasks and methods in the order they appear in results."""
    grouped: dict[str, dict[str, dict[Any, list[dict]]]] = {}
    for run in results.get("runs", []):
        by_seed = grouped.setdefault(run["task"], {}).setdefault(run["method"], {})
        by_seed.setdefault(run["seed"], []).append(run)
    table: dict[str, dict[str, Summary]] = {}
    for task, methods in grouped.items():
        ordered = sorted(methods, key=lambda m: METHOD_NAMES.index(m) if m in METHODS else 99)
        table[task] = {}
        for method in ordered:
            by_seed = methods[method]
            grid = {
                seed: [
                    (
                        r["learning_rate"],
                        (r.get("validation") or {}).get("accuracy"),
                        r["test"]["accuracy"],
                    )
                    for r in sorted(runs, key=lambda r: r["learning_rate"] or 0.0)
                ]
                for seed, runs in sorted(by_seed.items(), key=lambda kv: kv[0] or 0)
            }
            chosen = [
                choose(runs) for _, runs in sorted(by_seed.items(), key=lambda kv: kv[0] or 0)
            ]
            table[task][method] = Summary(method, chosen, grid)
    return table


def difference(a: Summary, b: Summary) -> tuple[float, float]:
    """(accuracy of a - accuracy of b, the standard error of that difference)."""
    return a.accuracy - b.accuracy, math.hypot(a.stderr, b.stderr)


def is_noise(delta: float, stderr: float) -> bool:
    """Whether a difference is within ``NOISE_SE`` standard errors of zero."""
    return not abs(delta) > NOISE_SE * stderr


def _points(value: float) -> str:
    return f"{100 * value:.1f}"


def _signed(value: float) -> str:
    return f"{100 * value:+.1f}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 2**20:.0f} MiB" if value < 2**30 else f"{value / 2**30:.2f} GiB"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def noise_points(n: int) -> float:
    """2 standard errors of a difference between two accuracies near 50% on n items, in
    points."""
    return 100 * NOISE_SE * math.sqrt(2 * 0.25 / n) if n else math.nan


def claim_verdict(method: Summary | None, others: list[Summary | None], kind: str) -> str:
    """The measured result next to one claim, in words, without ranking on noise."""
    if method is None or any(o is None for o in others) or not others:
        return "not run"
    best = max(others, key=lambda o: o.accuracy)
    delta, se = difference(method, best)
    name = " / ".join(o.method for o in others)
    measured = f"{method.method} - {best.method}: {_signed(delta)} +- {_points(se)} points"
    if is_noise(delta, se):
        if kind == "close":
            return (
                f"{measured}: within noise (2 SE = {_points(NOISE_SE * se)} points), so "
                "consistent with the claim, but too few test items to resolve a 1-point gap"
            )
        return f"{measured}: within noise, no difference shown (neither better than {name})"
    if delta > 0:
        verdict = "above, beyond noise" if kind == "close" else "higher beyond noise: as claimed"
        return f"{measured}: {verdict}"
    return f"{measured}: lower beyond noise: not reproduced here"


def build_report(results: dict[str, Any]) -> str:
    """The markdown report of a results dict (results.json)."""
    table = summarize(results)
    tasks = list(table)
    methods = [m for m in METHOD_NAMES if any(m in table[t] for t in tasks)]
    settings = results.get("settings", {})
    lines = ["# steer-fast reproduce", ""]
    lines += _setup_lines(results)
    n_items = sorted({s.n for t in tasks for s in table[t].values()})
    lines += [
        "",
        "## How to read the numbers",
        "",
        "Accuracy is on the test split, in points (%), +- one binomial standard error "
        "sqrt(p(1-p)/n) over the n test items. A difference between two methods has the "
        "standard error sqrt(SE_a^2 + SE_b^2); differences within "
        f"{NOISE_SE:g} standard errors of the difference are noise"
        + (
            f" (with {n_items[0]} test items, about {noise_points(n_items[0]):.0f} points "
            "near 50% accuracy)"
            if n_items
            else ""
        )
        + ". Methods are listed in a fixed order; they are not ranked, and a difference "
        "marked (noise) says nothing about which method is better.",
        "",
    ]
    if not tasks:
        return "\n".join(lines + ["No runs yet.", ""])
    lines += [
        "## Accuracy",
        "",
        "| method | trainable | " + " | ".join(tasks) + " |",
        "|---|---|" + "---|" * len(tasks),
    ]
    for method in methods:
        cells = [_accuracy_cell(table[t].get(method)) for t in tasks]
        percent = next(table[t][method].trainable_percent for t in tasks if method in table[t])
        lines.append(f"| {method} | {percent:.3g}% | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Difference to full fine-tuning ({REFERENCE})",
        "",
        "Points, +- the standard error of the difference; (noise): within "
        f"{NOISE_SE:g} standard errors.",
        "",
        "| method | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for method in methods:
        if method == REFERENCE:
            continue
        cells = []
        for task in tasks:
            a, b = table[task].get(method), table[task].get(REFERENCE)
            if a is None or b is None:
                cells.append("-")
                continue
            delta, se = difference(a, b)
            cells.append(
                f"{_signed(delta)} +- {_points(se)}" + (" (noise)" if is_noise(delta, se) else "")
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## The paper's claims, as measured here",
        "",
        "| the paper | measured here, per task |",
        "|---|---|",
    ]
    for claim, method, others, kind in CLAIMS:
        verdicts = [
            f"{t}: " + claim_verdict(table[t].get(method), [table[t].get(o) for o in others], kind)
            for t in tasks
        ]
        lines.append(f"| {claim} | " + "<br>".join(verdicts) + " |")
    steer = [table[t]["steer_silu"].trainable_percent for t in tasks if "steer_silu" in table[t]]
    lines.append(
        f"| post-block steering trains {PAPER_TRAINABLE_PERCENT}% of the parameters "
        "(models of 1B-8B parameters) | "
        + (
            f"{steer[0]:.3g}% of this model's {results.get('model_parameters', 0):,} "
            "(the share grows as the model shrinks: 2 r d per layer)"
            if steer
            else "not run"
        )
        + " |"
    )
    lines += [
        "",
        "## Cost and learning rates",
        "",
        "Seconds per optimizer step (median; effective batch "
        f"{settings.get('batch_size')} x {settings.get('grad_accum')}), peak memory of one "
        "step, and the learning rate: the grid with each rate's validation accuracy, and "
        "the chosen rate.",
        "",
        "| task | method | s/step | peak memory | learning rate |",
        "|---|---|---|---|---|",
    ]
    for task in tasks:
        for method, summary in table[task].items():
            seconds = _seconds(summary.train_median("seconds_per_step"))
            memory = _bytes(summary.train_median("peak_memory_bytes"))
            lines.append(f"| {task} | {method} | {seconds} | {memory} | {_grid_cell(summary)} |")
    lines += _notes(table)
    skipped = results.get("skipped") or {}
    if skipped:
        lines += ["", "## Skipped", ""]
        lines += [f"- {name}: {reason}" for name, reason in skipped.items()]
    lines += ["", "## Methods", ""]
    lines += [
        f"- `{m}`: {METHODS[m].description}; learning rate schedule {METHODS[m].schedule}, "
        f"warmup ratio {METHODS[m].warmup_ratio:g}"
        for m in methods
        if m in METHODS
    ]
    lines += ["", "Plots: [accuracy.png](accuracy.png), [loss.png](loss.png).", ""]
    return "\n".join(lines)


def _notes(table: dict[str, dict[str, Summary]]) -> list[str]:
    """What a reader needs to know to read a row right."""
    notes = []
    idle = sorted(
        task
        for task, methods in table.items()
        if "joint_orth" in methods
        and all(
            (r.get("train") or {}).get("projection_steps") == [0]
            for r in methods["joint_orth"].runs
        )
    )
    if idle:
        notes.append(
            f"- joint_orth ({', '.join(idle)}): the paper's constraint projects at the "
            "start of steps 0, 100, 200, ...; at step 0 LoRA's B is still zero, so in "
            "runs of at most 100 steps it never changes the adapter and joint_orth "
            "trains exactly as joint_plain does."
        )
    return ["", "## Notes", "", *notes] if notes else []


def _accuracy_cell(summary: Summary | None) -> str:
    if summary is None:
        return "-"
    cell = f"{_points(summary.accuracy)} +- {_points(summary.stderr)}"
    if len(summary.runs) > 1:
        cell += " (seeds " + ", ".join(_points(r["test"]["accuracy"]) for r in summary.runs) + ")"
    return cell


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _grid_cell(summary: Summary) -> str:
    parts = []
    for seed, rows in summary.grid.items():
        if rows[0][0] is None:
            return "-"
        chosen = next(r["learning_rate"] for r in summary.runs if r["seed"] == seed)
        if len(rows) == 1:
            parts.append(_rate(chosen))
            continue
        grid = ", ".join(
            f"{_rate(rate)}: {'-' if val is None else _points(val)}" for rate, val, _ in rows
        )
        parts.append(f"seed {seed}: {{{grid}}} -> {_rate(chosen)}")
    return "; ".join(dict.fromkeys(parts))  # one fixed rate over several seeds: shown once


def _setup_lines(results: dict[str, Any]) -> list[str]:
    settings = results.get("settings", {})
    env = results.get("environment", {})
    versions = env.get("versions", {})
    machine = env.get("machine", {})
    runs = results.get("runs", [])
    steps = sorted({r["train"]["steps"] for r in runs if r.get("train")})
    lines = [
        f"Model `{settings.get('model')}` ({results.get('model_parameters', 0):,} "
        "parameters, fp32), "
        + ", ".join(f"{k} {v}" for k, v in settings.items() if k != "model")
        + ".",
        f"Optimizer steps per run: {', '.join(map(str, steps)) or '-'}; "
        f"runs: {len(runs)}, {sum(r.get('seconds', 0) for r in runs) / 60:.0f} minutes.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".",
        f"Machine: {machine.get('processor')}, {machine.get('cpu_count')} cores, "
        f"{machine.get('torch_threads')} torch threads"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
        + ".",
        "",
    ]
    lines += [f"    {command}" for command in results.get("commands", [])]
    lines += ["", "| task | train | validation | test |", "|---|---|---|---|"]
    lines += [
        f"| {t} | {v['train']} | {v['validation']} | {v['test']} |"
        for t, v in results.get("tasks", {}).items()
    ]
    return lines


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """accuracy.png (accuracy per method and task, +- 1 SE) and loss.png (the training loss of
    each method's chosen run, first seed, per task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarize(results)
    tasks = list(table)
    methods = [m for m in METHOD_NAMES if any(m in table[t] for t in tasks)]
    files = []
    figure, axes = plt.subplots(
        figsize=(max(6.0, 1.2 * len(tasks) * max(1, len(methods)) / 3), 4.5)
    )
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        xs = [t + (i - (len(methods) - 1) / 2) * width for t in range(len(tasks))]
        values = [table[t][method] if method in table[t] else None for t in tasks]
        axes.bar(
            [x for x, v in zip(xs, values) if v],
            [100 * v.accuracy for v in values if v],
            width,
            yerr=[100 * v.stderr for v in values if v],
            capsize=2,
            label=method,
        )
    axes.set_xticks(range(len(tasks)), tasks)
    axes.set_ylabel("test accuracy (%), +- 1 SE")
    axes.set_ylim(0, 100)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    files.append(out / "accuracy.png")
    figure.savefig(files[-1], dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(
        1, max(1, len(tasks)), figsize=(5 * max(1, len(tasks)), 4), squeeze=False
    )
    for axis, task in zip(axes[0], tasks):
        for method, summary in table[task].items():
            run = summary.runs[0]
            if run.get("train"):
                losses = [math.nan if v is None else v for v in run["train"]["losses"]]
                axis.plot(
                    range(1, len(losses) + 1),
                    losses,
                    label=f"{method} (lr {_rate(run['learning_rate'])})",
                )
        axis.set_title(task)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("training loss")
        axis.set_yscale("log")
        if axis.get_lines():
            axis.legend(fontsize=7)
    figure.tight_layout()
    files.append(out / "loss.png")
    figure.savefig(files[-1], dpi=120)
    plt.close(figure)
    return files


def write_report(results: dict[str, Any], out: str | Path) -> list[Path]:
    """Write report.md and the plots into ``out``; returns the files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text(build_report(results), encoding="utf-8")
    return [path, *write_plots(results, out)]
