"""Sweep the kernels' block shapes on a GPU and compare them with the launch heuristics.

For each shape (tokens N, width d, rank r, dtype) every candidate ``ForwardConfig`` and every
candidate backward shape (the rows kernel and the columns kernel, timed one launch at a time
through ``plan_backward``) is first checked against the heuristic config's results, then timed
with the L2 cache flushed before every repeat. A candidate that does not compile, or fails the
check, gets a record that says so. Each record carries the time, the bandwidth over the
kernel's unavoidable N x d bytes, and its fraction of the copy bandwidth measured in the same
run.

``python bench/dev/tune_kernels.py`` runs it; the results are what the heuristics in
``kernels/post_block_steer.py`` should be updated from. Under the Triton interpreter (CPU
tensors, ``quick=True``) the sweep checks every candidate's results on tiny shapes; its timings
mean nothing there. Importing this module imports the kernels: for the interpreter, set
``TRITON_INTERPRET=1`` first.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch

from steer_fast.kernels import post_block_steer as kernels
from steer_fast.ops import activation_id
from steer_fast_bench.benchmark.timing import TimingPlan, copy_bandwidth, measure

_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@dataclass(frozen=True)
class TuningShape:
    tokens: int
    hidden_size: int
    rank: int
    dtype: torch.dtype
    activation: str = "silu"


def forward_candidates(shape: TuningShape, quick: bool = False) -> list[kernels.ForwardConfig]:
    """Block shapes to try for the forward: rows x column chunk x warps x stages."""
    rows, chunks, warps, stages = [16, 32, 64], [64, 128, 256], [4, 8], [2, 3]
    if quick:
        rows, chunks, warps, stages = [16, 32], [16, 32], [4], [2]
    candidates = [
        kernels.ForwardConfig(m, d, w, s)
        for m, d, w, s in itertools.product(rows, chunks, warps, stages)
        if d < shape.hidden_size
    ]
    single = max(16, 1 << (shape.hidden_size - 1).bit_length())
    if single <= 512:
        candidates += [kernels.ForwardConfig(m, single, w) for m in rows for w in warps]
    return candidates


def backward_candidates(shape: TuningShape, quick: bool = False) -> dict[str, list[dict]]:
    """Per kernel ("rows", "cols"), the BackwardConfig fields to try for it."""
    if quick:
        return {
            "rows": [dict(rows_block_m=m, rows_block_d=d) for m in (16, 32) for d in (16, 32)],
            "cols": [
                dict(cols_block_m=m, cols_block_d=d, splits=s)
                for m in (16,)
                for d in (16, 32)
                for s in (1, 3)
            ],
        }
    return {
        "rows": [
            dict(rows_block_m=m, rows_block_d=d, num_warps=w)
            for m, d, w in itertools.product((16, 32, 64), (64, 128, 256, 512), (4, 8))
        ],
        "cols": [
            dict(cols_block_m=m, cols_block_d=d, num_warps=w, splits=s)
            for m, d, w, s in itertools.product(
                (16, 32), (16, 32, 64, 128), (4, 8), (None, 132, 264)
            )
        ],
    }


class _Inputs:
    """Random inputs of one shape, and the heuristic config's results to check against."""

    def __init__(self, shape: TuningShape, device: torch.device, seed: int = 0) -> None:
        generator = torch.Generator(device="cpu").manual_seed(seed)

        def randn(*size, scale=1.0):
            values = torch.randn(*size, generator=generator) * scale
            return values.to(device=device, dtype=shape.dtype)

        n, d, r = shape.tokens, shape.hidden_size, shape.rank
        self.hidden, self.residual = randn(n, d), randn(n, d)
        self.down, self.up = randn(r, d, scale=d**-0.5), randn(d, r, scale=r**-0.5)
        self.down_bias, self.up_bias = randn(r, scale=0.5), randn(d, scale=0.5)
        self.grad_out = randn(n, d)
        self.shape = shape
        self.forward = kernels.post_block_steer_forward(*self.forward_args())
        self.backward = kernels.post_block_steer_backward(*self.backward_args())

    def forward_args(self) -> tuple:
        return (
            self.hidden,
            self.down,
            self.up,
            self.down_bias,
            self.up_bias,
            self.residual,
            activation_id(self.shape.activation),
            0.5,
        )

    def backward_args(self) -> tuple:
        return (
            self.grad_out,
            self.forward.out,
            self.forward.z,
            self.down,
            self.up,
            self.up_bias,
            activation_id(self.shape.activation),
            0.5,
        )


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    scale = want.abs().max().float().clamp_min(1.0)
    return bool(((got.float() - want.float()).abs().max() / scale) <= _TOLERANCE[dtype])


