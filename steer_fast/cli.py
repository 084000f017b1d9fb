"""The ``steer-fast`` command line (also ``python -m steer_fast``).

    steer-fast bench                          # all suites, default model for the device
    steer-fast bench --quick                  # a few minutes on a laptop CPU
    steer-fast bench --suites training inference --rank 32 --activation silu
    steer-fast bench --config MistralConfig --config-kwargs '{"num_hidden_layers": 8}'
    steer-fast bench --config path/to/config.json --dtype bfloat16 --batch 8 --seq-len 512
    steer-fast bench --list                   # presets and methods

The options of ``bench`` are generated from the fields of ``BenchmarkOptions``: the help text,
the default and how each is read live in the field's metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from typing import Any

from .benchmark.methods import METHODS
from .benchmark.presets import PRESETS
from .benchmark.runner import run_benchmarks
from .benchmark.settings import OUTPUT, WHAT, BenchmarkOptions, BenchmarkSettings


def _names(values: list[str]) -> list[str]:
    """Values given space- or comma-separated, as one list."""
    return [item for value in values for item in value.split(",") if item]


def _integers(values: list[str]) -> list[int]:
    try:
        return [int(v) for v in _names(values)]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"hidden_size\": 256}'")
    return value


# How each kind of option is read: argparse arguments, and the conversion of the parsed value.
_KINDS: dict[str, tuple[dict[str, Any], Any]] = {
    "text": ({}, None),
    "int": ({"type": int}, None),
    "json": ({"type": _json_object, "metavar": "JSON"}, None),
    "names": ({"nargs": "+"}, _names),
    "ints": ({"nargs": "+"}, _integers),
}


# Switches of the command line itself, not options of a run, by option group.
_SWITCHES = {
    WHAT: [("--list", "list presets and methods, then exit")],
    OUTPUT: [("--no-progress", "no progress bar")],
}


def _options() -> list[tuple[dataclasses.Field, str, str]]:
    """(field, flag, argparse dest) of every option of ``BenchmarkOptions``."""
    options = []
    for field in dataclasses.fields(BenchmarkOptions):
        if "help" in field.metadata:
            name = field.name.replace("_", "-")
            flag = field.metadata.get("flag") or f"--{'no-' if field.default is True else ''}{name}"
            options.append((field, flag, flag.removeprefix("--").replace("-", "_")))
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steer-fast", description="steer_fast tools")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="benchmark post-block steering against LoRA, LoReFT and the floor",
        description=(
            "Run the kernel, training-step and inference suites on a model with random "
            "weights, print markdown tables and write results.json, report.md and PNG plots."
        ),
    )
    by_group: dict[str, list] = {}
    for option in _options():
        by_group.setdefault(option[0].metadata["group"], []).append(option)
    for title, options in by_group.items():
        group = bench.add_argument_group(title)
        for field, flag, dest in options:
            meta = field.metadata
            if isinstance(field.default, bool):  # --quick, or --no-... for a True default
                group.add_argument(flag, dest=dest, action="store_true", help=meta["help"])
                continue
            shown = meta["shown"] if field.default is None else field.default
            arguments = dict(_KINDS[meta.get("kind", "text")][0])
            arguments.update({k: meta[k] for k in ("choices", "metavar") if k in meta})
            help = f"{meta['help']} (default: {shown})"
            group.add_argument(flag, dest=dest, default=None, help=help, **arguments)
        for flag, help in _SWITCHES.get(title, []):
            group.add_argument(flag, action="store_true", help=help)
    return parser


def options_from_args(args: argparse.Namespace, argv: list[str]) -> BenchmarkOptions:
    """The parsed command line as ``BenchmarkOptions``; ``command`` records ``argv``."""
    values: dict[str, Any] = {}
    for field, _, dest in _options():
        value = getattr(args, dest)
        if isinstance(field.default, bool):
            value = not value if field.default else value
        elif value is not None:
            convert = _KINDS[field.metadata.get("kind", "text")][1]
            value = convert(value) if convert else value
        values[field.name] = field.default if value is None else value
    return BenchmarkOptions(**values, command=shlex.join(["steer-fast", *argv]))


def _print_catalogue() -> None:
    print("presets:")
    for p in PRESETS.values():
        print(
            f"  {p.name:14s} {p.description}; {str(p.dtype)[6:]}, batch {p.batch} x {p.seq_len}, "
            f"rank {p.rank}"
        )
    for suite, table in METHODS.items():
        print(f"{suite} methods:")
        for name, method in table.items():
            print(f"  {name:18s} {method.label}")


def bench(args: argparse.Namespace, argv: list[str]) -> int:
    """``steer-fast bench``: 0 after a run, 2 when an option is wrong (nothing runs then)."""
    if args.list:
        _print_catalogue()
        return 0
    try:
        settings = BenchmarkSettings.from_options(options_from_args(args, argv))
    except (ValueError, argparse.ArgumentTypeError) as error:
        print(f"steer-fast bench: error: {error}", file=sys.stderr)
        return 2
    run = run_benchmarks(settings, progress=not args.no_progress)
    print(run.report)
    print(f"wrote {', '.join(str(f) for f in run.files)} in {run.seconds:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return bench(args, argv)
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
