"""What a benchmark run measures: the options as given, and the settings resolved from them.

``BenchmarkOptions`` names every option once, with its help text and default in the field's
metadata; ``steer-fast bench`` builds its options from it (``steer_fast_bench.cli``), each read as
its type says. ``BenchmarkSettings.create(**options)`` fills in every default (by device, preset
and size) and checks every value, before anything runs.

A run has one of three sizes: "quick" (``--quick``: a smoke test), "default" and "full"
(``--full``: the whole kernel grid and the longer timing budgets the committed results used).
On CUDA the default is the full size; on the CPU it is the full grid's methods on a quarter of
its kernel shapes, with shorter timing budgets: 3 to 5 minutes on two cores. The mixed suite
(many adapters in one batch) runs only when ``--suites`` names it.
"""

from __future__ import annotations

import datetime
import importlib.util
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from steer_fast import SteerConfig
from steer_fast.ops import ACTIVATIONS

from .methods import METHODS, SUITES
from .mixed_methods import SPREADS
from .models import PRESETS, ModelPreset, ModelSpec, build_spec
from .timing import TimingPlan

# What the suites steer with unless --activation says otherwise: the published adapter that
# SteerConfig() builds (SiLU), so that the default run measures the default configuration.
DEFAULT_ACTIVATION: str = SteerConfig().activation

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Where runs go without --out, relative to the current directory.
RESULTS_ROOT = Path("steer-fast-bench")
# torch threads on the CPU without --threads: the committed CPU results' setting.
CPU_THREADS = 1
# The suites a run without --suites runs: the mixed suite only when named.
DEFAULT_SUITES: tuple[str, ...] = ("kernel", "training", "inference")
# The mixed suite's adapter counts A by size, without --adapters.
MIXED_ADAPTERS = {"quick": (1, 4), "default": (1, 4, 16, 64), "full": (1, 4, 16, 64)}
# The option groups of the command line's help, in this order.
WHAT, MODEL, SHAPES, OUTPUT = (
    "what to run",
    "model (random weights, nothing downloaded)",
    "shapes",
    "output",
)


def option(help: str, group: str, shown: str | None = None, default: Any = None, **cli: Any):
    """A field of ``BenchmarkOptions`` and its command-line option, read as its type says.

    ``help`` says what it does (for a switch that is on by default: what its ``--no-...`` flag
    does) and ``shown`` what a None default stands for. ``cli`` may set ``choices``, ``metavar``
    and ``flag`` (the option's name, when it is not the field's).
    """
    return field(default=default, metadata=dict(help=help, group=group, shown=shown, **cli))


