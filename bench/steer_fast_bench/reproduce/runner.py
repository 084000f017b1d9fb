"""The loop of ``steer-fast reproduce``: tasks x methods x seeds x learning rates.

Every run starts from a fresh copy of the base model, is seeded (``transformers.set_seed``)
before its method is built, trains (``train.py``), evaluates on the validation split when its
method's learning rate is chosen from a grid and on the test split always (``evaluate.py``), and
is appended to ``results.json``, which is rewritten atomically after each run. A second call with
the same ``--out`` skips the (task, method, seed, learning rate) runs the file already holds, so
an interrupted reproduction picks up where it stopped; settings that change results (model,
sizes, steps, batch, data) must match the file's, or the call is refused.
"""

from __future__ import annotations

import copy
import functools
import gc
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import METHOD_NAMES, METHODS
from .results import (
    RESULTS_FILE,
    environment,
    fingerprint,
    load_results,
    run_key,
    write_json_atomic,
)

# Settings that change what a run measures: a results file is resumed only when they match.
RESULT_SETTINGS = (
    "model",
    "steps",
    "epochs",
    "train_size",
    "validation_size",
    "test_size",
    "data_seed",
    "listops_max_tokens",
    "batch_size",
    "grad_accum",
    "max_length",
    "orthogonality_frequency",
)

