"""The ``steer-fast`` command line (also ``python -m steer_fast``).

    steer-fast bench                          # all suites, default model for the device
    steer-fast bench --quick                  # a few minutes on a laptop CPU
    steer-fast bench --suites training inference --rank 32 --activation silu
    steer-fast bench --config MistralConfig --config-kwargs '{"num_hidden_layers": 8}'
    steer-fast bench --config path/to/config.json --dtype bfloat16 --batch 8 --seq-len 512
    steer-fast bench --list                   # presets and methods
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from .activations import ACTIVATIONS


def _comma_or_space_list(values: list[str]) -> list[str]:
    return [item for value in values for item in value.split(",") if item]


def _int_list(values: list[str]) -> list[int]:
    try:
        return [int(v) for v in _comma_or_space_list(values)]
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


def build_parser() -> argparse.ArgumentParser:
    from .benchmark.presets import PRESETS
    from .benchmark.settings import DTYPES, SUITES

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
    what = bench.add_argument_group("what to run")
    what.add_argument("--suites", nargs="+", metavar="SUITE", default=None,
                      help=f"suites to run, from {list(SUITES)} (default: all)")
    what.add_argument("--methods", nargs="+", metavar="METHOD", default=None,
                      help="only these methods (see --list); default: all")
    what.add_argument("--quick", action="store_true",
                      help="fewer repeats, a smaller kernel grid, fewer decoded tokens")
    what.add_argument("--warmup", type=int, default=None,
                      help="warm-up calls before each measurement (default: per suite)")
    what.add_argument("--repeats", type=int, default=None,
                      help="exactly this many measured calls (default: adaptive per suite)")
    what.add_argument("--no-interleave", action="store_true",
                      help="time the methods one after another, each freed before the next "
                           "is built (for models too large to hold once per method)")
    what.add_argument("--list", action="store_true", help="list presets and methods, then exit")
    model = bench.add_argument_group("model (random weights, nothing downloaded)")
    model.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="model sizes and batch (default: llama-3.2-1b on CUDA, "
                            "cpu-small on the CPU)")
    model.add_argument("--config", default=None, metavar="CLASS_OR_PATH",
                       help="a transformers config class (e.g. MistralConfig, sized by the "
                            "preset) or a path to a config.json / model folder")
    model.add_argument("--config-kwargs", type=_json_object, default=None, metavar="JSON",
                       help="config fields to override, as a JSON object")
    model.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="model dtype (default: the preset's); also narrows the kernel grid")
    model.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    model.add_argument("--threads", type=int, default=None,
                       help="torch intra-op threads for the run (default: torch's choice)")
    shape = bench.add_argument_group("shapes")
    shape.add_argument("--batch", type=int, default=None)
    shape.add_argument("--seq-len", type=int, default=None)
    shape.add_argument("--rank", type=int, default=None,
                       help="adapter rank for every method; also narrows the kernel grid")
    shape.add_argument("--activation", choices=ACTIVATIONS, default=None,
                       help="steering nonlinearity (default identity); also narrows the "
                            "kernel grid")
    shape.add_argument("--decode-tokens", type=int, default=None)
    shape.add_argument("--kernel-tokens", nargs="+", default=None, metavar="N",
                       help="token counts of the kernel grid")
    shape.add_argument("--kernel-hidden", nargs="+", default=None, metavar="D",
                       help="hidden sizes of the kernel grid")
    shape.add_argument("--seed", type=int, default=0)
    output = bench.add_argument_group("output")
    output.add_argument("--out", default=None,
                        help="output folder (default: bench/results/<device>-<date>/)")
    output.add_argument("--overwrite", action="store_true",
                        help="allow writing into a folder that already holds results.json")
    output.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _print_catalogue() -> None:
    from .benchmark.kernel_suite import KERNEL_METHODS
    from .benchmark.methods import INFERENCE_METHODS, TRAINING_METHODS
    from .benchmark.presets import PRESETS

    print("presets:")
    for preset in PRESETS.values():
        print(f"  {preset.name:14s} {preset.description}; {str(preset.dtype)[6:]}, "
              f"batch {preset.batch} x {preset.seq_len}, rank {preset.rank}")
    for title, table in (("kernel", KERNEL_METHODS), ("training", TRAINING_METHODS),
                         ("inference", INFERENCE_METHODS)):
        print(f"{title} methods:")
        for name, method in table.items():
            print(f"  {name:18s} {method.label}")


def bench(args: argparse.Namespace, argv: list[str]) -> int:
    from .benchmark.runner import run_benchmarks
    from .benchmark.settings import BenchmarkSettings

    if args.list:
        _print_catalogue()
        return 0
    try:
        settings = BenchmarkSettings.create(
            suites=_comma_or_space_list(args.suites) if args.suites else None,
            device=args.device,
            preset=args.preset,
            config=args.config,
            config_kwargs=args.config_kwargs,
            dtype=args.dtype,
            batch=args.batch,
            seq_len=args.seq_len,
            rank=args.rank,
            activation=args.activation,
            decode_tokens=args.decode_tokens,
            seed=args.seed,
            methods=_comma_or_space_list(args.methods) if args.methods else None,
            kernel_tokens=_int_list(args.kernel_tokens) if args.kernel_tokens else None,
            kernel_hidden_sizes=_int_list(args.kernel_hidden) if args.kernel_hidden else None,
            quick=args.quick,
            warmup=args.warmup,
            repeats=args.repeats,
            threads=args.threads,
            interleave=not args.no_interleave,
            out=args.out,
            overwrite=args.overwrite,
            plots=not args.no_plots,
            command=shlex.join(["steer-fast", *argv]),
        )
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