def _row(shape: TuningShape, kernel: str, config: object, **fields) -> dict:
    return {
        "tokens": shape.tokens,
        "hidden_size": shape.hidden_size,
        "rank": shape.rank,
        "dtype": str(shape.dtype).removeprefix("torch."),
        "activation": shape.activation,
        "kernel": kernel,
        "config": asdict(config) if config is not None else None,
        **fields,
    }


def tune_shape(
    shape: TuningShape,
    device: torch.device,
    copy_bytes_per_s: float,
    plan: TimingPlan,
    quick: bool = False,
) -> Iterator[dict]:
    """Records for every candidate of one shape (the heuristic config first, marked)."""
    inputs = _Inputs(shape, device)
    dense = shape.tokens * shape.hidden_size * inputs.hidden.element_size()
    # The N x d traffic each kernel cannot avoid: the forward reads hidden and residual and
    # writes out; the rows kernel reads grad_out; the columns kernel reads grad_out and out and
    # writes grad_hidden.
    minimum_bytes = {"forward": 3 * dense, "backward rows": dense, "backward cols": 3 * dense}

    def timed(kernel: str, config, launch, check, heuristic=False) -> dict:
        """``check()`` runs the candidate's whole pass and compares it with the heuristic's;
        then ``launch`` (the kernel under test alone) is timed."""
        try:
            if not check():
                return _row(shape, kernel, config, status="wrong results", heuristic=heuristic)
            timing = measure(launch, device, plan, flush_l2=device.type == "cuda")
        except Exception as error:  # a candidate that does not build gets a row that says why
            reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            return _row(shape, kernel, config, status="failed", reason=reason, heuristic=heuristic)
        bytes_per_s = minimum_bytes[kernel] / (timing.median_ms * 1e-3)
        return _row(
            shape,
            kernel,
            config,
            status="ok",
            heuristic=heuristic,
            ms=timing.median_ms,
            ms_min=timing.min_ms,
            ms_max=timing.max_ms,
            gbps=bytes_per_s / 1e9,
            copy_fraction=bytes_per_s / copy_bytes_per_s,
        )

    default_forward = kernels.default_forward_config(shape.hidden_size, shape.rank, shape.dtype)
    for config in [default_forward, *forward_candidates(shape, quick)]:
        result = kernels.plan_forward(*inputs.forward_args(), config=config)
        launch = result.launches[0]

        def check(result=result):
            result.launches[0]()
            return _close(result.result.out, inputs.forward.out, shape.dtype) and _close(
                result.result.z, inputs.forward.z, shape.dtype
            )

        yield timed("forward", config, launch, check, config is default_forward)

    default_backward = kernels.default_backward_config(shape.hidden_size, shape.rank, shape.dtype)
    candidates = backward_candidates(shape, quick)
    for kernel_index, name in ((0, "rows"), (1, "cols")):
        configs = [default_backward] + [
            replace(default_backward, **fields) for fields in candidates[name]
        ]
        for config in configs:
            result = kernels.plan_backward(*inputs.backward_args(), config=config)
            # Timed alone: the check before it has run the kernels that fill its inputs (gz for
            # the columns kernel), and their buffers stay filled between repeats.
            launch = result.launches[kernel_index]

            def check(result=result):
                for kernel_launch in result.launches:
                    kernel_launch()
                return all(
                    _close(got, want, shape.dtype)
                    for got, want in zip(result.result, inputs.backward)
                )

            yield timed(f"backward {name}", config, launch, check, config is default_backward)


def tune(
    shapes: list[TuningShape],
    device: torch.device,
    plan: TimingPlan | None = None,
    quick: bool = False,
) -> Iterator[dict]:
    """Tune every shape; the first record is the copy bandwidth the fractions refer to."""
    plan = plan or TimingPlan(warmup=3, min_repeats=10, max_repeats=50, budget_s=0.3)
    bandwidth = copy_bandwidth(device)
    yield {
        "kernel": "copy",
        "status": "ok",
        "gbps": bandwidth.bytes_per_s / 1e9,
        "ms": bandwidth.timing.median_ms,
    }
    for shape in shapes:
        yield from tune_shape(shape, device, bandwidth.bytes_per_s, plan, quick)


def best_rows(records: list[dict]) -> list[dict]:
    """Per shape and kernel: the heuristic's record and the fastest correct candidate's."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        if record["kernel"] == "copy":
            continue
        key = (
            record["tokens"],
            record["hidden_size"],
            record["rank"],
            record["dtype"],
            record["kernel"],
        )
        groups.setdefault(key, []).append(record)
    rows = []
    for key, group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        heuristic = next((r for r in group if r["heuristic"]), None)
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        rows.append(
            {
                "key": key,
                "heuristic": heuristic,
                "best": best,
                "failed": sum(r["status"] != "ok" for r in group),
            }
        )
    return rows
