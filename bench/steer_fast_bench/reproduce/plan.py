"""What ``steer-fast reproduce`` tells the user before it trains: the plan (tasks, methods, rates,
seeds, steps, phase by phase) and an estimate of its duration from measured step times.

A method's seconds per optimizer step come from the runs of that method already in the results
file (their median), or else from a probe on a copy of the model: two optimizer steps, the
second one timed (a run's first step pays one-time costs and takes several times as long).
The seconds per evaluated item come from the recorded evaluations, or from one probed
generation batch of the base model. A run
costs steps x seconds per step plus its evaluated items (validation, test and the validation
curve's points) x seconds per item.
"""

from __future__ import annotations

import copy
import functools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..benchmark.progress import format_duration
from .methods import METHODS
from .protocol import PHASES, PlannedRun
from .settings import ReproduceSettings

PROBE_RATE = 1e-4  # any rate: a probed step is timed, not kept
PROBE_STEPS = 2  # the last is timed: the first pays one-time costs


@dataclass
class Costs:
    """Measured costs: seconds per optimizer step by method and seconds per evaluated item, each
    with where it came from ("recorded", "probed")."""

    step_seconds: dict[str, tuple[float, str]] = field(default_factory=dict)
    item_seconds: tuple[float, str] | None = None


def recorded_costs(runs: list[dict[str, Any]]) -> Costs:
    """The costs the recorded runs measured (medians over runs)."""
    costs = Costs()
    by_method: dict[str, list[float]] = {}
    items: list[float] = []
    for run in runs:
        if (run.get("train") or {}).get("seconds_per_step"):
            by_method.setdefault(run["method"], []).append(run["train"]["seconds_per_step"])
        test = run.get("test") or {}
        if test.get("total") and test.get("seconds"):
            items.append(test["seconds"] / test["total"])
    costs.step_seconds = {m: (statistics.median(v), "recorded") for m, v in by_method.items()}
    if items:
        costs.item_seconds = (statistics.median(items), "recorded")
    return costs


def probe_costs(prepared, costs: Costs, methods: list[str], say: Callable[[str], None]) -> None:
    """Fill in ``costs`` for ``methods`` without a recorded step time (the second of two
    optimizer steps each, on the first task's data) and the seconds per item (one generation
    batch), if missing."""
    import transformers

    from .data import collate
    from .evaluate import evaluate
    from .train import TrainSettings, train

    settings, task = prepared.settings, prepared.settings.tasks[0]
    pad = prepared.tokenizer.pad_token_id
    for name in methods:
        if name in costs.step_seconds or not METHODS[name].trains:
            continue
        say(f"  probing the step time of {name} ...")
        transformers.set_seed(0)
        adapted = METHODS[name].build(
            copy.deepcopy(prepared.model), pad, **settings.run_options(name, PROBE_STEPS)
        )
        probe = TrainSettings(
            steps=PROBE_STEPS,
            batch_size=settings.batch_size,
            grad_accum=settings.grad_accum,
            learning_rate=PROBE_RATE,
            schedule="constant",
            warmup_ratio=0.0,
            seed=0,
            measure_memory=False,
        )
        trained = train(
            adapted,
            prepared.rows[task],
            functools.partial(collate, pad_token_id=pad),
            probe,
            progress=False,
        )
        costs.step_seconds[name] = (trained.step_seconds[-1], "probed")
        del adapted
    if costs.item_seconds is None:
        examples = prepared.splits[task].test[: settings.eval_batch_size]
        base = METHODS["base"].build(prepared.model, pad)
        start = time.perf_counter()
        evaluate(base, examples, prepared.tokenizer, batch_size=len(examples), progress=False)
        costs.item_seconds = ((time.perf_counter() - start) / len(examples), "probed")


def load_warning() -> str | None:
    """A warning when other work competes for the cores (load average above half of them): the
    probed step times, and so the estimate, then include the competition."""
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except (OSError, AttributeError):
        return None
    if load <= cores / 2:
        return None
    return (
        f"  warning: load average {load:.1f} on {cores} cores: other work competes for the "
        "cores, so the probed step times and the estimate are longer than on an idle machine"
    )


