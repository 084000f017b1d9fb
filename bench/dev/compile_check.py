"""Compile the kernels for a GPU target ahead of time, without a GPU.

The interpreter checks what the kernels compute; it does not run Triton's compiler. This module
takes the exact launches the launchers would make (``plan_forward`` / ``plan_backward`` on small
CPU tensors with the launch heuristics of a large shape) and compiles each kernel through
Triton's full pipeline (TTIR, TTGIR, LLVM IR, PTX, ptxas to cubin) for a CUDA target, so a
kernel that would not build on an H100 fails here, on the CPU. It covers post_block_steer's
kernels (CASES), steering_vector's (VECTOR_CASES, rank 0, no activation) and
multi_adapter_steer's (MULTI_CASES: both forward paths, the backward's three kernels, one phi
for every adapter or several).

    python bench/dev/compile_check.py                 # sm_90, every case in ALL_CASES, as a table
    python bench/dev/compile_check.py --json          # one JSON record per compiled kernel
    python bench/dev/compile_check.py --arch 100      # another compute capability

Must run with TRITON_INTERPRET unset (the kernels must be JIT functions, not interpreted). It
needs no GPU: Triton's NVIDIA backend ships the ptxas and cuobjdump it uses.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from steer_fast.kernels import launch as kernel_launch
from steer_fast.kernels import multi_adapter_steer as multi_kernels
from steer_fast.kernels import post_block_steer as kernels
from steer_fast.kernels import steering_vector as vector_kernels
from steer_fast.ops import activation_id

_POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.int64: "*i64",
    torch.int32: "*i32",
}


@dataclass(frozen=True)
class CompileCase:
    hidden_size: int
    rank: int
    dtype: torch.dtype
    activation: str
    residual: bool = True
    bias: bool = True


# Every activation, dtype, single- and two-pass forward, and ranks from 1 to 256 at least once.
CASES = [
    CompileCase(4096, 8, torch.bfloat16, "identity"),
    CompileCase(4096, 8, torch.float32, "silu", residual=False, bias=False),
    CompileCase(4096, 16, torch.float16, "gelu"),
    CompileCase(2048, 64, torch.bfloat16, "gelu_tanh"),
    CompileCase(8192, 256, torch.bfloat16, "tanh"),
    CompileCase(256, 1, torch.bfloat16, "relu"),
    CompileCase(200, 8, torch.float16, "silu", residual=False),
]


@dataclass(frozen=True)
class VectorCompileCase:
    """A steering_vector shape: the rank-0 op, with no activation."""

    hidden_size: int
    dtype: torch.dtype
    residual: bool = True

    rank = 0
    activation = None


# Every dtype, with and without the residual, full-width and partial column tiles; the backward
# in both forms (one token split writing db directly, and partials plus the reduction).
VECTOR_CASES = [
    VectorCompileCase(4096, torch.bfloat16),
    VectorCompileCase(8192, torch.float32, residual=False),
    VectorCompileCase(2048, torch.float16),
    VectorCompileCase(200, torch.bfloat16, residual=False),
    VectorCompileCase(24, torch.float32),
]


@dataclass(frozen=True)
class MultiCompileCase:
    """A multi_adapter_steer shape: ``adapters`` steering slots (slot 0 is the unsteered one),
    each with its own activation (one name: all alike, compiled in; several: read per slot)."""

    hidden_size: int
    rank: int
    dtype: torch.dtype
    activations: tuple[str, ...]
    residual: bool = True
    bias: bool = True

    @property
    def activation(self) -> str:
        return "+".join(sorted(set(self.activations)))


# Both forward paths and the backward for each: every dtype, one phi for all adapters and mixed
# phis, ranks 1 to 64, a partial last column tile.
MULTI_CASES = [
    MultiCompileCase(4096, 16, torch.bfloat16, ("silu", "silu", "silu")),
    MultiCompileCase(4096, 8, torch.float32, ("identity", "gelu"), residual=False, bias=False),
    MultiCompileCase(2048, 64, torch.float16, ("silu", "gelu_tanh", "relu", "tanh")),
    MultiCompileCase(200, 1, torch.bfloat16, ("identity",), residual=False),
]


def _signature(launch: kernel_launch.KernelLaunch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's JIT would specialise this launch.

    Every kernel parameter is looked up by name in ``launch.kwargs``, which must name each one
    and nothing else. Like the JIT: an int argument equal to 1 (a unit stride, typically) is
    compiled in as a constant, and ints and pointers divisible by 16 carry a divisibility hint
    (fresh allocations are 16-byte aligned on a GPU, so pointers get it unconditionally).
    """
    fn = launch.kernel
    names = [param.name for param in fn.params]
    missing = [name for name in names if name not in launch.kwargs]
    unknown = [name for name in launch.kwargs if name not in names]
    if missing or unknown:
        raise TypeError(f"{fn.__name__}: missing arguments {missing}, unknown arguments {unknown}")
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        name, value = param.name, launch.kwargs[param.name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif isinstance(value, int) and value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif isinstance(value, int):
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{name}: cannot type {type(value).__name__}")
    return signature, constexprs, attrs


def compile_launch(launch: kernel_launch.KernelLaunch, target: GPUTarget):
    signature, constexprs, attrs = _signature(launch)
    source = ASTSource(launch.kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target, options=launch.options)


class ResourceUsage(NamedTuple):
    registers: int  # per thread
    stack_bytes: int  # per thread; > 0 means register spills
    shared_bytes: int  # static shared memory (Triton's dynamic shared memory is separate)


def resource_usage(cubin: bytes) -> ResourceUsage:
    """Registers, stack and shared memory of a cubin, from the cuobjdump bundled with Triton."""
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        report = subprocess.run(
            [tool, "-res-usage", path], capture_output=True, text=True, check=True
        ).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", report)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output: {report!r}")
    return ResourceUsage(*(int(group) for group in match.groups()))


