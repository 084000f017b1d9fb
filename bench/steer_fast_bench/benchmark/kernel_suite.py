"""Kernel suite: post_block_steer alone, forward and forward+backward, over a grid of shapes.

Every kernel method (``KERNEL_METHODS``) runs on the same tensors. Beside them, per grid point
and pass, the ``roofline`` row: the floor for any implementation, the minimum bytes the pass
must move (``steer_fast_bench.traffic``: the forward reads hidden, and residual when fused, and
writes out; the backward reads grad_out and out and writes grad_hidden) over the copy bandwidth
measured on the same device in the same run. ``gbps`` is the minimum bytes over the measured
time and ``roofline_pct`` the roofline time over the measured time.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from ..traffic import minimum_backward_bytes, minimum_forward_bytes
from .memory import MEASURES, measure_peak_memory, release_memory
from .methods import KERNEL_METHODS, expected_to_run
from .records import BenchmarkRecord, RunContext, not_run
from .timing import Call, copy_bandwidth, measure_interleaved, unwrap

PASSES: tuple[str, ...] = ("forward", "forward+backward")
KERNEL_MODEL = "post_block_steer"  # kernel rows time the op alone, not the model
SCALE = 0.5
BACKENDS = {"steer_fast_fused": "triton", "steer_fast_torch": "torch"}
# Rough costs for the time estimate, by device type: torch.compile of the reference per case
# and pass, the profiler's own time per peak-memory call, the bandwidth of elementwise work.
COMPILED, COMPILE_S = ("torch_compile",), {"cpu": 2.0, "cuda": 10.0}
PROFILER_S = {"cpu": 0.05, "cuda": 0.0}
ELEMENTWISE_BYTES_PER_S = {"cpu": 5e9, "cuda": 1e12}


class KernelCase(NamedTuple):
    """One grid point: N tokens of width d through a rank-r adapter."""

    tokens: int
    hidden_size: int
    rank: int
    activation: str
    dtype: torch.dtype
    residual: bool

    def min_bytes(self, pass_: str) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        forward = minimum_forward_bytes(self.tokens, self.hidden_size, element, self.residual)
        if pass_ == "forward":
            return forward
        return forward + minimum_backward_bytes(self.tokens, self.hidden_size, element)

    def flops(self, pass_: str) -> int:
        """Multiply-adds x 2 of the pass: D h and U z forward; the backward's four products,
        and the rebuild of h from the output, about five more."""
        products = 2 if pass_ == "forward" else 7
        return 2 * products * self.tokens * self.hidden_size * self.rank


def kernel_inputs(case: KernelCase, device: torch.device, seed: int) -> dict[str, Any]:
    """The op's tensors for one case, by ``post_block_steer``'s argument names, and
    ``grad_out``; every tensor but ``grad_out`` requires grad (residual is None unless fused)."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        values = torch.randn(*shape, generator=generator, device=device, dtype=torch.float32)
        return (values * scale).to(case.dtype).requires_grad_(True)

    n, d, r = case.tokens, case.hidden_size, case.rank
    inputs = dict(
        hidden=randn(n, d),
        down_weight=randn(r, d, scale=d**-0.5),
        up_weight=randn(d, r, scale=r**-0.5),
        down_bias=randn(r, scale=0.1),
        up_bias=randn(d, scale=0.1),
        residual=randn(n, d) if case.residual else None,
    )
    return {**inputs, "grad_out": randn(n, d).detach()}


def pass_function(
    steer: Callable[..., torch.Tensor], case: KernelCase, inputs: dict[str, Any], pass_: str
) -> Callable[[], Any]:
    """The timed call: the forward under no_grad, or forward then the gradients of all inputs."""
    arguments = dict(inputs)
    grad_out = arguments.pop("grad_out")
    forward = lambda: steer(**arguments, activation=case.activation, scale=SCALE)
    if pass_ == "forward":
        return torch.no_grad()(forward)
    differentiable = [t for t in arguments.values() if t is not None]
    return lambda: torch.autograd.grad(forward(), differentiable, grad_out)


def grid_cases(ctx: RunContext) -> list[KernelCase]:
    return [KernelCase(*values) for values in itertools.product(*ctx.settings.kernel_grid)]