# The values of ``--orthogonality-frequency`` besides a number of steps (as OrthogonalityConfig).
FREQUENCY_WORDS = ("step", "epoch", "init")


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _learning_rate(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: a learning rate must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: a learning rate must be finite and > 0, got {value!r}")
    return float(value)


def _unique(values: Sequence) -> tuple:
    return tuple(dict.fromkeys(values))


@dataclass(frozen=True)
class ReproduceSettings:
    """Everything one ``steer-fast reproduce`` call does (the command-line options).

    ``tasks`` are names of ``tasks.TASK_NAMES`` or sources ``tasks.load_task`` reads (a local
    file or folder, a Hugging Face dataset id); ``lr_grid`` replaces the learning rates of the
    methods it names (see ``methods.METHODS`` for the defaults). ``steps`` None trains for
    ``epochs`` passes over the training split. ``orthogonality_frequency`` is when the joint
    methods' down-projection constraint projects (``OrthogonalityConfig.frequency``: every N
    steps, or "step", "epoch", "init"; 100 as published). Bad values raise ValueError naming the
    option.
    """

    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    model: str
    out: str
    train_size: int
    validation_size: int
    test_size: int
    steps: int | None = None
    epochs: float = 1.0
    seeds: tuple[int, ...] = (0,)
    data_seed: int = 0
    listops_max_tokens: int = 64
    batch_size: int = 8
    grad_accum: int = 2
    max_length: int | None = None
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=dict)
    eval_batch_size: int = 32
    threads: int | None = None
    measure_memory: bool = True
    orthogonality_frequency: int | str = 100

    def __post_init__(self) -> None:
        from .tasks import TASK_NAMES

        object.__setattr__(self, "tasks", _unique(self.tasks))
        object.__setattr__(self, "methods", _unique(self.methods))
        object.__setattr__(self, "seeds", _unique(self.seeds))
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        for task in self.tasks:
            if task not in TASK_NAMES and not _is_task_source(task):
                raise ValueError(
                    f"tasks: unknown task {task!r}; known tasks: "
                    f"{', '.join(TASK_NAMES)} (or a local file or folder, or a "
                    "Hugging Face dataset id such as owner/name)"
                )
        if not self.methods:
            raise ValueError("methods must name at least one method")
        for method in self.methods:
            if method not in METHODS:
                raise ValueError(
                    f"methods: unknown method {method!r}; known methods: {', '.join(METHOD_NAMES)}"
                )
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        _positive_int("train_size", self.train_size, 0)
        _positive_int("validation_size", self.validation_size, 0)
        _positive_int("test_size", self.test_size)
        if self.steps is not None:
            _positive_int("steps", self.steps)
        if (
            isinstance(self.epochs, bool)
            or not isinstance(self.epochs, (int, float))
            or not (math.isfinite(self.epochs) and self.epochs > 0)
        ):
            raise ValueError(f"epochs must be a number > 0, got {self.epochs!r}")
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed")
        for seed in (*self.seeds, self.data_seed):
            _positive_int("seeds", seed, 0)
        for name in ("batch_size", "grad_accum", "eval_batch_size"):
            _positive_int(name, getattr(self, name))
        _positive_int("listops_max_tokens", self.listops_max_tokens)
        for name in ("max_length", "threads"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        frequency = self.orthogonality_frequency
        if frequency not in FREQUENCY_WORDS:
            _positive_int("orthogonality_frequency", frequency)
        self._check_lr_grid()
        if any(m.trains for m in self.selected()):
            _positive_int("train_size", self.train_size)
        tuned = [m.name for m in self.selected() if len(self.learning_rates(m.name)) > 1]
        if tuned and self.validation_size < 1:
            raise ValueError(
                f"validation_size must be >= 1: the learning rates of "
                f"{', '.join(tuned)} are chosen on the validation split"
            )

    def _check_lr_grid(self) -> None:
        if not isinstance(self.lr_grid, dict):
            raise ValueError(f"lr_grid must map methods to learning rates, got {self.lr_grid!r}")
        grid = {}
        for method, rates in self.lr_grid.items():
            if method not in METHODS:
                raise ValueError(
                    f"lr_grid: unknown method {method!r}; known methods: {', '.join(METHOD_NAMES)}"
                )
            if not METHODS[method].trains:
                raise ValueError(f"lr_grid: {method} does not train, it takes no learning rate")
            if isinstance(rates, (int, float)):
                rates = (rates,)
            rates = _unique(_learning_rate(f"lr_grid {method}", r) for r in rates)
            if not rates:
                raise ValueError(f"lr_grid: {method} needs at least one learning rate")
            grid[method] = rates
        object.__setattr__(self, "lr_grid", grid)

    def selected(self) -> list:
        """The selected ``methods.Method`` rows, in the order given."""
        return [METHODS[name] for name in self.methods]

    def learning_rates(self, method: str) -> tuple[float, ...]:
        """The learning rates ``method`` runs with: ``lr_grid``'s or the method's default."""
        return self.lr_grid.get(method, METHODS[method].learning_rates)

    def total_steps(self, train_size: int) -> int:
        """Optimizer steps of a run on ``train_size`` examples: ``steps``, or ``epochs`` passes
        at the effective batch (rounded up)."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * train_size / (self.batch_size * self.grad_accum)))

    def result_settings(self) -> dict[str, Any]:
        """The settings a results file must match to be resumed."""
        return {name: getattr(self, name) for name in RESULT_SETTINGS}


def _is_task_source(task: str) -> bool:
    return Path(task).exists() or ("/" in task and not task.startswith("/"))


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
    """A finished reproduction: the results, the files written, the wall time."""

    results: dict[str, Any]
    files: list[Path]
    seconds: float
    ran: int
    skipped_runs: int


def planned_runs(settings: ReproduceSettings) -> list[tuple[str, str, int | None, float | None]]:
    """(task, method, seed, learning rate) of every run, in order; ``base`` runs once per task
    (greedy generation does not depend on the seed)."""
    runs = []
    for task in settings.tasks:
        for method in settings.selected():
            if not method.trains:
                runs.append((task, method.name, None, None))
                continue
            for seed in settings.seeds:
                for rate in settings.learning_rates(method.name):
                    runs.append((task, method.name, seed, rate))
    return runs


def execute(prepared: Prepared, *, progress: bool = True) -> ReproduceRun:
    """Run every planned run the results file does not hold yet, saving after each, then write
    the report and plots."""
    from .report import write_report

    start = time.perf_counter()
    settings, results = prepared.settings, prepared.results
    prepared.out.mkdir(parents=True, exist_ok=True)
    path = prepared.out / RESULTS_FILE
    unavailable = {m.name: m.unavailable_reason() for m in settings.selected()}
    results["skipped"] = {name: reason for name, reason in unavailable.items() if reason}
    done = {tuple(run_key(r)) for r in results["runs"]}
    todo = [run for run in planned_runs(settings) if run not in done and not unavailable[run[1]]]
    for name, reason in results["skipped"].items():
        print(f"steer-fast reproduce: skipping {name}: {reason}", file=sys.stderr)
    write_json_atomic(path, results)
    bar = _bar(len(todo), progress)
    try:
        for task, method, seed, rate in todo:
            record = run_one(prepared, task, method, seed, rate, progress=progress)
            results["runs"].append(record)
            write_json_atomic(path, results)
            _log(bar, _summary_line(record))
    finally:
        if bar is not None:
            bar.close()
    files = [path, *write_report(results, prepared.out)]
    return ReproduceRun(
        results,
        files,
        time.perf_counter() - start,
        len(todo),
        len(planned_runs(settings)) - len(todo),
    )


def run_one(
    prepared: Prepared,
    task: str,
    method_name: str,
    seed: int | None,
    learning_rate: float | None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """One run on a fresh copy of the model: build, train, evaluate; returns its record."""
    import transformers

    from .data import collate
    from .evaluate import evaluate
    from .train import TrainSettings, train

    settings, splits = prepared.settings, prepared.splits[task]
    method = METHODS[method_name]
    label = f"{task} {method_name}" + ("" if seed is None else f" seed {seed} lr {learning_rate:g}")
    started = time.time()
    transformers.set_seed(0 if seed is None else seed)
    model = copy.deepcopy(prepared.model)
    pad = prepared.tokenizer.pad_token_id
    options = {name: getattr(settings, name) for name in method.options}
    adapted = method.build(model, pad, **options)
    record: dict[str, Any] = {
        "task": task,
        "method": method_name,
        "seed": seed,
        "learning_rate": learning_rate,
        "trainable_parameters": adapted.trainable_parameters,
        "model_parameters": prepared.results["model_parameters"],
        "details": adapted.details,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
    }
    record["trainable_percent"] = (
        100.0 * record["trainable_parameters"] / record["model_parameters"]
    )
    try:
        if method.trains:
            steps = settings.total_steps(len(splits.train))
            train_settings = TrainSettings(
                steps=steps,
                batch_size=settings.batch_size,
                grad_accum=settings.grad_accum,
                learning_rate=learning_rate,
                schedule=method.schedule,
                warmup_ratio=method.warmup_ratio,
                seed=seed,
                measure_memory=settings.measure_memory,
            )
            trained = train(
                adapted,
                prepared.rows[task],
                functools.partial(collate, pad_token_id=pad),
                train_settings,
                progress=progress,
                description=label,
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
        else:
            record["train"] = None
        evaluate_on = {"test": splits.test}
        if len(settings.learning_rates(method_name)) > 1 and method.trains:
            evaluate_on = {"validation": splits.validation, **evaluate_on}
        for split, examples in evaluate_on.items():
            record[split] = evaluate(
                adapted,
                examples,
                prepared.tokenizer,
                batch_size=settings.eval_batch_size,
                progress=progress,
                description=f"{label} {split}",
            ).to_dict()
    finally:
        del adapted, model
        gc.collect()
    record["seconds"] = time.time() - started
    return record


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
        parts.append(f"seed {record['seed']} lr {record['learning_rate']:g}")
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
