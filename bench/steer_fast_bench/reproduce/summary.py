"""The numbers of the report of ``steer-fast reproduce``, from results.json alone: one ``Row`` per
reported setting of a method on a task, with its accuracy over seeds and its standard errors.

A row's runs are the method's runs at the setting the selection rule chose (``selection.py``),
one per seed. Its accuracy is the mean test accuracy over those seeds. It carries two standard
errors: the binomial one, sqrt(p (1 - p) / n) over the n test items (more seeds on the same
items do not shrink it), and the seed one, the standard deviation over seeds / sqrt(seeds) (the
training noise; unknown with one seed). Their combination sqrt(binomial^2 + seed^2) is the
row's standard error; a difference between two rows has sqrt(SE_a^2 + SE_b^2) and is noise
unless it exceeds ``NOISE_SE`` of those.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from .adapted import Rate
from .evaluate import binomial_stderr
from .methods import METHOD_NAMES, METHODS, Grid, PartRates, SameRateAs
from .results import options_key, rate_key
from .selection import chosen_variant, family_head, method_rate, sweep_runs, variants

NOISE_SE = 2.0  # differences within this many standard errors of the difference are noise


@dataclass
class Row:
    """One reported setting of one method on one task.

    Attributes:
        task, method: what was run.
        label: the row's name in the report ("joint_orth at 0.0002" for a reference row).
        rate: the learning rate of its runs (None for base).
        how: how the rate was chosen, in words.
        runs: its runs, one per seed, by seed.
        chosen: False for a variant that lost the validation choice of its family (loreft vs
            loreft_last) and for a reference row: shown, but not the method's reported result.
    """

    task: str
    method: str
    label: str
    rate: Rate | None
    how: str
    runs: list[dict[str, Any]]
    chosen: bool = True
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def seeds(self) -> list[Any]:
        return [r["seed"] for r in self.runs]

    @property
    def accuracy(self) -> float:
        return statistics.fmean(r["test"]["accuracy"] for r in self.runs)

    @property
    def n(self) -> int:
        return self.runs[0]["test"]["total"]

    @property
    def binomial_stderr(self) -> float:
        return binomial_stderr(self.accuracy, self.n)

    @property
    def seed_stderr(self) -> float | None:
        """The standard error of the mean over seeds (None with one seed)."""
        values = [r["test"]["accuracy"] for r in self.runs]
        return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None

    @property
    def stderr(self) -> float:
        return math.hypot(self.binomial_stderr, self.seed_stderr or 0.0)

    @property
    def trainable_percent(self) -> float:
        return self.runs[0].get("trainable_percent", 0.0)

    def train_median(self, key: str) -> float | None:
        values = [
            r["train"][key] for r in self.runs if r.get("train") and r["train"].get(key) is not None
        ]
        return statistics.median(values) if values else None


def selection_seed(results: dict[str, Any]) -> int:
    """The seed the file's rates are chosen at."""
    return results.get("settings", {}).get("selection_seed", 0)


def _at(runs: list[dict], rate: Rate | None) -> dict[tuple, list[dict]]:
    """The runs at ``rate``, grouped by options, each group one run per seed (the first)."""
    groups: dict[tuple, dict[Any, dict]] = {}
    for run in runs:
        if rate_key(run["learning_rate"]) == rate_key(rate):
            by_seed = groups.setdefault(options_key(run.get("options")), {})
            by_seed.setdefault(run["seed"], run)
    return {
        key: [by_seed[s] for s in sorted(by_seed, key=lambda s: -1 if s is None else s)]
        for key, by_seed in groups.items()
    }


def _order(method: str) -> int:
    return METHOD_NAMES.index(method) if method in METHODS else len(METHOD_NAMES)


def task_rows(results: dict[str, Any], task: str) -> list[Row]:
    """The rows of ``task``, methods in ``METHOD_NAMES`` order."""
    all_runs = results.get("runs", [])
    seed = selection_seed(results)
    runs = [r for r in all_runs if r["task"] == task]
    names = sorted({r["method"] for r in runs}, key=_order)
    rows = []
    for name in names:
        method_runs = [r for r in runs if r["method"] == name]
        rule = METHODS[name].rates if name in METHODS else None
        settings: list[tuple[str, Rate | None, str, bool]] = []
        if rule is None:
            settings.append((name, None, "-", True))
        elif isinstance(rule, Grid):
            points = len(sweep_runs(runs, task, name, seed))
            rate = method_rate(runs, task, name, seed)
            settings.append((name, rate, f"validation-best of {points}", True))
        elif isinstance(rule, SameRateAs):
            settings.append((name, method_rate(runs, task, name, seed), f"{rule.method}'s", True))
        elif isinstance(rule, PartRates):
            parts = method_rate(runs, task, name, seed)
            how = f"LoRA at {rule.lora}'s, steering at {rule.steering}'s"
            settings.append((name, parts, how, True))
            reference = f"{name} at {rule.reference:g}"
            settings.append((reference, rule.reference, "the paper's joint rate", False))
        for label, rate, how, chosen in settings:
            if rate is None and rule is not None:
                continue
            for options, group in _at(method_runs, rate).items():
                shown = label + "".join(f", {k} {v}" for k, v in options)
                rows.append(Row(task, name, shown, rate, how, group, chosen, dict(options)))
    for row in rows:  # the ReFT position choice: only the validation-best variant is reported
        head = family_head(row.method)
        if len(variants(head, names)) > 1:
            row.chosen = row.chosen and chosen_variant(runs, task, head, seed) == row.method
    return rows


def summarize(results: dict[str, Any]) -> dict[str, list[Row]]:
    """task -> its rows, tasks in the order they appear in results."""
    tasks = list(dict.fromkeys(r["task"] for r in results.get("runs", [])))
    return {task: task_rows(results, task) for task in tasks}


def reported(rows: list[Row], method: str) -> Row | None:
    """The row that stands for ``method`` in comparisons: its chosen row; for a family (loreft,
    loreft_last) the validation-chosen variant's row."""
    head = family_head(method)
    return next((r for r in rows if r.chosen and family_head(r.method) == head), None)


def difference(a: Row, b: Row) -> tuple[float, float]:
    """(accuracy of a - accuracy of b, the standard error of that difference)."""
    return a.accuracy - b.accuracy, math.hypot(a.stderr, b.stderr)


def is_noise(delta: float, stderr: float) -> bool:
    """Whether a difference is within ``NOISE_SE`` standard errors of zero."""
    return not abs(delta) > NOISE_SE * stderr


def noise_points(n: int) -> float:
    """2 standard errors of a difference between two accuracies near 50% on n items, in
    points."""
    return 100 * NOISE_SE * math.sqrt(2 * 0.25 / n) if n else math.nan


def plateau(curve: list[dict[str, Any]]) -> str:
    """Whether a validation curve has levelled off, in words: the last point against the first
    point of the run's second half, with the binomial standard error of their difference."""
    if len(curve) < 2:
        return "too few points to tell"
    last = curve[-1]
    second_half = [p for p in curve[:-1] if p["step"] >= last["step"] / 2] or curve[-2:-1]
    first = second_half[0]
    delta = last["accuracy"] - first["accuracy"]
    se = math.hypot(first["stderr"], last["stderr"])
    span = f"steps {first['step']}-{last['step']}: {100 * delta:+.1f} +- {100 * se:.1f} points"
    if is_noise(delta, se):
        return f"levelled off (within noise over {span})"
    return f"not levelled off ({'still rising' if delta > 0 else 'falling'} over {span})"