def device_name(device: str) -> str:
    """``device`` checked to name "cpu", "cuda" or "cuda:N" (what ``--device`` accepts)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    return str(device)


@dataclass(frozen=True)
class BenchmarkOptions:
    """Every option of a run as given: None (or the default) where the user chose nothing."""

    suites: Sequence[str] | None = option(
        f"suites to run, from {list(SUITES)}",
        WHAT,
        f"{' '.join(DEFAULT_SUITES)}; mixed only when named",
        metavar="SUITE",
    )
    methods: Sequence[str] | None = option(
        "only these methods, as --list names them", WHAT, "all", metavar="METHOD"
    )
    quick: bool = option(
        "a smoke test: one kernel shape, 3 to 5 repeats per cell, a quarter of the decoded tokens",
        WHAT,
        default=False,
    )
    full: bool = option(
        "the full kernel grid (32 shapes) and timing budgets, the default on "
        "CUDA; on a 2-core CPU 9 to 12 minutes instead of 3 to 5",
        WHAT,
        default=False,
    )
    warmup: int | None = option("warm-up calls before each measurement", WHAT, "per suite")
    repeats: int | None = option("exactly this many measured calls", WHAT, "adaptive per suite")
    interleave: bool = option(
        "time the methods one after another, each freed before the next "
        "is built (for models too large to hold once per method)",
        WHAT,
        default=True,
    )
    preset: str | None = option(
        "model sizes and batch",
        MODEL,
        "llama-3.2-1b on CUDA, cpu-small on the CPU",
        choices=sorted(PRESETS),
    )
    config: str | None = option(
        "a transformers config class (e.g. MistralConfig, sized by the "
        "preset) or a path to a config.json / model folder",
        MODEL,
        "LlamaConfig",
        metavar="CLASS_OR_PATH",
    )
    config_kwargs: dict | None = option(
        "config fields to override, as a JSON object", MODEL, "none"
    )
    dtype: str | torch.dtype | None = option(
        "model dtype; also narrows the kernel grid", MODEL, "the preset's", choices=sorted(DTYPES)
    )
    device: str | torch.device | None = option(
        "cpu, cuda or cuda:N",
        MODEL,
        "cuda if available",
        metavar="{cpu,cuda,cuda:N}",
        parse=device_name,
    )
    threads: int | None = option(
        "torch intra-op threads for the run",
        MODEL,
        f"{CPU_THREADS} on the CPU, as the committed CPU results; torch's choice on CUDA",
    )
    batch: int | None = option("sequences per batch", SHAPES, "the preset's")
    seq_len: int | None = option("tokens per sequence", SHAPES, "the preset's")
    rank: int | None = option(
        "adapter rank for every method; also narrows the kernel grid", SHAPES, "the preset's"
    )
    activation: str | None = option(
        "steering nonlinearity; also narrows the kernel grid",
        SHAPES,
        f"{DEFAULT_ACTIVATION}, what SteerConfig() builds",
        choices=ACTIVATIONS,
    )
    decode_tokens: int | None = option(
        "tokens decoded after the prefill", SHAPES, "the preset's, a quarter with --quick"
    )
    kernel_tokens: Sequence[int] | None = option(
        "token counts of the kernel grid", SHAPES, "per device", metavar="N"
    )
    kernel_hidden_sizes: Sequence[int] | None = option(
        "hidden sizes of the kernel grid", SHAPES, "per device", metavar="D", flag="--kernel-hidden"
    )
    adapters: Sequence[int] | None = option(
        "the mixed suite's adapter counts A, each loaded on one model",
        SHAPES,
        f"{','.join(map(str, MIXED_ADAPTERS['default']))}; "
        f"{','.join(map(str, MIXED_ADAPTERS['quick']))} with --quick",
        metavar="A",
    )
    spread: Sequence[str] | None = option(
        "how the mixed suite's rows spread over the adapters: even (row i -> adapter i mod A) "
        "or skewed (half the rows on one adapter, the rest spread evenly over the others)",
        SHAPES,
        ",".join(SPREADS),
        metavar="SPREAD",
    )
    seed: int = option("seed of every method's weights and data", SHAPES, default=0)
    out: str | Path | None = option(
        "output folder",
        OUTPUT,
        f"./{RESULTS_ROOT}/<device>-<date>/ in the current directory, never reused",
    )
    overwrite: bool = option(
        "allow writing into a folder that already holds results.json", OUTPUT, default=False
    )
    plots: bool = option("skip the PNG plots", OUTPUT, default=True)
    # Recorded in every result; not an option (the command line sets it to itself).
    command: str | None = None


class KernelGrid(NamedTuple):
    """The cartesian product of shapes and settings the kernel suite times (in the order of
    ``kernel_suite.KernelCase``)."""

    tokens: tuple[int, ...]
    hidden_sizes: tuple[int, ...]
    ranks: tuple[int, ...]
    activations: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    residual: tuple[bool, ...] = (False,)


# (on CUDA, size) -> the kernel grid. On the CPU every [N, d] tensor stays under glibc's 32 MiB
# mmap ceiling (see runner.keep_freed_host_memory), so that no case is timed on page faults.
KERNEL_GRIDS = {
    (True, "quick"): KernelGrid((16384,), (2048,), (16,), ("silu",), (torch.bfloat16,)),
    (True, "full"): KernelGrid(
        (4096, 16384, 65536),
        (2048, 4096),
        (16, 64),
        ("identity", "silu"),
        (torch.bfloat16,),
        (False, True),
    ),
    (False, "quick"): KernelGrid((2048,), (512,), (16,), ("silu",), (torch.float32,)),
    (False, "default"): KernelGrid(
        (1024, 4096), (256, 1024), (16, 64), ("silu",), (torch.float32,)
    ),
    (False, "full"): KernelGrid(
        (1024, 4096), (256, 1024), (16, 64), ("identity", "silu"), (torch.float32, torch.bfloat16)
    ),
}
# (on CUDA, size) -> the kernel, training-step, inference and mixed timing plans, each as
# (warmup, min_repeats, max_repeats, budget_s). Outside "quick", at least 7 repeats per model
# cell and 10 per kernel cell, so that every cell has quartiles to judge its noise by (the
# mixed suite's, at least 5 on CUDA, where one batch per adapter decodes 64 batches a token).
TIMING_PLANS = {
    (True, "quick"): ((5, 10, 100, 0.1), (3, 5, 20, 1.0), (2, 3, 10, 1.0), (1, 3, 5, 0.5)),
    (True, "full"): ((10, 20, 500, 0.3), (5, 10, 50, 5.0), (3, 5, 20, 3.0), (2, 5, 15, 2.0)),
    (False, "quick"): ((2, 5, 20, 0.2), (1, 3, 3, 1.0), (1, 3, 5, 0.5), (1, 3, 3, 0.5)),
    (False, "default"): ((2, 10, 100, 0.3), (1, 7, 15, 8.0), (1, 7, 15, 3.0), (1, 7, 10, 2.0)),
    (False, "full"): ((3, 10, 200, 1.0), (2, 10, 40, 30.0), (2, 5, 30, 6.0), (2, 7, 20, 4.0)),
}


@dataclass(frozen=True)
class BenchmarkSettings:
    """A fully resolved run: every default filled in, every value checked."""

    device: torch.device
    size: str  # "quick", "default" or "full" (see the module docstring)
    preset: ModelPreset
    spec: ModelSpec
    suites: tuple[str, ...]
    batch: int
    seq_len: int
    rank: int
    activation: str
    decode_tokens: int
    seed: int
    methods: tuple[str, ...] | None
    kernel_grid: KernelGrid
    timing: dict[str, TimingPlan]  # by suite
    threads: int | None
    interleave: bool
    out: Path
    plots: bool
    command: str
    adapters: tuple[int, ...] = MIXED_ADAPTERS["default"]  # the mixed suite's A, ascending
    spreads: tuple[str, ...] = SPREADS  # the mixed suite's row spreads

    @classmethod
    def create(cls, **options: Any) -> BenchmarkSettings:
        """The settings of ``BenchmarkOptions(**options)``: unknown options raise TypeError."""
        return cls.from_options(BenchmarkOptions(**options))

    @classmethod
    def from_options(cls, o: BenchmarkOptions) -> BenchmarkSettings:
        """Resolve defaults (by device, preset and size) and check every value: a ValueError
        names the option and what was expected, before anything runs."""
        device = _check_device(o.device)
        if o.quick and o.full:
            raise ValueError("quick and full exclude each other; pass one of --quick, --full")
        cuda = device.type == "cuda"
        size = "quick" if o.quick else "full" if o.full or cuda else "default"
        suites = _check_choices("suites", o.suites or DEFAULT_SUITES, SUITES)
        default = "llama-3.2-1b" if device.type == "cuda" else "cpu-small"
        preset = PRESETS[_one_of("preset", o.preset or default, sorted(PRESETS))]
        if o.config_kwargs is not None and not isinstance(o.config_kwargs, dict):
            raise ValueError(f"config_kwargs must be a dict, got {type(o.config_kwargs).__name__}")
        if o.dtype is not None and DTYPES.get(o.dtype, o.dtype) not in DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {o.dtype!r}")
        spec = build_spec(preset, o.config, o.config_kwargs, DTYPES.get(o.dtype, o.dtype))
        batch = _positive("batch", o.batch, preset.batch)
        seq_len = _positive("seq_len", o.seq_len, preset.seq_len)
        grid = KERNEL_GRIDS[cuda, size]
        # An explicit rank, activation or dtype also narrows the kernel grid to that value.
        rank = _positive("rank", o.rank, preset.rank)
        if o.rank is not None:
            grid = grid._replace(ranks=(rank,))
        if o.activation is not None:
            grid = grid._replace(activations=(_one_of("activation", o.activation, ACTIVATIONS),))
        if o.dtype is not None:
            grid = grid._replace(dtypes=(spec.dtype,))
        decode_default = max(4, preset.decode_tokens // 4) if o.quick else preset.decode_tokens
        decode_tokens = _positive("decode_tokens", o.decode_tokens, decode_default)
        known = tuple(sorted({name for table in METHODS.values() for name in table}))
        methods = None if o.methods is None else _check_choices("methods", o.methods, known)
        for name, field_ in (("kernel_tokens", "tokens"), ("kernel_hidden_sizes", "hidden_sizes")):
            if (values := getattr(o, name)) is not None:
                if not values:
                    raise ValueError(f"{name} must list at least one integer >= 1")
                grid = grid._replace(**{field_: tuple(_positive(name, v) for v in values)})
        adapters = MIXED_ADAPTERS[size]
        if o.adapters is not None:
            if isinstance(o.adapters, (str, bytes)) or not o.adapters:
                raise ValueError(
                    f"adapters must list at least one integer >= 1, got {o.adapters!r}"
                )
            adapters = tuple(sorted({_positive("adapters", value) for value in o.adapters}))
        spreads = SPREADS if o.spread is None else _check_choices("spread", o.spread, SPREADS)
        threads = _positive("threads", o.threads, None if cuda else CPU_THREADS)
        repeats = _positive("repeats", o.repeats)
        fixed = dict(warmup=_positive("warmup", o.warmup), min_repeats=repeats, max_repeats=repeats)
        fixed = {key: value for key, value in fixed.items() if value is not None}
        plans = TIMING_PLANS[cuda, size]
        timing = {suite: replace(TimingPlan(*plan), **fixed) for suite, plan in zip(SUITES, plans)}
        if o.plots and importlib.util.find_spec("matplotlib") is None:
            raise ValueError(
                "plots need matplotlib (pip install 'steer_fast[bench]'); or pass "
                "plots=False (--no-plots)"
            )
        out = _fresh_default_out(device) if o.out is None else Path(o.out)
        if o.out is not None and (out / "results.json").exists() and not o.overwrite:
            raise ValueError(
                f"out folder {str(out)!r} already holds results.json; choose another "
                "folder or pass overwrite=True (--overwrite)"
            )
        return cls(
            device=device,
            size=size,
            preset=preset,
            spec=spec,
            suites=suites,
            batch=batch,
            seq_len=seq_len,
            rank=rank,
            activation=o.activation or DEFAULT_ACTIVATION,
            decode_tokens=decode_tokens,
            seed=int(o.seed),
            methods=methods,
            kernel_grid=grid,
            timing=timing,
            threads=threads,
            interleave=bool(o.interleave),
            out=out,
            plots=o.plots,
            command=o.command or invoked_as(),
            adapters=adapters,
            spreads=spreads,
        )

    @property
    def dtype_name(self) -> str:
        return str(self.spec.dtype).removeprefix("torch.")


def invoked_as(argv: Sequence[str] | None = None, program: str | None = None) -> str:
    """The command line as typed: ``program`` and ``argv`` when given; else the process's own,
    as ``python -m steer_fast_bench ...`` (the interpreter's name as invoked) when it runs the
    package as a module, or the script's name (e.g. ``steer-fast``) and its arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if program is None and spec is not None and spec.name.startswith("steer_fast"):
        interpreter = Path(getattr(sys, "orig_argv", [sys.executable])[0]).name
        return shlex.join([interpreter, "-m", spec.name.removesuffix(".__main__"), *args])
    return shlex.join([program or Path(sys.argv[0]).name, *args])


def _check_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device_name(str(device)))
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but torch sees no CUDA device")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {str(device)!r} was asked for but torch sees "
            f"{torch.cuda.device_count()} CUDA devices"
        )
    return resolved


def _one_of(name: str, value: Any, allowed: Sequence[str]) -> Any:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _check_choices(name: str, values: Any, allowed: Sequence[str]) -> tuple[str, ...]:
    """``values`` without repeats, checked to be a non-empty list drawn from ``allowed``."""
    if isinstance(values, str) or not values:
        raise ValueError(
            f"{name} must be a non-empty list drawn from {list(allowed)}, got {values!r}"
        )
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"{name} must be drawn from {list(allowed)}; unknown: {unknown}")
    return tuple(dict.fromkeys(values))


def _positive(name: str, value: int | None, default: int | None = None) -> int | None:
    """``value`` checked to be an integer >= 1, or ``default`` when it is None."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _fresh_default_out(device: torch.device) -> Path:
    """steer-fast-bench/<device>-<date>/ under the current directory (the device "cpu" or e.g.
    "cuda-nvidia-h100-80gb-hbm3"), with -2, -3, ... when that folder is already taken."""
    slug = device.type
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        slug += "-" + re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    base = RESULTS_ROOT / f"{slug}-{datetime.date.today().isoformat()}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
