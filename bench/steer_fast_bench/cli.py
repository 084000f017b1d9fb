"""The ``steer-fast`` command line (also ``python -m steer_fast_bench``).

    steer-fast bench                          # all suites, default model and size for the device
    steer-fast bench --quick                  # a smoke test
    steer-fast bench --full                   # the full kernel grid and timing budgets
    steer-fast bench --suites training inference --rank 32 --activation silu
    steer-fast bench --config MistralConfig --config-kwargs '{"num_hidden_layers": 8}'
    steer-fast bench --config path/to/config.json --dtype bfloat16 --batch 8 --seq-len 512
    steer-fast bench --suites mixed --adapters 1,4,16 --spread even    # many adapters, one batch
    steer-fast bench --list                   # presets and methods

Each subcommand is a parser builder and a runner in ``COMMANDS``. The options of ``bench`` are
generated from the fields of ``BenchmarkOptions``: the help text and the default live in the
field's metadata, and each is read as the field's type says.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import textwrap
from collections.abc import Callable

from .benchmark.methods import METHODS
from .benchmark.models import PRESETS
from .benchmark.runner import run_benchmarks
from .benchmark.settings import BenchmarkOptions, BenchmarkSettings, invoked_as
from .reproduce import cli as reproduce_cli


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"hidden_size\": 256}'")
    return value


def _checked(parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type from a function that raises ValueError with its own message."""

    def check(text: str) -> object:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error

    return check


# The argparse arguments of an option, by its type.
_TYPES = {
    "int": {"type": int},
    "dict": {"type": _json_object, "metavar": "JSON"},
    "Sequence[str]": {"nargs": "+"},
    "Sequence[int]": {"nargs": "+"},
}
# Switches of the command line itself, not options of a run, by the option they follow.
_SWITCHES = {
    "interleave": ("--list", "list presets and methods, then exit"),
    "plots": ("--no-progress", "no plan, estimate or progress bar on stderr"),
}


OPTIONS = [f for f in dataclasses.fields(BenchmarkOptions) if "help" in f.metadata]


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, never breaking a line inside a hyphenated word (a path, a flag)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        help="benchmark post-block steering against LoRA, LoReFT, forward hooks and the floor",
        description="Run the kernel, training-step and inference suites (and, when "
        "named, the mixed suite: many adapters in one batch) on a model with random weights, "
        "print markdown tables and write results.json, report.md and PNG plots. It says first "
        "what it will run and about how long it will take.",
        formatter_class=_HelpFormatter,
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in OPTIONS:
        meta, name = field.metadata, field.name.replace("_", "-")
        if meta["group"] not in groups:
            groups[meta["group"]] = bench.add_argument_group(meta["group"])
        group, switch = groups[meta["group"]], field.default is True
        flag = meta.get("flag") or f"--{'no-' if switch else ''}{name}"
        if isinstance(field.default, bool):  # --quick, or --no-... for a True default
            group.add_argument(
                flag,
                dest=field.name,
                help=meta["help"],
                action="store_false" if switch else "store_true",
            )
        else:
            shown = meta["shown"] if field.default is None else field.default
            arguments = {
                **_TYPES.get(field.type.removesuffix(" | None"), {}),
                **{k: meta[k] for k in ("choices", "metavar") if k in meta},
            }
            if "parse" in meta:
                arguments["type"] = _checked(meta["parse"])
            group.add_argument(
                flag,
                dest=field.name,
                default=field.default,
                help=f"{meta['help']} (default: {shown})",
                **arguments,
            )
        if field.name in _SWITCHES:
            group.add_argument(
                _SWITCHES[field.name][0], action="store_true", help=_SWITCHES[field.name][1]
            )


def options_from_args(args: argparse.Namespace, command: str) -> BenchmarkOptions:
    """The parsed command line as ``BenchmarkOptions``, recording ``command``."""
    values = {f.name: getattr(args, f.name) for f in OPTIONS}
    for f in OPTIONS:  # values of a Sequence option: space- or comma-separated
        if f.type.startswith("Sequence") and values[f.name] is not None:
            kind = _integer if "[int]" in f.type else str
            values[f.name] = [kind(v) for value in values[f.name] for v in value.split(",") if v]
    return BenchmarkOptions(**values, command=command)


def _integer(text: str) -> int | str:
    """``text`` as an int, or as given when it is none: the settings then name the option."""
    try:
        return int(text)
    except ValueError:
        return text


def run_bench(args: argparse.Namespace, command: str) -> int:
    """``steer-fast bench``: 0 after a run, 2 when an option is wrong (nothing runs then)."""
    if args.list:
        print("presets:")
        for p in PRESETS.values():
            print(
                f"  {p.name:14s} {p.description}; {str(p.dtype)[6:]}, batch {p.batch} x "
                f"{p.seq_len}, rank {p.rank}"
            )
        for suite, table in METHODS.items():
            print(f"{suite} methods:")
            width = max(18, *(len(name) + 1 for name in table))
            for name, method in table.items():
                print(f"  {name:{width}s} {method.label}")
        return 0
    try:
        settings = BenchmarkSettings.from_options(options_from_args(args, command))
    except ValueError as error:
        print(f"steer-fast bench: error: {error}", file=sys.stderr)
        return 2
    run = run_benchmarks(settings, progress=not args.no_progress)
    print(run.report)
    print(f"wrote {', '.join(str(f) for f in run.files)} in {run.seconds:.0f} s")
    return 0


# name -> (add its parser to the subcommands, run it with the parsed arguments and the command
# line as typed, returning the exit status).
def add_reproduce_parser(commands: argparse._SubParsersAction) -> None:
    reproduce = commands.add_parser(
        "reproduce",
        help="train every method on generated tasks with a real pretrained model and "
        "compare accuracies",
        description="Train every method on each task with the same data, "
        "steps, batch and seed, evaluate by greedy generation, and write results.json, report.md "
        "and plots (docs/reproduce.md).",
        formatter_class=_HelpFormatter,
    )
    reproduce_cli.add_arguments(reproduce)


def run_reproduce(args: argparse.Namespace, command: str) -> int:
    words = shlex.split(command)
    return reproduce_cli.main(args, words[words.index("reproduce") :])


COMMANDS = {
    "bench": (add_bench_parser, run_bench),
    "reproduce": (add_reproduce_parser, run_reproduce),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steer-fast", description="steer_fast tools")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_parser, _ in COMMANDS.values():
        add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the subcommand of ``argv`` (default: the process's arguments). The recorded command
    line is the one typed (``python -m steer_fast_bench ...`` when run as a module), or
    ``steer-fast`` and ``argv`` when ``argv`` is given."""
    command = invoked_as() if argv is None else invoked_as(argv, program="steer-fast")
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return COMMANDS[args.command][1](args, command)


if __name__ == "__main__":
    sys.exit(main())
