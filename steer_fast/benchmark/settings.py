"""What a benchmark run measures: the options as given, and the settings resolved from them.

``BenchmarkOptions`` names every option once, with its help text, its default and how the
command line reads it in the field's metadata; ``steer-fast bench`` builds its options from it
(``steer_fast.cli``). ``BenchmarkSettings.create(**options)`` fills in every default (by device,
preset and ``quick``) and checks every value, before anything runs.
"""

from __future__ import annotations

import datetime
import importlib.util
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..activations import ACTIVATIONS
from .environment import default_device, device_slug
from .methods import METHODS, SUITES
from .models import ModelSpec, build_spec
from .presets import (
    PRESETS,
    KernelGrid,
    ModelPreset,
    TimingPlans,
    default_kernel_grid,
    default_preset,
    default_timing_plans,
)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
RESULTS_ROOT = Path("bench") / "results"
# The option groups of the command line's help, in this order.
WHAT = "what to run"
MODEL = "model (random weights, nothing downloaded)"
SHAPES = "shapes"
OUTPUT = "output"


def option(help: str, group: str, shown: str | None = None, default: Any = None, **cli: Any):
    """A field of ``BenchmarkOptions`` and its command-line option.

    ``help`` says what it does (for a switch that is on by default: what its ``--no-...`` flag
    does) and ``shown`` what a None default stands for. ``cli`` may set ``kind`` ("int", "json",
    or "names" / "ints": one or more values, space- or comma-separated), ``choices``, ``metavar``
    and ``flag`` (the option's name, when it is not the field's).
    """
    return field(default=default, metadata=dict(help=help, group=group, shown=shown, **cli))