def case_launches(
    case: CompileCase | VectorCompileCase | MultiCompileCase, n_rows: int = 64
) -> list[kernel_launch.KernelLaunch]:
    """The forward and backward launches for ``case``, on small CPU tensors.

    Block shapes depend on d and r only, so a few rows give the launches of any token count;
    the token-split count (a runtime argument, not compiled in) is the one difference.
    """
    if isinstance(case, VectorCompileCase):
        return vector_case_launches(case, n_rows)
    if isinstance(case, MultiCompileCase):
        return multi_case_launches(case, n_rows)
    d, r, dtype = case.hidden_size, case.rank, case.dtype
    hidden = torch.zeros(n_rows, d, dtype=dtype)
    residual = torch.zeros(n_rows, d, dtype=dtype) if case.residual else None
    down, up = torch.zeros(r, d, dtype=dtype), torch.zeros(d, r, dtype=dtype)
    down_bias = torch.zeros(r, dtype=dtype) if case.bias else None
    up_bias = torch.zeros(d, dtype=dtype) if case.bias else None
    forward = kernels.plan_forward(
        hidden=hidden,
        down_weight=down,
        up_weight=up,
        down_bias=down_bias,
        up_bias=up_bias,
        residual=residual,
        activation=activation_id(case.activation),
        scale=0.5,
    )
    out, z = forward.result
    backward = kernels.plan_backward(
        grad_out=hidden,
        out=out,
        z=z,
        down_weight=down,
        up_weight=up,
        up_bias=up_bias,
        activation=activation_id(case.activation),
        scale=0.5,
    )
    return [*forward.launches, *backward.launches]


def vector_case_launches(
    case: VectorCompileCase, n_rows: int = 64
) -> list[kernel_launch.KernelLaunch]:
    """steering_vector's forward launch and both forms of its backward, on small CPU tensors.

    Whether the backward's first kernel writes db itself (one token split) or partials is compiled
    in (FINAL), so both are planned, with the default tiles: one split, and two splits over enough
    rows for two row blocks.
    """
    d, dtype = case.hidden_size, case.dtype
    hidden = torch.zeros(n_rows, d, dtype=dtype)
    residual = torch.zeros(n_rows, d, dtype=dtype) if case.residual else None
    forward = vector_kernels.plan_forward(
        hidden=hidden, bias=torch.zeros(d, dtype=dtype), residual=residual, scale=0.5
    )
    tile = vector_kernels.default_backward_config(d)
    launches = [*forward.launches]
    for splits in (1, 2):
        grad_out = torch.zeros(splits * tile.block_m, d, dtype=dtype)
        config = vector_kernels.BackwardConfig(tile.block_m, tile.block_d, splits=splits)
        launches += vector_kernels.plan_backward(
            grad_out=grad_out, scale=0.5, config=config
        ).launches
    return launches


