"""What a benchmark run measures, resolved and checked before anything runs."""

from __future__ import annotations

import datetime
import importlib.util
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..activations import ACTIVATIONS
from .environment import default_device, device_slug
from .methods import INFERENCE_METHODS, TRAINING_METHODS
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

SUITES: tuple[str, ...] = ("kernel", "training", "inference")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
RESULTS_ROOT = Path("bench") / "results"


def kernel_method_names() -> tuple[str, ...]:
    from .kernel_suite import KERNEL_METHODS

    return tuple(KERNEL_METHODS)


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
    quick: bool
    out: Path
    overwrite: bool
    plots: bool
    command: str

    @classmethod
    def create(
        cls,
        *,
        suites: list[str] | tuple[str, ...] | None = None,
        device: str | torch.device | None = None,
        preset: str | None = None,
        config: str | None = None,
        config_kwargs: dict | None = None,
        dtype: str | torch.dtype | None = None,
        batch: int | None = None,
        seq_len: int | None = None,
        rank: int | None = None,
        activation: str | None = None,
        decode_tokens: int | None = None,
        seed: int = 0,
        methods: list[str] | tuple[str, ...] | None = None,
        kernel_tokens: list[int] | None = None,
        kernel_hidden_sizes: list[int] | None = None,
        quick: bool = False,
        warmup: int | None = None,
        repeats: int | None = None,
        threads: int | None = None,
        interleave: bool = True,
        out: str | Path | None = None,
        overwrite: bool = False,
        plots: bool = True,
        command: str | None = None,
    ) -> BenchmarkSettings:
        """Resolve defaults (by device and ``quick``) and check every value.

        Raises:
            ValueError: naming the option and what was expected, before anything runs.
        """
        device = _check_device(device)
        suites = _check_choices("suites", suites or SUITES, SUITES)
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        model_preset = PRESETS[preset] if preset else default_preset(device)
        if config_kwargs is not None and not isinstance(config_kwargs, dict):
            raise ValueError(f"config_kwargs must be a dict, got {type(config_kwargs).__name__}")
        spec = build_spec(model_preset, config, config_kwargs, _check_dtype(dtype))
        batch = _positive("batch", batch, model_preset.batch)
        seq_len = _positive("seq_len", seq_len, model_preset.seq_len)
        grid = default_kernel_grid(device, quick)
        # An explicit rank, activation or dtype also narrows the kernel grid to that value.
        if rank is not None:
            grid = replace(grid, ranks=(_positive("rank", rank, 0),))
        rank = _positive("rank", rank, model_preset.rank)
        if activation is not None:
            if activation not in ACTIVATIONS:
                raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
            grid = replace(grid, activations=(activation,))
        activation = activation or "identity"
        if dtype is not None:
            grid = replace(grid, dtypes=(spec.dtype,))
        default_decode = max(4, model_preset.decode_tokens // 4) if quick else None
        decode_tokens = _positive(
            "decode_tokens", decode_tokens, default_decode or model_preset.decode_tokens
        )
        if methods is not None:
            known = set(TRAINING_METHODS) | set(INFERENCE_METHODS) | set(kernel_method_names())
            methods = _check_choices("methods", methods, tuple(sorted(known)))
        if kernel_tokens is not None:
            grid = replace(grid, tokens=_positive_list("kernel_tokens", kernel_tokens))
        if kernel_hidden_sizes is not None:
            grid = replace(
                grid, hidden_sizes=_positive_list("kernel_hidden_sizes", kernel_hidden_sizes)
            )
        if threads is not None:
            threads = _positive("threads", threads, 0)
        timing = default_timing_plans(device, quick)
        if warmup is not None or repeats is not None:
            timing = timing.fixed(
                warmup=_positive("warmup", warmup, 0) if warmup is not None else None,
                repeats=_positive("repeats", repeats, 0) if repeats is not None else None,
            )
        if plots and importlib.util.find_spec("matplotlib") is None:
            raise ValueError(
                "plots need matplotlib (pip install 'steer_fast[bench]'); or pass plots=False "
                "(--no-plots)"
            )
        if out is None:
            out = _fresh_default_out(device)
            overwrite = False
        out = Path(out)
        if (out / "results.json").exists() and not overwrite:
            raise ValueError(
                f"out folder {str(out)!r} already holds results.json; choose another folder or "
                f"pass overwrite=True (--overwrite)"
            )
        return cls(
            device=device,
            preset=model_preset,
            spec=spec,
            suites=suites,
            batch=batch,
            seq_len=seq_len,
            rank=rank,
            activation=activation,
            decode_tokens=decode_tokens,
            seed=int(seed),
            methods=methods,
            kernel_grid=grid,
            timing=timing,
            threads=threads,
            interleave=bool(interleave),
            quick=quick,
            out=out,
            overwrite=overwrite,
            plots=plots,
            command=command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
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


def _check_choices(name: str, values, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(values, str) or not values:
        raise ValueError(
            f"{name} must be a non-empty list drawn from {list(allowed)}, got {values!r}"
        )
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"{name} must be drawn from {list(allowed)}; unknown: {unknown}")
    return tuple(dict.fromkeys(values))


def _positive(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _positive_list(name: str, values: list[int]) -> tuple[int, ...]:
    if not values:
        raise ValueError(f"{name} must list at least one integer >= 1")
    return tuple(_positive(name, v, 0) for v in values)


def _fresh_default_out(device: torch.device) -> Path:
    """bench/results/<device>-<date>/, with -2, -3, ... when that folder is already taken."""
    base = RESULTS_ROOT / f"{device_slug(device)}-{datetime.date.today().isoformat()}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
