"""Kernel suite: post_block_steer alone, forward and forward+backward, over a grid of shapes.

The implementations are the kernel methods (``KERNEL_METHODS``): the fused Triton kernels (CUDA
only), steer_fast's torch path, the unfused eager reference and ``torch.compile`` of it, all on
the same tensors. Beside them, per grid point and pass, the ``roofline`` row: not an
implementation but the floor for any, the minimum bytes the pass must move
(``steer_fast.traffic``: the forward reads hidden, and residual when fused, and writes out; the
backward reads grad_out and out and writes grad_hidden) over the copy bandwidth measured on the
same device in the same run. ``gbps`` is the minimum bytes over the measured time and
``roofline_pct`` the roofline time over the measured time.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..traffic import minimum_backward_bytes, minimum_forward_bytes
from .context import RunContext, describe_error, release_memory
from .memory import measure_peak_memory
from .methods import KERNEL_METHODS, Method, MethodUnavailable
from .presets import KernelGrid
from .records import BenchmarkRecord
from .timing import Call, Timing, copy_bandwidth, measure_interleaved

PASSES: tuple[str, ...] = ("forward", "forward+backward")
KERNEL_MODEL = "post_block_steer"  # kernel rows time the op alone, not the model
SCALE = 0.5
BACKENDS = {"steer_fast_fused": "triton", "steer_fast_torch": "torch"}


@dataclass(frozen=True)
class KernelCase:
    """One grid point: N tokens of width d through a rank-r adapter."""

    tokens: int
    hidden_size: int
    rank: int
    activation: str
    dtype: torch.dtype
    residual: bool

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def min_bytes(self, pass_: str) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        forward = minimum_forward_bytes(self.tokens, self.hidden_size, element, self.residual)
        if pass_ == "forward":
            return forward
        return forward + minimum_backward_bytes(self.tokens, self.hidden_size, element)

    def describe(self) -> str:
        fused = " +residual" if self.residual else ""
        return (
            f"N={self.tokens} d={self.hidden_size} r={self.rank} {self.activation} "
            f"{self.dtype_name}{fused}"
        )


def grid_cases(grid: KernelGrid) -> list[KernelCase]:
    values = (grid.tokens, grid.hidden_sizes, grid.ranks, grid.activations, grid.dtypes)
    return [KernelCase(*v) for v in itertools.product(*values, grid.residual)]


@dataclass
class KernelInputs:
    """The op's tensors for one case: ``weights`` are (down_weight, up_weight, down_bias,
    up_bias); every tensor but ``grad_out`` requires grad."""

    hidden: torch.Tensor
    weights: tuple[torch.Tensor, ...]
    residual: torch.Tensor | None
    grad_out: torch.Tensor

    @classmethod
    def create(cls, case: KernelCase, device: torch.device, seed: int) -> KernelInputs:
        generator = torch.Generator(device=device).manual_seed(seed)

        def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
            values = torch.randn(*shape, generator=generator, device=device, dtype=torch.float32)
            return (values * scale).to(case.dtype).requires_grad_(True)

        n, d, r = case.tokens, case.hidden_size, case.rank
        hidden = randn(n, d)
        weights = randn(r, d, scale=d**-0.5), randn(d, r, scale=r**-0.5)
        weights += randn(r, scale=0.1), randn(d, scale=0.1)
        residual = randn(n, d) if case.residual else None
        return cls(hidden, weights, residual, randn(n, d).detach())

    def differentiable(self) -> list[torch.Tensor]:
        return [self.hidden, *self.weights, *([] if self.residual is None else [self.residual])]


def pass_function(
    steer: Callable[..., torch.Tensor], case: KernelCase, inputs: KernelInputs, pass_: str
) -> Callable[[], Any]:
    """The timed call: the forward under no_grad, or forward then the gradients of all inputs."""

    def forward() -> torch.Tensor:
        return steer(
            inputs.hidden,
            *inputs.weights,
            activation=case.activation,
            scale=SCALE,
            residual=inputs.residual,
        )

    if pass_ == "forward":
        return torch.no_grad()(forward)
    return lambda: torch.autograd.grad(forward(), inputs.differentiable(), inputs.grad_out)


def kernel_job_count(ctx: RunContext) -> int:
    methods = KERNEL_METHODS.select(ctx.settings.methods)
    if not methods:
        return 0
    return 1 + len(grid_cases(ctx.settings.kernel_grid)) * len(PASSES) * len(methods)


def run_kernel_suite(ctx: RunContext) -> Iterator[BenchmarkRecord]:
    """Yield the copy-bandwidth record, then per case and pass the roofline and every method."""
    methods = KERNEL_METHODS.select(ctx.settings.methods)
    if not methods:
        return
    ctx.advance("kernel: copy bandwidth")
    bandwidth = copy_bandwidth(ctx.device)
    yield ctx.record(
        "kernel",
        "copy",
        "tensor copy (bandwidth probe)",
        model=KERNEL_MODEL,
        batch=1,
        seq_len=bandwidth.bytes_moved // 2,
        rank=None,
        activation=None,
        dtype="float32",
        **bandwidth.timing.record_fields(),
        min_bytes=bandwidth.bytes_moved,
        gbps=bandwidth.bytes_per_s / 1e9,
        roofline_pct=100.0,
    )
    for case in grid_cases(ctx.settings.kernel_grid):
        inputs = KernelInputs.create(case, ctx.device, ctx.settings.seed)
        steers: dict[str, Callable[..., torch.Tensor] | MethodUnavailable] = {}
        for method in methods:
            try:
                steers[method.name] = method.setup(ctx.device)
            except MethodUnavailable as reason:
                steers[method.name] = reason
        for pass_ in PASSES:
            yield from _run_pass(ctx, case, pass_, methods, steers, inputs, bandwidth.bytes_per_s)
        del inputs, steers
        release_memory(ctx.device)


def _run_pass(
    ctx: RunContext,
    case: KernelCase,
    pass_: str,
    methods: list[Method],
    steers: dict[str, Any],
    inputs: KernelInputs,
    bytes_per_s: float,
) -> list[BenchmarkRecord]:
    """The roofline row, then one row per method for one case and pass (timed in rounds)."""
    min_bytes = case.min_bytes(pass_)
    roofline_ms = min_bytes / bytes_per_s * 1e3
    shared = dict(
        model=KERNEL_MODEL,
        batch=1,
        seq_len=case.tokens,
        rank=case.rank,
        activation=case.activation,
        dtype=case.dtype_name,
        pass_=pass_,
        tokens=case.tokens,
        hidden_size=case.hidden_size,
        residual=case.residual,
        min_bytes=min_bytes,
    )
    rows = [
        ctx.record(
            "kernel",
            "roofline",
            "memory roofline",
            ms=roofline_ms,
            ms_min=roofline_ms,
            ms_max=roofline_ms,
            tokens_per_s=case.tokens / (roofline_ms * 1e-3),
            gbps=bytes_per_s / 1e9,
            roofline_pct=100.0,
            **shared,
        )
    ]
    calls = {
        name: Call(pass_function(steer, case, inputs, pass_))
        for name, steer in steers.items()
        if not isinstance(steer, MethodUnavailable)
    }
    ctx.advance(f"kernel: {pass_} {case.describe()}", count=False)
    groups = [calls] if ctx.settings.interleave else [{n: c} for n, c in calls.items()]
    timings: dict[str, Timing | Exception] = {}
    for group in groups:
        timings.update(measure_interleaved(group, ctx.device, ctx.settings.timing.kernel, True))
    for method in methods:
        ctx.advance(f"kernel: {method.name} {pass_} {case.describe()}")
        row = functools.partial(ctx.record, "kernel", method.name, method.label, **shared)
        if isinstance(steers[method.name], MethodUnavailable):
            rows.append(row(status="skipped", reason=str(steers[method.name])))
            continue
        try:
            timing = timings[method.name]
            if isinstance(timing, Exception):
                raise timing
            resident = [*inputs.differentiable(), inputs.grad_out]
            memory = measure_peak_memory(calls[method.name].fn, ctx.device, resident)
        except Exception as error:  # a failing implementation gets a row that says why
            rows.append(row(status="failed", reason=describe_error(error)))
            continue
        seconds = timing.median_ms * 1e-3
        rows.append(
            row(
                **timing.record_fields(),
                tokens_per_s=case.tokens / seconds,
                peak_mem_bytes=memory.peak_bytes,
                memory_measure=memory.measure,
                gbps=min_bytes / seconds / 1e9,
                roofline_pct=100.0 * roofline_ms / timing.median_ms,
                backend=BACKENDS.get(method.name),
            )
        )
    return rows