@dataclass(frozen=True)
class BenchmarkOptions:
    """Every option of a run as given: None (or the default) where the user chose nothing."""

    suites: Sequence[str] | None = option(
        f"suites to run, from {list(SUITES)}", WHAT, "all", kind="names", metavar="SUITE"
    )
    methods: Sequence[str] | None = option(
        "only these methods, as --list names them", WHAT, "all", kind="names", metavar="METHOD"
    )
    quick: bool = option(
        "fewer repeats, a smaller kernel grid, fewer decoded tokens", WHAT, default=False
    )
    warmup: int | None = option(
        "warm-up calls before each measurement", WHAT, "per suite", kind="int"
    )
    repeats: int | None = option(
        "exactly this many measured calls", WHAT, "adaptive per suite", kind="int"
    )
    interleave: bool = option(
        "time the methods one after another, each freed before the next is built (for models "
        "too large to hold once per method)",
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
        "a transformers config class (e.g. MistralConfig, sized by the preset) or a path to a "
        "config.json / model folder",
        MODEL,
        "LlamaConfig",
        metavar="CLASS_OR_PATH",
    )
    config_kwargs: dict | None = option(
        "config fields to override, as a JSON object", MODEL, "none", kind="json"
    )
    dtype: str | torch.dtype | None = option(
        "model dtype; also narrows the kernel grid", MODEL, "the preset's", choices=sorted(DTYPES)
    )
    device: str | torch.device | None = option("cuda or cpu", MODEL, "cuda if available")
    threads: int | None = option(
        "torch intra-op threads for the run", MODEL, "torch's choice", kind="int"
    )
    batch: int | None = option("sequences per batch", SHAPES, "the preset's", kind="int")
    seq_len: int | None = option("tokens per sequence", SHAPES, "the preset's", kind="int")
    rank: int | None = option(
        "adapter rank for every method; also narrows the kernel grid",
        SHAPES,
        "the preset's",
        kind="int",
    )
    activation: str | None = option(
        "steering nonlinearity; also narrows the kernel grid",
        SHAPES,
        "identity",
        choices=ACTIVATIONS,
    )
    decode_tokens: int | None = option(
        "tokens decoded after the prefill",
        SHAPES,
        "the preset's, a quarter with --quick",
        kind="int",
    )
    kernel_tokens: Sequence[int] | None = option(
        "token counts of the kernel grid", SHAPES, "per device", kind="ints", metavar="N"
    )
    kernel_hidden_sizes: Sequence[int] | None = option(
        "hidden sizes of the kernel grid",
        SHAPES,
        "per device",
        kind="ints",
        metavar="D",
        flag="--kernel-hidden",
    )
    seed: int = option("seed of every method's weights and data", SHAPES, default=0, kind="int")
    out: str | Path | None = option(
        "output folder", OUTPUT, "bench/results/<device>-<date>/, never reused"
    )
    overwrite: bool = option(
        "allow writing into a folder that already holds results.json", OUTPUT, default=False
    )
    plots: bool = option("skip the PNG plots", OUTPUT, default=True)
    # Recorded in every result; not an option (the command line sets it to itself).
    command: str | None = None


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
    timing: TimingPlans
    threads: int | None
    interleave: bool
    out: Path
    plots: bool
    command: str

    @classmethod
    def create(cls, **options: Any) -> BenchmarkSettings:
        """``from_options(BenchmarkOptions(**options))``."""
        return cls.from_options(BenchmarkOptions(**options))

    @classmethod
    def from_options(cls, options: BenchmarkOptions) -> BenchmarkSettings:
        """Resolve defaults (by device, preset and ``quick``) and check every value.

        Raises:
            ValueError: naming the option and what was expected, before anything runs.
        """
        o = options
        device = _check_device(o.device)
        suites = _check_choices("suites", o.suites or SUITES, SUITES)
        if o.preset is not None and o.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {o.preset!r}")
        preset = PRESETS[o.preset] if o.preset else default_preset(device)
        if o.config_kwargs is not None and not isinstance(o.config_kwargs, dict):
            raise ValueError(f"config_kwargs must be a dict, got {type(o.config_kwargs).__name__}")
        spec = build_spec(preset, o.config, o.config_kwargs, _check_dtype(o.dtype))
        batch = _positive("batch", o.batch, preset.batch)
        seq_len = _positive("seq_len", o.seq_len, preset.seq_len)
        grid = default_kernel_grid(device, o.quick)
        # An explicit rank, activation or dtype also narrows the kernel grid to that value.
        rank = _positive("rank", o.rank, preset.rank)
        if o.rank is not None:
            grid = replace(grid, ranks=(rank,))
        if o.activation is not None:
            if o.activation not in ACTIVATIONS:
                raise ValueError(f"activation must be one of {ACTIVATIONS}, got {o.activation!r}")
            grid = replace(grid, activations=(o.activation,))
        if o.dtype is not None:
            grid = replace(grid, dtypes=(spec.dtype,))
        decode_default = max(4, preset.decode_tokens // 4) if o.quick else preset.decode_tokens
        decode_tokens = _positive("decode_tokens", o.decode_tokens, decode_default)
        methods = None
        if o.methods is not None:
            known = sorted({name for table in METHODS.values() for name in table})
            methods = _check_choices("methods", o.methods, tuple(known))
        if o.kernel_tokens is not None:
            grid = replace(grid, tokens=_positive_list("kernel_tokens", o.kernel_tokens))
        if o.kernel_hidden_sizes is not None:
            sizes = _positive_list("kernel_hidden_sizes", o.kernel_hidden_sizes)
            grid = replace(grid, hidden_sizes=sizes)
        threads = _positive("threads", o.threads)
        timing = default_timing_plans(device, o.quick)
        if o.warmup is not None or o.repeats is not None:
            timing = timing.fixed(_positive("warmup", o.warmup), _positive("repeats", o.repeats))
        if o.plots and importlib.util.find_spec("matplotlib") is None:
            raise ValueError(
                "plots need matplotlib (pip install 'steer_fast[bench]'); or pass plots=False "
                "(--no-plots)"
            )
        out = _fresh_default_out(device) if o.out is None else Path(o.out)
        if o.out is not None and (out / "results.json").exists() and not o.overwrite:
            raise ValueError(
                f"out folder {str(out)!r} already holds results.json; choose another folder or "
                f"pass overwrite=True (--overwrite)"
            )
        return cls(
            device=device,
            preset=preset,
            spec=spec,
            suites=suites,
            batch=batch,
            seq_len=seq_len,
            rank=rank,
            activation=o.activation or "identity",
            decode_tokens=decode_tokens,
            seed=int(o.seed),
            methods=methods,
            kernel_grid=grid,
            timing=timing,
            threads=threads,
            interleave=bool(o.interleave),
            out=out,
            plots=o.plots,
            command=o.command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        )

    @property
    def dtype_name(self) -> str:
        return str(self.spec.dtype).removeprefix("torch.")


def _check_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device must be a torch device such as 'cuda' or 'cpu', got {device!r}"
        ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    if resolved.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    return resolved


def _check_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def _check_choices(name: str, values: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
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


def _positive_list(name: str, values: list[int]) -> tuple[int, ...]:
    if not values:
        raise ValueError(f"{name} must list at least one integer >= 1")
    return tuple(_positive(name, v) for v in values)


def _fresh_default_out(device: torch.device) -> Path:
    """bench/results/<device>-<date>/, with -2, -3, ... when that folder is already taken."""
    base = RESULTS_ROOT / f"{device_slug(device)}-{datetime.date.today().isoformat()}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
