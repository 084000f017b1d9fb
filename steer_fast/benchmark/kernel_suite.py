"""Kernel suite: post_block_steer alone, forward and forward+backward, over a grid of shapes.

Implementations compared on the same tensors:

- ``steer_fast_fused``: the fused Triton kernels (CUDA only; on the CPU the row is skipped,
  since the kernels run there only under the Triton interpreter);
- ``steer_fast_torch``: steer_fast's torch path, the same custom op with its PyTorch backend;
- ``eager``: the unfused reference in plain autograd PyTorch (``reference_post_block_steer``);
- ``torch_compile``: ``torch.compile(fullgraph=True, dynamic=False)`` of that reference, compiled
  afresh for every grid point (warm-up calls absorb the compilation);
- ``roofline``: not an implementation but the floor for any: the minimum bytes the pass must move
  over the copy bandwidth measured on the same device in the same run.

Minimum bytes: forward reads hidden (and residual when fused) and writes out; backward reads
grad_out and out and writes grad_hidden (``steer_fast.traffic``). ``gbps`` is the minimum bytes
over the measured time and ``roofline_pct`` the roofline time over the measured time.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from ..ops import post_block_steer, triton_available
from ..reference import reference_post_block_steer
from ..traffic import minimum_backward_bytes, minimum_forward_bytes
from .context import RunContext, describe_error, release_memory
from .memory import measure_peak_memory
from .methods import TRITON_NEEDS_CUDA, MethodUnavailable
from .presets import KernelGrid
from .records import BenchmarkRecord
from .timing import Call, Timing, copy_bandwidth, measure_interleaved

PASSES: tuple[str, ...] = ("forward", "forward+backward")
KERNEL_MODEL = "post_block_steer"  # kernel rows time the op alone, not the model
SCALE = 0.5


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
    return [
        KernelCase(*values)
        for values in itertools.product(
            grid.tokens, grid.hidden_sizes, grid.ranks, grid.activations, grid.dtypes, grid.residual
        )
    ]


@dataclass
class KernelInputs:
    """The op's tensors for one case, the differentiable ones first."""

    hidden: torch.Tensor
    down_weight: torch.Tensor
    up_weight: torch.Tensor
    down_bias: torch.Tensor
    up_bias: torch.Tensor
    residual: torch.Tensor | None
    grad_out: torch.Tensor

    @classmethod
    def create(cls, case: KernelCase, device: torch.device, seed: int) -> KernelInputs:
        generator = torch.Generator(device=device).manual_seed(seed)

        def randn(*shape, scale=1.0):
            values = torch.randn(*shape, generator=generator, device=device, dtype=torch.float32)
            return (values * scale).to(case.dtype).requires_grad_(True)

        n, d, r = case.tokens, case.hidden_size, case.rank
        return cls(
            hidden=randn(n, d),
            down_weight=randn(r, d, scale=d**-0.5),
            up_weight=randn(d, r, scale=r**-0.5),
            down_bias=randn(r, scale=0.1),
            up_bias=randn(d, scale=0.1),
            residual=randn(n, d) if case.residual else None,
            grad_out=randn(n, d).detach(),
        )

    def differentiable(self) -> list[torch.Tensor]:
        tensors = [self.hidden, self.down_weight, self.up_weight, self.down_bias, self.up_bias]
        return tensors + ([self.residual] if self.residual is not None else [])

    def all(self) -> list[torch.Tensor]:
        return [*self.differentiable(), self.grad_out]


SteerFunction = Callable[..., torch.Tensor]


def _steer_triton(case: KernelCase, device: torch.device) -> SteerFunction:
    if device.type != "cuda":
        raise MethodUnavailable(TRITON_NEEDS_CUDA)
    if not triton_available():
        raise MethodUnavailable("triton is not installed")
    return functools.partial(post_block_steer, backend="triton")


def _steer_torch(case: KernelCase, device: torch.device) -> SteerFunction:
    return functools.partial(post_block_steer, backend="torch")


def _eager(case: KernelCase, device: torch.device) -> SteerFunction:
    return reference_post_block_steer


def _compiled(case: KernelCase, device: torch.device) -> SteerFunction:
    # A fresh compilation per grid point: static shapes, and no recompile limit that could
    # quietly fall back to eager after a few cases.
    torch._dynamo.reset()
    return torch.compile(reference_post_block_steer, fullgraph=True, dynamic=False)


@dataclass(frozen=True)
class KernelMethod:
    name: str
    label: str
    setup: Callable[[KernelCase, torch.device], SteerFunction]


KERNEL_METHODS: dict[str, KernelMethod] = {
    m.name: m
    for m in (
        KernelMethod("steer_fast_fused", "steer_fast fused (Triton)", _steer_triton),
        KernelMethod("steer_fast_torch", "steer_fast torch path", _steer_torch),
        KernelMethod("eager", "unfused eager", _eager),
        KernelMethod("torch_compile", "torch.compile(unfused)", _compiled),
    )
}


