"""The loop of ``steer-fast reproduce``: per task, the phases of ``protocol.py`` (sweep,
positions, joint, seeds), each planned from the runs recorded so far.

Every run starts from a fresh copy of the base model, is seeded (``transformers.set_seed``)
before its method is built, trains (``train.py``), is evaluated on the validation split (every
trained run: the selection rule reads it; with ``validation_every``, also during training) and
on the test split (``evaluate.py``), and is appended to ``results.json``, which is rewritten
atomically after each run. A second call with the same ``--out`` skips the runs the file already
holds (by task, method, seed, learning rate and options), so an interrupted reproduction picks up
where it stopped; settings that change results (model, sizes, steps, batch, data, selection
seed) must match the file's, or the call is refused. Before anything trains, the plan and an
estimate of its duration are printed (``plan.py``).
"""

from __future__ import annotations

import copy
import functools
import gc
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .methods import METHODS
from .plan import describe_plan, probe_costs, recorded_costs
from .protocol import PHASES, PlannedRun, done_keys, full_plan, phase_runs
from .results import (
    RESULTS_FILE,
    environment,
    fingerprint,
    load_results,
    write_json_atomic,
)
from .settings import ReproduceSettings


@dataclass
class Prepared:
    """What a reproduction needs before it trains: the tasks' splits and encoded training rows,
    the model, the results file to extend."""

    settings: ReproduceSettings
    splits: dict[str, Any]
    rows: dict[str, list[dict[str, list[int]]]]
    model: Any
    tokenizer: Any
    results: dict[str, Any]
    out: Path


def prepare(
    settings: ReproduceSettings,
    *,
    model=None,
    tokenizer=None,
    overwrite: bool = False,
    command: Sequence[str] | None = None,
) -> Prepared:
    """Build the tasks, load the model (unless given) and open the results file: every check
    that can fail on bad input (ValueError) happens here, before anything trains."""
    from .models import load_model_and_tokenizer
    from .tasks import TASK_NAMES, load_task, make_task

    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} exists and is not a folder")
    results = load_results(out, settings, overwrite)
    splits = {}
    for task in settings.tasks:
        if task in TASK_NAMES:
            splits[task] = make_task(
                task,
                train_size=settings.train_size,
                validation_size=settings.validation_size,
                test_size=settings.test_size,
                seed=settings.data_seed,
                max_tokens=settings.listops_max_tokens if task == "listops" else None,
            )
        else:
            splits[task] = load_task(
                task,
                train_size=settings.train_size,
                validation_size=settings.validation_size,
                test_size=settings.test_size,
                seed=settings.data_seed,
            )
        stored = results["tasks"].get(task)
        if stored is not None and stored["fingerprint"] != fingerprint(splits[task]):
            raise ValueError(
                f"tasks: the data of {task} differs from the data in "
                f"{out / RESULTS_FILE}; use another --out or --overwrite"
            )
    if model is None or tokenizer is None:
        model, tokenizer = load_model_and_tokenizer(settings.model)
    if tokenizer.pad_token_id is None:
        raise ValueError("model: the tokenizer has no pad token")
    from .data import encode_example

    rows = {
        task: [encode_example(e, tokenizer, settings.max_length) for e in task_splits.train]
        for task, task_splits in splits.items()
    }
    if settings.threads is not None:
        import torch

        torch.set_num_threads(settings.threads)
    results["commands"].append(shlex.join(command) if command is not None else shlex.join(sys.argv))
    results["environment"] = environment()
    results["model_parameters"] = sum(p.numel() for p in model.parameters())
    for task, task_splits in splits.items():
        results["tasks"][task] = {
            "train": len(task_splits.train),
            "validation": len(task_splits.validation),
            "test": len(task_splits.test),
            "fingerprint": fingerprint(task_splits),
        }
    return Prepared(settings, splits, rows, model, tokenizer, results, out)


@dataclass
class ReproduceRun:
    """A finished reproduction: the results, the files written, the wall time, the runs done
    now and those the file already held."""

    results: dict[str, Any]
    files: list[Path]
    seconds: float
    ran: int
    skipped_runs: int


