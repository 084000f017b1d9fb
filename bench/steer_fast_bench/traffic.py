"""Count the memory traffic of Triton kernels run under the interpreter.

The CPU stand-in for HBM traffic: while a ``TrafficCounter`` is active, every element a Triton
kernel loads or stores under TRITON_INTERPRET=1 is tallied (masked-off lanes excluded, atomics
counted as a load plus a store), per kernel. Nothing models caches: a tile read twice counts
twice, and small weight tiles that a GPU would serve from L2 count every time they are loaded,
so the figures are an upper bound on what DRAM would see.

    with TrafficCounter() as traffic:
        out = post_block_steer(hidden, ..., backend="triton")
    traffic.total_bytes, traffic.by_kernel

The minimum traffic of the op (``minimum_forward_bytes`` / ``minimum_backward_bytes``) is what
any implementation must move: forward reads h (hidden, plus residual when fused) and writes out;
backward reads grad_out and out and writes grad_hidden.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class KernelTraffic:
    """Bytes one kernel moved over all its launches."""

    launches: int = 0
    load_bytes: int = 0
    store_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.load_bytes + self.store_bytes


@dataclass
class TrafficCounter:
    """Context manager that tallies interpreter loads and stores by kernel name."""

    by_kernel: dict[str, KernelTraffic] = field(default_factory=lambda: defaultdict(KernelTraffic))

    def __post_init__(self) -> None:
        self._kernel: str | None = None
        self._saved: dict[str, object] = {}

    @property
    def total_bytes(self) -> int:
        return sum(k.total_bytes for k in self.by_kernel.values())

    def _record(self, kind: str, ptrs, mask) -> None:
        width = ptrs.get_element_ty().primitive_bitwidth // 8
        moved = int(np.count_nonzero(mask.data)) * width
        entry = self.by_kernel[self._kernel or "<unknown>"]
        if kind in ("load", "atomic"):
            entry.load_bytes += moved
        if kind in ("store", "atomic"):
            entry.store_bytes += moved

    def __enter__(self) -> TrafficCounter:
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        function = interpreter.InterpretedFunction
        load, store = builder.create_masked_load, builder.create_masked_store
        atomic_rmw, run = builder.create_atomic_rmw, function.run
        self._saved = {"load": load, "store": store, "atomic": atomic_rmw, "run": run}
        counter = self

        def counted_load(ptrs, mask, *args, **kwargs):
            counter._record("load", ptrs, mask)
            return load(ptrs, mask, *args, **kwargs)

        def counted_store(ptrs, value, mask, *args, **kwargs):
            counter._record("store", ptrs, mask)
            return store(ptrs, value, mask, *args, **kwargs)

        def counted_atomic_rmw(op, ptr, val, mask, *args, **kwargs):
            counter._record("atomic", ptr, mask)
            return atomic_rmw(op, ptr, val, mask, *args, **kwargs)

        def named_run(self_fn, *args, **kwargs):
            outer, counter._kernel = counter._kernel, self_fn.fn.__name__
            counter.by_kernel[counter._kernel].launches += 1
            try:
                return run(self_fn, *args, **kwargs)
            finally:
                counter._kernel = outer

        builder.create_masked_load = counted_load
        builder.create_masked_store = counted_store
        builder.create_atomic_rmw = counted_atomic_rmw
        function.run = named_run
        return self

    def __exit__(self, *exc) -> None:
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        builder.create_masked_load = self._saved["load"]
        builder.create_masked_store = self._saved["store"]
        builder.create_atomic_rmw = self._saved["atomic"]
        interpreter.InterpretedFunction.run = self._saved["run"]


def minimum_forward_bytes(
    n_tokens: int, hidden_size: int, element_size: int, fused_residual: bool
) -> int:
    """Read hidden (and residual), write out."""
    return (3 if fused_residual else 2) * n_tokens * hidden_size * element_size


def minimum_backward_bytes(n_tokens: int, hidden_size: int, element_size: int) -> int:
    """Read grad_out, read out, write grad_hidden."""
    return 3 * n_tokens * hidden_size * element_size


@dataclass
class SteerTraffic:
    """Counted traffic of one forward and one backward of post_block_steer."""

    n_tokens: int
    hidden_size: int
    rank: int
    dtype: str
    fused_residual: bool
    forward: dict[str, KernelTraffic]
    backward: dict[str, KernelTraffic]
    minimum_forward: int
    minimum_backward: int

    @property
    def forward_bytes(self) -> int:
        return sum(k.total_bytes for k in self.forward.values())

    @property
    def backward_bytes(self) -> int:
        return sum(k.total_bytes for k in self.backward.values())

    @property
    def forward_ratio(self) -> float:
        return self.forward_bytes / self.minimum_forward

    @property
    def backward_ratio(self) -> float:
        return self.backward_bytes / self.minimum_backward


def measure_post_block_steer(
    n_tokens: int = 512,
    hidden_size: int = 256,
    rank: int = 8,
    dtype=None,
    activation: str = "silu",
    fused_residual: bool = False,
    forward_config=None,
    backward_config=None,
) -> SteerTraffic:
    """Run the Triton forward and backward once on CPU tensors and count their traffic.

    Needs TRITON_INTERPRET=1 set before steer_fast's kernels were first imported. The configs
    default to the launch heuristics (those a GPU would use for this shape).
    """
    import torch

    from steer_fast.kernels import launch
    from steer_fast.kernels import post_block_steer as kernels
    from steer_fast.ops import activation_id

    if not launch.interpreted():
        raise RuntimeError(
            "traffic counting needs TRITON_INTERPRET=1 set before steer_fast.kernels is imported"
        )
    dtype = dtype or torch.float32
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    hidden = randn(n_tokens, hidden_size)
    residual = randn(n_tokens, hidden_size) if fused_residual else None
    down_weight = randn(rank, hidden_size, scale=hidden_size**-0.5)
    up_weight = randn(hidden_size, rank, scale=rank**-0.5)
    down_bias, up_bias = randn(rank), randn(hidden_size)
    grad_out = randn(n_tokens, hidden_size)

    with TrafficCounter() as forward_traffic:
        result = kernels.post_block_steer_forward(
            hidden,
            down_weight,
            up_weight,
            down_bias,
            up_bias,
            residual,
            activation=activation_id(activation),
            scale=0.5,
            config=forward_config,
        )
    with TrafficCounter() as backward_traffic:
        kernels.post_block_steer_backward(
            grad_out,
            result.out,
            result.z,
            down_weight,
            up_weight,
            up_bias,
            activation=activation_id(activation),
            scale=0.5,
            config=backward_config,
        )
    element_size = hidden.element_size()
    return SteerTraffic(
        n_tokens=n_tokens,
        hidden_size=hidden_size,
        rank=rank,
        dtype=str(dtype).removeprefix("torch."),
        fused_residual=fused_residual,
        forward=dict(forward_traffic.by_kernel),
        backward=dict(backward_traffic.by_kernel),
        minimum_forward=minimum_forward_bytes(n_tokens, hidden_size, element_size, fused_residual),
        minimum_backward=minimum_backward_bytes(n_tokens, hidden_size, element_size),
    )