def pass_function(
    steer: SteerFunction, case: KernelCase, inputs: KernelInputs, pass_: str
) -> Callable[[], object]:
    """The timed call: the forward under no_grad, or forward then the gradients of all inputs."""

    def forward():
        return steer(
            inputs.hidden,
            inputs.down_weight,
            inputs.up_weight,
            inputs.down_bias,
            inputs.up_bias,
            activation=case.activation,
            scale=SCALE,
            residual=inputs.residual,
        )

    if pass_ == "forward":

        def run_forward():
            with torch.no_grad():
                return forward()

        return run_forward

    def run_forward_backward():
        return torch.autograd.grad(forward(), inputs.differentiable(), inputs.grad_out)

    return run_forward_backward


def kernel_job_count(ctx: RunContext) -> int:
    methods = _selected(ctx)
    if not methods:
        return 0
    return 1 + len(grid_cases(ctx.settings.kernel_grid)) * len(PASSES) * len(methods)


def _selected(ctx: RunContext) -> list[KernelMethod]:
    names = ctx.settings.methods
    return [m for n, m in KERNEL_METHODS.items() if names is None or n in names]


def run_kernel_suite(ctx: RunContext) -> Iterator[BenchmarkRecord]:
    """Yield the copy-bandwidth record, then per case and pass the roofline and every method."""
    device = ctx.device
    methods = _selected(ctx)
    if not methods:
        return
    ctx.advance("kernel: copy bandwidth")
    bandwidth = copy_bandwidth(device)
    bytes_per_s = bandwidth.bytes_per_s
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
        ms=bandwidth.timing.median_ms,
        ms_min=bandwidth.timing.min_ms,
        ms_max=bandwidth.timing.max_ms,
        repeats=bandwidth.timing.repeats,
        warmup=bandwidth.timing.warmup,
        min_bytes=bandwidth.bytes_moved,
        gbps=bytes_per_s / 1e9,
        roofline_pct=100.0,
    )
    for case in grid_cases(ctx.settings.kernel_grid):
        inputs = KernelInputs.create(case, device, ctx.settings.seed)
        implementations: dict[str, SteerFunction | BenchmarkRecord] = {}
        for method in methods:
            try:
                implementations[method.name] = method.setup(case, device)
            except MethodUnavailable as reason:
                implementations[method.name] = ctx.record(
                    "kernel", method.name, method.label, status="skipped", reason=str(reason)
                )
        for pass_ in PASSES:
            yield from _run_pass(ctx, case, pass_, methods, implementations, inputs, bytes_per_s)
        del inputs, implementations
        release_memory(device)


def _run_pass(
    ctx: RunContext,
    case: KernelCase,
    pass_: str,
    methods: list[KernelMethod],
    implementations: dict,
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
        for name, steer in implementations.items()
        if not isinstance(steer, BenchmarkRecord)
    }
    ctx.advance(f"kernel: {pass_} {case.describe()}", count=False)
    plan = ctx.settings.timing.kernel
    groups = [calls] if ctx.settings.interleave else [{n: c} for n, c in calls.items()]
    timings = {}
    for group in groups:
        timings.update(measure_interleaved(group, ctx.device, plan, flush_l2=True))
    for method in methods:
        ctx.advance(f"kernel: {method.name} {pass_} {case.describe()}")
        outcome = implementations[method.name]
        if isinstance(outcome, BenchmarkRecord):
            rows.append(replace(outcome, **shared))
        else:
            rows.append(_record(ctx, method, calls[method.name], timings[method.name],
                                roofline_ms, inputs, shared))
    return rows


def _record(
    ctx: RunContext,
    method: KernelMethod,
    call: Call,
    timing: Timing | Exception,
    roofline_ms: float,
    inputs: KernelInputs,
    shared: dict,
) -> BenchmarkRecord:
    if isinstance(timing, Exception):
        return ctx.record("kernel", method.name, method.label, status="failed",
                          reason=describe_error(timing), **shared)
    try:
        memory = measure_peak_memory(call.fn, ctx.device, resident=inputs.all())
    except Exception as error:  # a failing implementation gets a row that says why
        return ctx.record("kernel", method.name, method.label, status="failed",
                          reason=describe_error(error), **shared)
    seconds = timing.median_ms * 1e-3
    return ctx.record(
        "kernel",
        method.name,
        method.label,
        **timing.record_fields(),
        tokens_per_s=shared["tokens"] / seconds,
        peak_mem_bytes=memory.peak_bytes,
        memory_measure=memory.measure,
        gbps=shared["min_bytes"] / seconds / 1e9,
        roofline_pct=100.0 * roofline_ms / timing.median_ms,
        backend={"steer_fast_fused": "triton", "steer_fast_torch": "torch"}.get(method.name),
        **shared,
    )