def _steps(prepared: Prepared) -> dict[str, int]:
    return {
        task: prepared.settings.total_steps(len(splits.train))
        for task, splits in prepared.splits.items()
    }


def plan_text(prepared: Prepared, *, probe: bool = True, say: Callable[[str], None] = print) -> str:
    """The plan and its estimate (``plan.describe_plan``); with ``probe``, the methods without
    a recorded step time are probed first (two optimizer steps each)."""
    settings, runs = prepared.settings, prepared.results["runs"]
    steps = _steps(prepared)
    planned = full_plan(settings, runs, steps)
    done = done_keys(runs)
    unavailable = {m.name: r for m in settings.selected() if (r := m.unavailable_reason())}
    costs = recorded_costs(runs)
    todo = sorted(
        {r.method for r in planned if r.key() not in done and r.method not in unavailable}
    )
    if probe and todo:
        probe_costs(prepared, costs, todo, say)
    return describe_plan(
        settings, planned, done, steps, prepared.results["tasks"], costs, unavailable
    )


def execute(
    prepared: Prepared, *, progress: bool = True, show_plan: bool = True, probe: bool = True
) -> ReproduceRun:
    """Print the plan, then run every planned run the results file does not hold yet, phase by
    phase, saving after each; then write the report and plots. Runs whose rate is still unknown
    when their phase comes (a method they depend on was skipped) are left out, with a message."""
    from .report import write_report

    start = time.perf_counter()
    settings, results = prepared.settings, prepared.results
    say = functools.partial(print, file=sys.stderr, flush=True)
    if show_plan:
        say(plan_text(prepared, probe=probe, say=say))
    path = prepared.out / RESULTS_FILE
    unavailable = {m.name: r for m in settings.selected() if (r := m.unavailable_reason())}
    results["skipped"] = dict(unavailable)
    for name, reason in unavailable.items():
        say(f"steer-fast reproduce: skipping {name}: {reason}")
    steps = _steps(prepared)
    planned_before = full_plan(settings, results["runs"], steps)
    already = len([r for r in planned_before if r.key() in done_keys(results["runs"])])
    ran = 0
    bar = _bar(len(planned_before) - already, progress)
    try:
        for task in settings.tasks:
            for phase in PHASES:
                done = done_keys(results["runs"])
                for run in phase_runs(settings, results["runs"], task, phase, steps[task]):
                    if run.key() in done or run.method in unavailable:
                        continue
                    if not run.known:
                        say(
                            f"steer-fast reproduce: {task} {run.method} ({phase}) left out: "
                            "the rate it runs at was not chosen (a method it needs did not run)"
                        )
                        continue
                    record = run_one(prepared, run, progress=progress)
                    results["runs"].append(record)
                    prepared.out.mkdir(parents=True, exist_ok=True)
                    write_json_atomic(path, results)
                    ran += 1
                    _log(bar, _summary_line(record))
    finally:
        if bar is not None:
            bar.close()
    files = ([path] if path.exists() else []) + write_report(results, prepared.out)
    return ReproduceRun(results, files, time.perf_counter() - start, ran, already)


