"""The options of ``steer-fast reproduce`` and what it does with them.

    steer-fast reproduce                                  # the quick protocol: minutes
    steer-fast reproduce --protocol paper --out repro     # the paper's protocol: hours
    steer-fast reproduce --protocol paper --plan-only     # its plan and estimate, no training
    steer-fast reproduce --tasks listops --methods base full steer_silu --steps 50
    steer-fast reproduce --out reproduce-results --report-only   # redraw report.md and plots

Every trained method's learning rate is chosen on the validation split from a sweep (the
selection rule of ``selection.py``); ``--protocol`` picks the sizes, tasks, methods and seeds
(``PROTOCOLS``), and any option given explicitly replaces the protocol's value.

``add_arguments(parser)`` fills an ``argparse`` parser (the ``reproduce`` sub-command) and
``main(args)`` runs it: 0 after a run, 2 when an option, a task or the model is wrong (nothing
trains then).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

DEFAULT_OUT = "reproduce-results"

# The protocols: the values of the options they set. "quick" is the no-argument run (a few
# minutes: one task, four methods, 3-point sweeps of 16 steps); "paper" is the paper's protocol
# as far as a CPU allows: ListOps and boolean expressions, 144 steps of 8 x 2, 3-point sweeps
# of the paper's grids, LoReFT's two positions, the joint runs, 3 seeds of the reported methods.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "quick": {
        "tasks": ["listops"],
        "methods": ["base", "full", "lora", "steer_silu"],
        "seeds": ["0"],
        "repeat_methods": None,
        "train_size": 256,
        "validation_size": 64,
        "test_size": 128,
        "steps": None,
        "listops_max_tokens": 32,
        "grid_points": 3,
    },
    "paper": {
        "tasks": ["listops", "boolean_expressions"],
        "methods": [
            "base",
            "full",
            "lora",
            "loreft",
            "loreft_last",
            "steer_silu",
            "steer_identity",
            "joint_orth",
            "joint_plain",
        ],
        "seeds": ["0", "1", "2"],
        "repeat_methods": ["full", "lora", "steer_silu", "steer_identity"],
        "train_size": 2304,
        "validation_size": 200,
        "test_size": 300,
        "steps": 144,
        "listops_max_tokens": 32,
        "grid_points": 3,
    },
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``steer-fast reproduce`` to ``parser``."""
    from .methods import METHOD_NAMES
    from .models import DEFAULT_MODEL, KNOWN_MODELS
    from .tasks import TASK_NAMES

    def preset(name: str) -> str:
        return ", ".join(f"{p}: {_shown(values[name])}" for p, values in PROTOCOLS.items())

    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default="quick",
        help="the sizes, tasks, methods and seeds (default: quick, a few minutes; paper: the "
        "paper's protocol, hours); explicit options replace its values",
    )
    what.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help=f"tasks, space- or comma-separated: {', '.join(TASK_NAMES)}, or a local "
        "JSON/JSONL/CSV file or folder, or a Hugging Face dataset id in the same format "
        f"({preset('tasks')})",
    )
    what.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help=f"methods, space- or comma-separated: {', '.join(METHOD_NAMES)} (--list describes "
        f"them; {preset('methods')})",
    )
    what.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"the model: {' or '.join(KNOWN_MODELS)} (GGUF files shipped by packages), a "
        f"local folder or .gguf file, or a Hugging Face id (default: {DEFAULT_MODEL})",
    )
    what.add_argument(
        "--seeds",
        nargs="+",
        metavar="SEED",
        help="training seeds (initialisation and data order); rates are chosen at the first, "
        f"the other seeds repeat the chosen setting ({preset('seeds')})",
    )
    what.add_argument(
        "--repeat-methods",
        nargs="+",
        metavar="METHOD",
        help="the methods run again at the other seeds (quick: every trained method; paper: "
        "full lora steer_silu steer_identity)",
    )
    what.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help="folder for results.json, report.md and the plots; an existing results.json "
        f"there is resumed (format 1 files too) (default: {DEFAULT_OUT})",
    )
    data = parser.add_argument_group("data")
    for name, text in (
        ("train-size", "training examples per task"),
        ("validation-size", "validation examples per task, for choosing learning rates"),
        ("test-size", "test examples per task"),
    ):
        data.add_argument(f"--{name}", type=int, help=f"{text} ({preset(name.replace('-', '_'))})")
    data.add_argument(
        "--data-seed", type=int, default=0, help="seed of the generated tasks' data (default: 0)"
    )
    data.add_argument(
        "--listops-max-tokens",
        type=int,
        help="longest generated ListOps expression, in whitespace-separated tokens: 64 as "
        f"the paper's listops-64 data, 32 for cheaper sequences ({preset('listops_max_tokens')})",
    )
    data.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="the longest training example allowed, in tokens; a longer one is an error "
        "before anything trains (default: no limit)",
    )
    training = parser.add_argument_group("training")
    training.add_argument(
        "--steps",
        type=int,
        help="optimizer steps per run (quick: one epoch of --train-size; paper: 144)",
    )
    training.add_argument(
        "--epochs",
        type=float,
        default=1.0,
        help="passes over the training split when --steps is not given (default: 1)",
    )
    training.add_argument(
        "--batch-size", type=int, default=8, help="examples per micro-batch (default: 8)"
    )
    training.add_argument(
        "--grad-accum", type=int, default=2, help="micro-batches per optimizer step (default: 2)"
    )
    training.add_argument(
        "--grid-points",
        type=int,
        help="rates swept per method from the paper's 5-point grids: 3 (the ends and the "
        f"middle) or 5 (--list shows them) ({preset('grid_points')})",
    )
    training.add_argument(
        "--lr-grid",
        nargs="+",
        default=[],
        metavar="METHOD=LR[,LR...]",
        help="the rates a method sweeps, replacing its paper grid",
    )
    training.add_argument(
        "--orthogonality-frequency",
        default="auto",
        metavar="auto|N|step|epoch|init",
        help="when joint_orth's down-projection constraint projects: auto (every sixth of "
        "the run: five times after step 0), every N optimizer steps, every step, each "
        "epoch's start, or once at the start (default: auto)",
    )
    training.add_argument(
        "--validation-every",
        type=int,
        default=None,
        metavar="N",
        help="also evaluate the validation split every N optimizer steps of each run (the "
        "validation curve in results.json and the report; default: only at the end)",
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
        "--plan-only",
        action="store_true",
        help="print the plan and its estimate (probing step times: two optimizer steps per "
        "method not yet in --out), then exit",
    )
    machine.add_argument(
        "--no-probe",
        action="store_true",
        help="estimate from the step times recorded in --out only (no probed steps)",
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


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


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
        if method.strip() in grid:
            raise ValueError(f"lr_grid: {method.strip()} given more than once")
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
    """The parsed options, over their protocol's values, as ``settings.ReproduceSettings``
    (ValueError for a bad value)."""
    from .settings import ReproduceSettings

    protocol = PROTOCOLS[args.protocol]

    def value(name: str) -> Any:
        given = getattr(args, name)
        return protocol[name] if given is None else given

    try:
        seeds = tuple(int(s) for s in _split(value("seeds")))
    except ValueError as error:
        raise ValueError(f"seeds must be integers, got {value('seeds')}") from error
    methods = tuple(_split(value("methods")))
    repeat = args.repeat_methods
    if repeat is None and protocol["repeat_methods"] is not None:
        # The protocol's list, for the methods selected (an explicit --methods may drop some).
        repeat = [m for m in protocol["repeat_methods"] if m in methods]
    return ReproduceSettings(
        tasks=tuple(_split(value("tasks"))),
        methods=methods,
        model=args.model,
        out=args.out,
        train_size=value("train_size"),
        validation_size=value("validation_size"),
        test_size=value("test_size"),
        steps=value("steps"),
        epochs=args.epochs,
        seeds=seeds,
        repeat_methods=None if repeat is None else tuple(_split(repeat)),
        data_seed=args.data_seed,
        listops_max_tokens=value("listops_max_tokens"),
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        grid_points=value("grid_points"),
        lr_grid=parse_lr_grid(args.lr_grid),
        eval_batch_size=args.eval_batch_size,
        threads=args.threads,
        measure_memory=not args.no_memory,
        orthogonality_frequency=_frequency(args.orthogonality_frequency),
        validation_every=args.validation_every,
    )


def _list() -> None:
    from .methods import METHODS, PAPER_GRIDS, Grid, PartRates, SameRateAs

    print("tasks and protocols:")
    for name, values in PROTOCOLS.items():
        print(f"  --protocol {name}: " + "; ".join(f"{k} {_shown(v)}" for k, v in values.items()))
    print("methods (learning rate: the validation-best of the sweep, --grid-points of 3 or 5):")
    for method in METHODS.values():
        rule = method.rates
        if isinstance(rule, Grid):
            rates = ", ".join(f"{r:g}" for r in PAPER_GRIDS[rule.kind])
            rates += f"; 3 points: {', '.join(f'{r:g}' for r in rule.rates(3))}"
        elif isinstance(rule, SameRateAs):
            rates = f"at {rule.method}'s validation-best rate"
        elif isinstance(rule, PartRates):
            rates = (
                f"LoRA at {rule.lora}'s, steering at {rule.steering}'s validation-best rate; "
                f"and both at {rule.reference:g} for reference"
            )
        else:
            rates = "no training"
        print(f"  {method.name:15s} {method.description} ({rates})")


def main(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run ``steer-fast reproduce`` with parsed ``args``; ``argv`` (the command line after the
    program name) is recorded in results.json. Returns 0 after a run (or a plan), 2 when an
    option, a task or the model is wrong."""
    from pathlib import Path

    from .report import write_report
    from .results import RESULTS_FILE, read_results
    from .runner import execute, plan_text, prepare

    if args.list:
        _list()
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if args.report_only:
            path = Path(args.out) / RESULTS_FILE
            if not path.is_file():
                raise ValueError(f"out: {path} does not exist")
            files = write_report(read_results(path), args.out)
            print(f"wrote {', '.join(str(f) for f in files)}")
            return 0
        settings = settings_from_args(args)
        prepared = prepare(settings, overwrite=args.overwrite, command=["steer-fast", *argv])
    except (ValueError, OSError, ImportError) as error:
        print(f"steer-fast reproduce: error: {error}", file=sys.stderr)
        return 2
    if args.plan_only:
        print(plan_text(prepared, probe=not args.no_probe, say=lambda t: print(t, file=sys.stderr)))
        return 0
    run = execute(prepared, progress=not args.no_progress, probe=not args.no_probe)
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
        description="Sweep every method's learning rate on the validation split, repeat the "
        "chosen settings over seeds, evaluate by greedy generation, and write results.json, "
        "report.md and plots.",
    )
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
