"""What a benchmark run measures: the options as given, and the settings resolved from them.

``BenchmarkOptions`` names every option once, with its help text and default in the field's
metadata; ``steer-fast bench`` builds its options from it (``steer_fast.cli``), each read as its
type says. ``BenchmarkSettings.create(**options)`` fills in every default (by device,
preset and ``quick``) and checks every value, before anything runs.
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

from ..activations import ACTIVATIONS
from .methods import METHODS, SUITES
from .models import PRESETS, ModelPreset, ModelSpec, build_spec
from .timing import TimingPlan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESULTS_ROOT = Path("bench") / "results"
# The option groups of the command line's help, in this order.
WHAT, MODEL, SHAPES, OUTPUT = ("what to run", "model (random weights, nothing downloaded)",
                               "shapes", "output")


def option(help: str, group: str, shown: str | None = None, default: Any = None, **cli: Any):
    """A field of ``BenchmarkOptions`` and its command-line option, read as its type says.

    ``help`` says what it does (for a switch that is on by default: what its ``--no-...`` flag
    does) and ``shown`` what a None default stands for. ``cli`` may set ``choices``, ``metavar``
    and ``flag`` (the option's name, when it is not the field's).
    """
    return field(default=default, metadata=dict(help=help, group=group, shown=shown, **cli))


@dataclass(frozen=True)
class BenchmarkOptions:
    """Every option of a run as given: None (or the default) where the user chose nothing."""

    suites: Sequence[str] | None = option(f"suites to run, from {list(SUITES)}", WHAT, "all",
                                          metavar="SUITE")
    methods: Sequence[str] | None = option("only these methods, as --list names them", WHAT,
                                           "all", metavar="METHOD")
    quick: bool = option("fewer repeats, a smaller kernel grid, fewer decoded tokens", WHAT,
                         default=False)
    warmup: int | None = option("warm-up calls before each measurement", WHAT, "per suite")
    repeats: int | None = option("exactly this many measured calls", WHAT, "adaptive per suite")
    interleave: bool = option("time the methods one after another, each freed before the next "
                              "is built (for models too large to hold once per method)", WHAT,
                              default=True)
    preset: str | None = option("model sizes and batch", MODEL, "llama-3.2-1b on CUDA, cpu-small "
                                "on the CPU", choices=sorted(PRESETS))
    config: str | None = option("a transformers config class (e.g. MistralConfig, sized by the "
                                "preset) or a path to a config.json / model folder", MODEL,
                                "LlamaConfig", metavar="CLASS_OR_PATH")
    config_kwargs: dict | None = option("config fields to override, as a JSON object", MODEL,
                                        "none")
    dtype: str | torch.dtype | None = option("model dtype; also narrows the kernel grid", MODEL,
                                             "the preset's", choices=sorted(DTYPES))
    device: str | torch.device | None = option("cuda or cpu", MODEL, "cuda if available")
    threads: int | None = option("torch intra-op threads for the run", MODEL, "torch's choice")
    batch: int | None = option("sequences per batch", SHAPES, "the preset's")
    seq_len: int | None = option("tokens per sequence", SHAPES, "the preset's")
    rank: int | None = option("adapter rank for every method; also narrows the kernel grid",
                              SHAPES, "the preset's")
    activation: str | None = option("steering nonlinearity; also narrows the kernel grid", SHAPES,
                                    "identity", choices=ACTIVATIONS)
    decode_tokens: int | None = option("tokens decoded after the prefill", SHAPES,
                                       "the preset's, a quarter with --quick")
    kernel_tokens: Sequence[int] | None = option("token counts of the kernel grid", SHAPES,
                                                 "per device", metavar="N")
    kernel_hidden_sizes: Sequence[int] | None = option("hidden sizes of the kernel grid", SHAPES,
                                                       "per device", metavar="D",
                                                       flag="--kernel-hidden")
    seed: int = option("seed of every method's weights and data", SHAPES, default=0)
    out: str | Path | None = option("output folder", OUTPUT,
                                    "bench/results/<device>-<date>/, never reused")
    overwrite: bool = option("allow writing into a folder that already holds results.json",
                             OUTPUT, default=False)
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


# (on CUDA, quick) -> the kernel grid. On the CPU every [N, d] tensor stays under glibc's 32 MiB
# mmap ceiling (see runner.keep_freed_host_memory), so that no case is timed on page faults.
KERNEL_GRIDS = {
    (True, True): KernelGrid((16384,), (2048,), (16,), ("silu",), (torch.bfloat16,)),
    (True, False): KernelGrid((4096, 16384, 65536), (2048, 4096), (16, 64), ("identity", "silu"),
                              (torch.bfloat16,), (False, True)),
    (False, True): KernelGrid((2048,), (512,), (16,), ("silu",), (torch.float32,)),
    (False, False): KernelGrid((1024, 4096), (256, 1024), (16, 64), ("identity", "silu"),
                               (torch.float32, torch.bfloat16)),
}
# (on CUDA, quick) -> the kernel, training-step and inference timing plans, each as
# (warmup, min_repeats, max_repeats, budget_s).
TIMING_PLANS = {
    (True, True): ((5, 10, 100, 0.1), (3, 5, 20, 1.0), (2, 3, 10, 1.0)),
    (True, False): ((10, 20, 500, 0.3), (5, 10, 50, 5.0), (3, 5, 20, 3.0)),
    (False, True): ((2, 5, 20, 0.2), (1, 3, 3, 1.0), (1, 3, 5, 0.5)),
    (False, False): ((3, 10, 200, 1.0), (2, 10, 40, 30.0), (2, 5, 30, 6.0)),
}


@dataclass(frozen=True)
class BenchmarkSettings:
    """A fully resolved run: every default filled in, every value checked."""

    device: torch.device
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

    @classmethod
    def create(cls, **options: Any) -> BenchmarkSettings:
        """The settings of ``BenchmarkOptions(**options)``: unknown options raise TypeError."""
        return cls.from_options(BenchmarkOptions(**options))

    @classmethod
    def from_options(cls, o: BenchmarkOptions) -> BenchmarkSettings:
        """Resolve defaults (by device, preset and ``quick``) and check every value: a
        ValueError names the option and what was expected, before anything runs."""
        device = _check_device(o.device)
        suites = _check_choices("suites", o.suites or SUITES, SUITES)
        default = "llama-3.2-1b" if device.type == "cuda" else "cpu-small"
        preset = PRESETS[_one_of("preset", o.preset or default, sorted(PRESETS))]
        if o.config_kwargs is not None and not isinstance(o.config_kwargs, dict):
            raise ValueError(f"config_kwargs must be a dict, got {type(o.config_kwargs).__name__}")
        if o.dtype is not None and DTYPES.get(o.dtype, o.dtype) not in DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {o.dtype!r}")
        spec = build_spec(preset, o.config, o.config_kwargs, DTYPES.get(o.dtype, o.dtype))
        batch = _positive("batch", o.batch, preset.batch)
        seq_len = _positive("seq_len", o.seq_len, preset.seq_len)
        grid = KERNEL_GRIDS[device.type == "cuda", o.quick]
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
        threads = _positive("threads", o.threads)
        repeats = _positive("repeats", o.repeats)
        fixed = dict(warmup=_positive("warmup", o.warmup), min_repeats=repeats, max_repeats=repeats)
        fixed = {key: value for key, value in fixed.items() if value is not None}
        plans = TIMING_PLANS[device.type == "cuda", o.quick]
        timing = {suite: replace(TimingPlan(*plan), **fixed) for suite, plan in zip(SUITES, plans)}
        if o.plots and importlib.util.find_spec("matplotlib") is None:
            raise ValueError("plots need matplotlib (pip install 'steer_fast[bench]'); or pass "
                             "plots=False (--no-plots)")
        out = _fresh_default_out(device) if o.out is None else Path(o.out)
        if o.out is not None and (out / "results.json").exists() and not o.overwrite:
            raise ValueError(f"out folder {str(out)!r} already holds results.json; choose another "
                             "folder or pass overwrite=True (--overwrite)")
        return cls(device=device, preset=preset, spec=spec, suites=suites, batch=batch,
                   seq_len=seq_len, rank=rank, activation=o.activation or "identity",
                   decode_tokens=decode_tokens, seed=int(o.seed), methods=methods,
                   kernel_grid=grid, timing=timing, threads=threads,
                   interleave=bool(o.interleave), out=out, plots=o.plots,
                   command=o.command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]))

    @property
    def dtype_name(self) -> str:
        return str(self.spec.dtype).removeprefix("torch.")


def _check_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch device such as 'cuda' or 'cpu', got {device!r}"
                         ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    if resolved.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    return resolved


def _one_of(name: str, value: Any, allowed: Sequence[str]) -> Any:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _check_choices(name: str, values: Any, allowed: Sequence[str]) -> tuple[str, ...]:
    """``values`` without repeats, checked to be a non-empty list drawn from ``allowed``."""
    if isinstance(values, str) or not values:
        raise ValueError(f"{name} must be a non-empty list drawn from {list(allowed)}, "
                         f"got {values!r}")
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
    """bench/results/<device>-<date>/ (the device "cpu" or e.g. "cuda-nvidia-h100-80gb-hbm3"),
    with -2, -3, ... when that folder is already taken."""
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