def run_one(prepared: Prepared, run: PlannedRun, *, progress: bool = True) -> dict[str, Any]:
    """One run on a fresh copy of the model: build, train, evaluate; returns its record."""
    import transformers

    from .data import collate
    from .evaluate import evaluate
    from .train import TrainSettings, train

    settings, splits = prepared.settings, prepared.splits[run.task]
    method = METHODS[run.method]
    label = f"{run.task} {run.method}" + (
        "" if run.seed is None else f" seed {run.seed} lr {_rate_text(run.rate)}"
    )
    started = time.time()
    transformers.set_seed(0 if run.seed is None else run.seed)
    model = copy.deepcopy(prepared.model)
    pad = prepared.tokenizer.pad_token_id
    adapted = method.build(model, pad, **run.options)
    record: dict[str, Any] = {
        "task": run.task,
        "method": run.method,
        "seed": run.seed,
        "learning_rate": run.rate,
        "options": dict(run.options),
        "trainable_parameters": adapted.trainable_parameters,
        "model_parameters": prepared.results["model_parameters"],
        "details": adapted.details,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
    }
    record["trainable_percent"] = (
        100.0 * record["trainable_parameters"] / record["model_parameters"]
    )

    def score(split: str, examples) -> dict[str, Any]:
        return evaluate(
            adapted,
            examples,
            prepared.tokenizer,
            batch_size=settings.eval_batch_size,
            progress=progress,
            description=f"{label} {split}",
        ).to_dict()

    try:
        record["train"] = None
        if method.trains:
            steps = settings.total_steps(len(splits.train))
            curve: list[dict[str, Any]] = []

            def after_step(done: int) -> None:
                every = settings.validation_every
                if every and done % every == 0 and done < steps:
                    curve.append(
                        {"step": done, **_curve_point(score("validation", splits.validation))}
                    )

            train_settings = TrainSettings(
                steps=steps,
                batch_size=settings.batch_size,
                grad_accum=settings.grad_accum,
                learning_rate=run.rate,
                schedule=method.schedule,
                warmup_ratio=method.warmup_ratio,
                seed=run.seed,
                measure_memory=settings.measure_memory,
            )
            trained = train(
                adapted,
                prepared.rows[run.task],
                functools.partial(collate, pad_token_id=pad),
                train_settings,
                progress=progress,
                description=label,
                after_step=after_step if settings.validation_every else None,
            )
            record["train"] = {
                "steps": steps,
                "schedule": method.schedule,
                "warmup_ratio": method.warmup_ratio,
                "epochs": trained.epochs,
                "losses": trained.losses,
                "learning_rates": trained.learning_rates,
                "step_seconds": trained.step_seconds,
                "seconds_per_step": trained.seconds_per_step,
                "peak_memory_bytes": trained.peak_memory_bytes,
                "seconds": sum(trained.step_seconds),
            }
            if adapted.summary is not None:
                record["train"].update(adapted.summary())
            record["validation"] = score("validation", splits.validation)
            if settings.validation_every:
                curve.append({"step": steps, **_curve_point(record["validation"])})
                record["validation_curve"] = curve
        record["test"] = score("test", splits.test)
    finally:
        adapted = model = None  # drop the run's copy of the model before collecting
        gc.collect()
    record["seconds"] = time.time() - started
    return record


def _curve_point(scored: dict[str, Any]) -> dict[str, Any]:
    return {k: scored[k] for k in ("accuracy", "stderr", "correct", "total", "seconds")}


def _rate_text(rate) -> str:
    if isinstance(rate, dict):
        return "lora {:g} steering {:g}".format(rate["lora"], rate["steering"])
    return f"{rate:g}"


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="runs", unit="run", dynamic_ncols=True)


def _log(bar, line: str) -> None:
    if bar is None:
        print(line, file=sys.stderr)
        return
    bar.write(line)
    bar.update(1)


def _summary_line(record: dict[str, Any]) -> str:
    test = record["test"]
    parts = [f"{record['task']} {record['method']}"]
    if record["seed"] is not None:
        parts.append(f"seed {record['seed']} lr {_rate_text(record['learning_rate'])}")
    parts.append(f"test {100 * test['accuracy']:.1f} +- {100 * test['stderr']:.1f}")
    if record.get("validation"):
        parts.append(f"validation {100 * record['validation']['accuracy']:.1f}")
    if record["train"]:
        parts.append(f"{record['train']['seconds_per_step']:.2f} s/step")
    return ", ".join(parts)


def run_reproduction(
    settings: ReproduceSettings,
    *,
    model=None,
    tokenizer=None,
    overwrite: bool = False,
    progress: bool = True,
    command: Sequence[str] | None = None,
) -> ReproduceRun:
    """``prepare`` then ``execute``: the whole reproduction from Python."""
    prepared = prepare(
        settings, model=model, tokenizer=tokenizer, overwrite=overwrite, command=command
    )
    return execute(prepared, progress=progress)
