"""The selection rule of ``steer-fast reproduce``, read from the runs of a results file alone.

One rule for every trained method: at the selection seed, the run of the method's sweep with
the best validation accuracy gives its rate (the smaller rate on a tie; a sweep of one run gives
that run's rate even without a validation score, as format-1 files have). A method that runs at
another's rate (``SameRateAs``: loreft_last at loreft's) takes that rate, and among a method and
the variants at its rate the validation-best is the one reported (the ReFT position choice; on a
tie the method swept first). A joint method takes each part's rate from the method that trains
that part alone. The runner plans its later phases with these functions, and the report reads
the chosen runs with them, so both apply the same rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .adapted import Rate
from .methods import METHODS, Grid, PartRates, SameRateAs

Record = dict[str, Any]


def _validation(record: Record) -> float | None:
    return (record.get("validation") or {}).get("accuracy")


def sweep_runs(runs: Iterable[Record], task: str, method: str, seed: int) -> list[Record]:
    """The runs of ``method``'s sweep on ``task``: at ``seed``, one rate for the whole model,
    sorted by rate."""
    found = [
        r
        for r in runs
        if r["task"] == task
        and r["method"] == method
        and r["seed"] == seed
        and isinstance(r["learning_rate"], (int, float))
    ]
    return sorted(found, key=lambda r: r["learning_rate"])


def best_of(candidates: list[Record]) -> Record | None:
    """The validation-best record (the first on a tie: the smaller rate of a sorted sweep);
    the only one when none has a validation score; None when there is no choice to make."""
    scored = [r for r in candidates if _validation(r) is not None]
    if not scored:
        return candidates[0] if len(candidates) == 1 else None
    return max(scored, key=_validation)  # max keeps the first of equals


def chosen_rate(runs: list[Record], task: str, method: str, seed: int) -> float | None:
    """``method``'s validation-best rate on ``task`` (None while it has no sweep run)."""
    rule = METHODS[method].rates if method in METHODS else None
    if isinstance(rule, SameRateAs):
        return chosen_rate(runs, task, rule.method, seed)
    best = best_of(sweep_runs(runs, task, method, seed))
    return None if best is None else float(best["learning_rate"])


def method_rate(runs: list[Record], task: str, method: str, seed: int) -> Rate | None:
    """The rate of ``method``'s reported runs: its chosen rate, or for a joint method the
    chosen rate of each part's method ({"lora": .., "steering": ..}); None while unknown."""
    rule = METHODS[method].rates
    if isinstance(rule, PartRates):
        lora = chosen_rate(runs, task, rule.lora, seed)
        steering = chosen_rate(runs, task, rule.steering, seed)
        if lora is None or steering is None:
            return None
        return {"lora": lora, "steering": steering}
    if isinstance(rule, (Grid, SameRateAs)):
        return chosen_rate(runs, task, method, seed)
    return None


def variants(method: str, selected: Iterable[str]) -> list[str]:
    """``method`` and the selected methods that run at its rate (``SameRateAs``), in order."""
    return [method] + [
        name
        for name in selected
        if isinstance(METHODS[name].rates, SameRateAs) and METHODS[name].rates.method == method
    ]


def family_head(method: str) -> str:
    """The method whose rate ``method`` runs at, or ``method`` itself."""
    rule = METHODS[method].rates
    return rule.method if isinstance(rule, SameRateAs) else method


def chosen_variant(
    runs: list[Record],
    task: str,
    method: str,
    seed: int,
    among: Iterable[str] | None = None,
) -> str | None:
    """Among ``method``'s family (its head and the methods at the head's rate, limited to
    ``among`` when given) that have a run at that rate and ``seed``, the validation-best (the
    head on a tie); None while the head's rate is unknown."""
    head = family_head(method)
    rate = chosen_rate(runs, task, head, seed)
    if rate is None:
        return None
    recorded = sorted({r["method"] for r in runs if r["task"] == task and r["method"] in METHODS})
    names = variants(head, [m for m in recorded if among is None or m in among])
    at_rate = []
    for name in names:
        found = [r for r in sweep_runs(runs, task, name, seed) if r["learning_rate"] == rate]
        at_rate += found[:1]
    best = best_of(at_rate)
    return head if best is None else best["method"]


def grid_sizes(runs: list[Record], task: str, seed: int) -> dict[str, int]:
    """How many rates each swept method (``Grid``) tried on ``task`` at ``seed``, counting the
    runs with a validation score (those the choice is made among)."""
    sizes = {}
    for method in sorted({r["method"] for r in runs if r["task"] == task}):
        if method in METHODS and isinstance(METHODS[method].rates, Grid):
            sweep = sweep_runs(runs, task, method, seed)
            sizes[method] = len([r for r in sweep if _validation(r) is not None]) or len(sweep)
    return sizes