def multi_case_launches(
    case: MultiCompileCase, n_rows: int = 64
) -> list[kernel_launch.KernelLaunch]:
    """multi_adapter_steer's gather and grouped forward launches and its backward's, on small CPU
    tensors, with rows on every slot (slot 0 included)."""
    d, r, dtype = case.hidden_size, case.rank, case.dtype
    n_slots = len(case.activations) + 1
    hidden = torch.zeros(n_rows, d, dtype=dtype)
    residual = torch.zeros(n_rows, d, dtype=dtype) if case.residual else None
    down = torch.zeros(n_slots, r, d, dtype=dtype)
    up = torch.zeros(n_slots, d, r, dtype=dtype)
    down_biases = torch.zeros(n_slots, r, dtype=dtype) if case.bias else None
    up_biases = torch.zeros(n_slots, d, dtype=dtype) if case.bias else None
    index = torch.arange(n_rows) % n_slots
    scales = torch.ones(n_rows)
    activations = [activation_id(name) for name in ("identity", *case.activations)]
    launches = []
    for path in ("gather", "grouped"):
        forward = multi_kernels.plan_forward(
            hidden, down, up, down_biases, up_biases, residual, index, scales, activations, path
        )
        launches += forward.launches
    out, z = forward.result
    launches += multi_kernels.plan_backward(
        hidden, out, z, down, up, up_biases, index, scales, activations
    ).launches
    return launches


ALL_CASES = [*CASES, *VECTOR_CASES, *MULTI_CASES]


def compile_cases(
    arch: int = 90,
    cases: list[CompileCase | VectorCompileCase | MultiCompileCase] = ALL_CASES,
):
    """Compile every distinct launch of ``cases``; yield (case, launch, compiled, usage)."""
    if kernel_launch.interpreted():
        raise RuntimeError("unset TRITON_INTERPRET: the kernels are interpreted functions here")
    target = GPUTarget("cuda", arch, 32)
    seen = set()
    for case in cases:
        for launch in case_launches(case):
            signature, constexprs, _ = _signature(launch)
            key = (
                launch.kernel.__name__,
                tuple(sorted(signature.items())),
                tuple(sorted((k, str(v)) for k, v in constexprs.items())),
                launch.options.get("num_warps"),
            )
            if key in seen:
                continue
            seen.add(key)
            compiled = compile_launch(launch, target)
            yield case, launch, compiled, resource_usage(compiled.asm["cubin"])


def _op_name(case: CompileCase | VectorCompileCase | MultiCompileCase) -> str:
    if isinstance(case, VectorCompileCase):
        return "steering_vector"
    return "multi_adapter_steer" if isinstance(case, MultiCompileCase) else "post_block_steer"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile steer_fast's kernels for a CUDA target")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--json", action="store_true", help="one JSON record per line instead")
    args = parser.parse_args(argv)
    if args.json:
        for case, launch, _, usage in compile_cases(args.arch):
            record = {
                "kernel": launch.kernel.__name__,
                "op": _op_name(case),
                "hidden_size": case.hidden_size,
                "rank": case.rank,
                "dtype": str(case.dtype).removeprefix("torch."),
                "activation": case.activation,
                **usage._asdict(),
            }
            print(json.dumps(record), flush=True)
        return 0
    print("| kernel | d | r | dtype | phi | registers | spill stack B | shared B | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    start = time.perf_counter()
    for case, launch, compiled, usage in compile_cases(args.arch):
        print(
            f"| {launch.kernel.__name__} | {case.hidden_size} | {case.rank} "
            f"| {str(case.dtype).removeprefix('torch.')} | {case.activation or '-'} "
            f"| {usage.registers} | {usage.stack_bytes} | {compiled.metadata.shared} "
            f"| {time.perf_counter() - start:.1f} |",
            flush=True,
        )
        start = time.perf_counter()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