def run_seconds(
    run: PlannedRun, settings: ReproduceSettings, sizes: dict[str, dict], steps: int, costs: Costs
) -> float | None:
    """The expected seconds of one run (None when a cost is unknown)."""
    items = sizes[run.task]["test"]
    seconds = 0.0
    if METHODS[run.method].trains:
        step = costs.step_seconds.get(run.method)
        if step is None:
            return None
        seconds += steps * step[0]
        curve = (steps - 1) // settings.validation_every if settings.validation_every else 0
        items += sizes[run.task]["validation"] * (1 + curve)
    if costs.item_seconds is None:
        return None
    return seconds + items * costs.item_seconds[0]


def _rate_text(run: PlannedRun) -> str:
    if run.rate is None:
        return "(rate chosen by the sweep)"
    if isinstance(run.rate, dict):
        return f"lora {run.rate['lora']:g} + steering {run.rate['steering']:g}"
    return f"{run.rate:g}"


def describe_plan(
    settings: ReproduceSettings,
    planned: list[PlannedRun],
    done: set[tuple],
    steps: dict[str, int],
    sizes: dict[str, dict],
    costs: Costs,
    unavailable: dict[str, str],
) -> str:
    """The plan as text: settings, per task and phase the methods with their rates and seeds
    (done runs counted), the grid sizes, and the estimate."""
    lines = [
        "steer-fast reproduce: the plan",
        f"  model {settings.model}; tasks {', '.join(settings.tasks)}; methods "
        f"{', '.join(settings.methods)}",
        f"  {', '.join(f'{t} {steps[t]} steps' for t in settings.tasks)} of "
        f"{settings.batch_size} x {settings.grad_accum}; seeds "
        f"{', '.join(map(str, settings.seeds))}"
        f" (rates chosen on validation at seed {settings.selection_seed})",
        "  each task: "
        + ", ".join(
            f"{t} train {s['train']} / validation {s['validation']} / test {s['test']}"
            for t, s in sizes.items()
        ),
    ]
    todo = [r for r in planned if r.key() not in done and r.method not in unavailable]
    for task in settings.tasks:
        lines.append(f"  {task}:")
        for phase in PHASES:
            runs = [r for r in planned if r.task == task and r.phase == phase]
            if not runs:
                continue
            by_method: dict[str, list[PlannedRun]] = {}
            for run in runs:
                by_method.setdefault(run.method, []).append(run)
            parts = []
            for method, method_runs in by_method.items():
                rates = ", ".join(dict.fromkeys(_rate_text(r) for r in method_runs))
                seeds = sorted({r.seed for r in method_runs if r.seed is not None})
                finished = sum(r.key() in done for r in method_runs)
                options = method_runs[0].options
                text = f"{method} {rates}" if METHODS[method].trains else method
                if phase == "seeds":
                    text += f" at seeds {', '.join(map(str, seeds))}"
                if options:
                    text += " (" + ", ".join(f"{k} {v}" for k, v in options.items()) + ")"
                if finished:
                    text += f" [{finished} of {len(method_runs)} done]"
                if method in unavailable:
                    text += f" [skipped: {unavailable[method]}]"
                parts.append(text)
            lines.append(f"    {phase}: " + "; ".join(parts))
    sizes_by_method = {
        m: len(settings.sweep_rates(m)) for m in settings.methods if settings.sweep_rates(m)
    }
    if len(set(sizes_by_method.values())) > 1:
        lines.append(
            "  note: the sweeps differ in size ("
            + ", ".join(f"{m} {n}" for m, n in sizes_by_method.items())
            + " rates): a method with fewer rates is tuned less, and the report says so"
        )
    seconds = [run_seconds(r, settings, sizes, steps[r.task], costs) for r in todo]
    known = [s for s in seconds if s is not None]
    step_text = ", ".join(
        f"{m} {s:.2f} ({source})"
        for m, (s, source) in costs.step_seconds.items()
        if m in settings.methods
    )
    lines.append(
        f"  runs: {len(planned)} planned, {len(planned) - len(todo)} done or skipped, "
        f"{len(todo)} to run"
    )
    if todo:
        total = format_duration(sum(known)) if known else "unknown"
        lines.append(
            f"  estimated time: about {total}"
            + (
                f" ({len(seconds) - len(known)} runs without a measured cost)"
                if None in seconds
                else ""
            )
            + (f"; seconds per step: {step_text}" if step_text else "")
            + (
                f"; {costs.item_seconds[0]:.3f} s per evaluated item ({costs.item_seconds[1]})"
                if costs.item_seconds
                else ""
            )
        )
        warning = load_warning()
        if warning and any(source == "probed" for _, source in costs.step_seconds.values()):
            lines.append(warning)
    return "\n".join(lines)