def estimate_s(ctx: RunContext, flops_per_s: float) -> float:
    """The suite's expected seconds: a second for the copy probe, then per case, pass and
    implementation that should run here the warm-ups, the repeats the timing plan buys and the
    peak-memory call; each call timed as the case's FLOPs at ``flops_per_s`` plus three times
    its minimum bytes at a typical bandwidth; and torch.compile's compile per case and pass."""
    s, kind = ctx.settings, ctx.settings.device.type
    methods = [m for m in KERNEL_METHODS.select(s.methods) if expected_to_run(m, s.device)]
    total, plan = (1.0 if methods else 0.0), s.timing["kernel"]
    for case, pass_ in itertools.product(grid_cases(ctx), PASSES):
        t = (
            case.flops(pass_) / flops_per_s
            + 3 * case.min_bytes(pass_) / ELEMENTWISE_BYTES_PER_S[kind]
        )
        for method in methods:
            total += (
                (plan.warmup + plan.repeats_for(t) + 1) * t
                + PROFILER_S[kind]
                + COMPILE_S[kind] * (method.name in COMPILED)
            )
    return total


def run_kernel_suite(ctx: RunContext) -> Iterator[BenchmarkRecord]:
    """Yield the copy-bandwidth record, then per case and pass the roofline and every method."""
    methods, device = KERNEL_METHODS.select(ctx.settings.methods), ctx.settings.device
    if not methods:
        return
    ctx.describe("kernel: copy bandwidth")
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
        **bandwidth.timing.record_fields(),
        min_bytes=bandwidth.bytes_moved,
        gbps=bytes_per_s / 1e9,
        roofline_pct=100.0,
    )
    cases = grid_cases(ctx)
    for index, case in enumerate(cases):
        inputs = kernel_inputs(case, device, ctx.settings.seed)
        resident = [t for t in inputs.values() if t is not None]
        steers: dict[str, Any] = {}
        for method in methods:
            try:
                steers[method.name] = method.setup(device)
            except Exception as error:  # MethodUnavailable, or a failure: the rows say why
                steers[method.name] = error
        dtype = str(case.dtype).removeprefix("torch.")
        described = (
            f"N={case.tokens} d={case.hidden_size} r={case.rank} {case.activation} "
            f"{dtype}{' +residual' if case.residual else ''}"
        )
        for pass_ in PASSES:
            min_bytes = case.min_bytes(pass_)
            roofline_ms = min_bytes / bytes_per_s * 1e3
            row = functools.partial(
                ctx.record,
                "kernel",
                model=KERNEL_MODEL,
                batch=1,
                seq_len=case.tokens,
                rank=case.rank,
                activation=case.activation,
                dtype=dtype,
                pass_=pass_,
                tokens=case.tokens,
                hidden_size=case.hidden_size,
                residual=case.residual,
                min_bytes=min_bytes,
            )
            yield row(
                "roofline",
                "memory roofline",
                ms=roofline_ms,
                ms_min=roofline_ms,
                ms_max=roofline_ms,
                tokens_per_s=case.tokens / (roofline_ms * 1e-3),
                gbps=bytes_per_s / 1e9,
                roofline_pct=100.0,
            )
            calls = {
                name: Call(pass_function(steer, case, inputs, pass_))
                for name, steer in steers.items()
                if not isinstance(steer, Exception)
            }
            ctx.describe(f"kernel {index + 1}/{len(cases)}: {pass_} {described}")
            groups = [calls] if ctx.settings.interleave else [{n: c} for n, c in calls.items()]
            timings = {
                name: timing
                for group in groups
                for name, timing in measure_interleaved(
                    group,
                    device,
                    ctx.settings.timing["kernel"],
                    flush_l2=True,
                    on_round=ctx.timing_left,
                ).items()
            }
            for method in methods:
                try:
                    unwrap(steers[method.name])
                    timing = unwrap(timings[method.name])
                    peak = measure_peak_memory(calls[method.name].fn, device, resident)
                except Exception as error:  # a failing implementation gets a row that says why
                    yield row(method.name, method.label, **not_run(error))
                    continue
                seconds = timing.median_ms * 1e-3
                yield row(
                    method.name,
                    method.label,
                    **timing.record_fields(),
                    tokens_per_s=case.tokens / seconds,
                    peak_mem_bytes=peak,
                    memory_measure=MEASURES[device.type],
                    gbps=min_bytes / seconds / 1e9,
                    roofline_pct=100.0 * roofline_ms / timing.median_ms,
                    backend=BACKENDS.get(method.name),
                )
        del inputs, resident, steers, calls
        release_memory(device)
        ctx.part_done((index + 1) / len(cases))
