"""The runs of ``steer-fast reproduce``, phase by phase, planned from the settings and the runs a
results file already holds.

Per task, in order:

1. ``sweep``: ``base`` once, and every method with a grid at each rate of its sweep, at the
   selection seed (the first of ``--seeds``);
2. ``positions``: every method that runs at another's rate (loreft_last) at that method's
   validation-best rate, selection seed;
3. ``joint``: every joint method with each part at its part's validation-best rate, and at the
   paper's single joint rate (2e-4) for reference, selection seed;
4. ``seeds``: the reported setting of each method of ``--repeat-methods`` (its chosen rate; the
   validation-best LoReFT position; a joint method's per-part rates) at every other seed.

A phase's rates come from the phases before it (``selection.py``), so the runner plans each
phase when the one before it has run; before that (the plan printed at the start) a rate not
known yet is None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .adapted import Rate
from .methods import METHODS, Grid, PartRates, SameRateAs
from .results import options_key, rate_key, run_key
from .selection import chosen_variant, family_head, method_rate
from .settings import ReproduceSettings

PHASES: tuple[str, ...] = ("sweep", "positions", "joint", "seeds")


@dataclass(frozen=True)
class PlannedRun:
    """One run to do: its key fields, and the phase that plans it. ``rate`` None for a trained
    method: the rate is chosen by an earlier phase that has not run yet."""

    task: str
    method: str
    seed: int | None
    rate: Rate | None
    phase: str
    options: dict[str, Any] = field(default_factory=dict)

    def key(self) -> tuple:
        """The run's key as ``results.run_key`` gives it for a record."""
        return (self.task, self.method, self.seed, rate_key(self.rate), options_key(self.options))

    @property
    def known(self) -> bool:
        """Whether the rate is known (always for a method that does not train)."""
        return self.rate is not None or not METHODS[self.method].trains


def _sweeps_done(
    settings: ReproduceSettings, runs: list[dict[str, Any]], task: str, method: str
) -> bool:
    """Whether every sweep ``method``'s rate depends on has all its planned runs recorded."""
    rule = METHODS[method].rates
    if isinstance(rule, SameRateAs):
        return _sweeps_done(settings, runs, task, rule.method)
    if isinstance(rule, PartRates):
        return all(_sweeps_done(settings, runs, task, m) for m in (rule.lora, rule.steering))
    recorded = {
        r["learning_rate"]
        for r in runs
        if r["task"] == task and r["method"] == method and r["seed"] == settings.selection_seed
    }
    return set(settings.sweep_rates(method)) <= recorded


def _rate(settings: ReproduceSettings, runs: list[dict[str, Any]], task: str, method: str):
    """``method``'s reported rate once the sweeps it depends on are complete, else None."""
    if not _sweeps_done(settings, runs, task, method):
        return None
    return method_rate(runs, task, method, settings.selection_seed)


def phase_runs(
    settings: ReproduceSettings, runs: list[dict[str, Any]], task: str, phase: str, steps: int
) -> list[PlannedRun]:
    """The runs ``phase`` plans on ``task``, from the ``runs`` already recorded."""
    seed = settings.selection_seed
    planned = []
    for method in settings.selected():
        options = settings.run_options(method.name, steps)

        def add(run_seed, rate, phase_name=phase, name=method.name, run_options=options):
            planned.append(PlannedRun(task, name, run_seed, rate, phase_name, run_options))

        rule = method.rates
        if phase == "sweep" and rule is None:
            add(None, None)
        elif phase == "sweep" and isinstance(rule, Grid):
            for rate in settings.sweep_rates(method.name):
                add(seed, rate)
        elif phase == "positions" and isinstance(rule, SameRateAs):
            add(seed, _rate(settings, runs, task, method.name))
        elif phase == "joint" and isinstance(rule, PartRates):
            add(seed, _rate(settings, runs, task, method.name))
            add(seed, rule.reference)
    if phase == "seeds":
        planned = _repeats(settings, runs, task, steps)
    return planned


def _repeats(
    settings: ReproduceSettings, runs: list[dict[str, Any]], task: str, steps: int
) -> list[PlannedRun]:
    """The reported setting of every repeated method at the seeds after the selection seed; a
    method and its variants at the same rate (loreft, loreft_last) repeat their chosen one
    once."""
    seed = settings.selection_seed
    planned, families = [], []
    for method in settings.selected():
        if not method.trains or not settings.repeated(method.name):
            continue
        name = method.name
        if not isinstance(method.rates, PartRates):
            head = family_head(name)
            if head in families:
                continue
            families.append(head)
            if _sweeps_done(settings, runs, task, head):
                name = chosen_variant(runs, task, head, seed, settings.methods) or head
        rate = _rate(settings, runs, task, name)
        for other in settings.seeds[1:]:
            planned.append(
                PlannedRun(task, name, other, rate, "seeds", settings.run_options(name, steps))
            )
    return planned


def full_plan(
    settings: ReproduceSettings, runs: list[dict[str, Any]], steps: dict[str, int]
) -> list[PlannedRun]:
    """Every run of every phase on every task, as far as ``runs`` tell the rates (``steps``:
    task -> optimizer steps per run)."""
    return [
        run
        for task in settings.tasks
        for phase in PHASES
        for run in phase_runs(settings, runs, task, phase, steps[task])
    ]


def done_keys(runs: list[dict[str, Any]]) -> set[tuple]:
    """The keys of the recorded runs."""
    return {run_key(r) for r in runs}
