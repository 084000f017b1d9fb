"""Launch planning shared by steer_fast's kernels: launch records, block-shape helpers, strides.

Every launcher describes its kernels as ``KernelLaunch`` records (each kernel parameter passed
by keyword, under its name in the kernel's signature), collected in a ``LaunchPlan`` with the
tensors they fill, so that a plan can be inspected (tests, the traffic counter, the compile
check) before anything runs. Nothing here imports anything of steer_fast outside ``kernels``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .tiles import row_offsets

# The SM count assumed where there is no GPU (the interpreter): an H100's, so that traffic counted
# on the CPU uses the launch shapes an H100 would.
DEFAULT_NUM_SMS = 132


class KernelLaunch(NamedTuple):
    """One kernel launch, fully specified: ``kernel[grid](**kwargs, **options)``.

    ``kwargs`` gives every parameter of the kernel (tensors, ints, floats and constexprs) by its
    name in the kernel's signature; ``options`` holds the launch options num_warps and
    num_stages.
    """

    kernel: object
    grid: tuple[int, ...]
    kwargs: dict
    options: dict

    def __call__(self) -> None:
        self.kernel[self.grid](**self.kwargs, **self.options)


class LaunchPlan(NamedTuple):
    """The launches of one pass, in order, and the tensors they fill."""

    launches: list[KernelLaunch]
    result: tuple


def padded_rank(rank: int) -> int:
    """The rank padded for tl.dot: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(rank))


def interpreted() -> bool:
    """True when the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 was set
    when ``steer_fast.kernels`` was first imported): they then run on CPU tensors, in numpy."""
    return isinstance(row_offsets, InterpretedFunction)


def dot_types(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """tl.dot operand dtype and input precision for storage dtype ``dtype``."""
    if dtype == torch.float16:
        return tl.float16, "tf32"
    if dtype == torch.bfloat16 and not interpreted():
        return tl.bfloat16, "tf32"
    # fp32 (and bf16 under the interpreter, whose bf16 dot is wrong): exact fp32 products.
    return tl.float32, "ieee"


@functools.cache
def num_sms(device: torch.device) -> int:
    """SMs of ``device``; DEFAULT_NUM_SMS off a GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def token_splits(
    n_rows: int,
    block_m: int,
    n_col_tiles: int,
    num_sms: int,
    *,
    programs_per_sm: int,
    min_tokens_per_split: int,
) -> int:
    """Token splits of a column-stationary backward kernel over (column tiles x splits): about
    ``programs_per_sm`` programs per SM over all column tiles, each split covering at least
    ``min_tokens_per_split`` tokens and one row block."""
    wanted = triton.cdiv(programs_per_sm * num_sms, n_col_tiles)
    limit = min(triton.cdiv(n_rows, min_tokens_per_split), triton.cdiv(n_rows, block_m))
    return max(1, min(wanted, limit))


def row_strides(name: str, tensor: torch.Tensor) -> dict[str, int]:
    """The kernel arguments ``stride_{name}_outer``, ``_inner`` and ``_col`` that address a 2-D
    [N, d] or 3-D [B, T, d] tensor row by row, without a copy."""
    if tensor.dim() == 2:
        outer, (inner, col) = 0, tensor.stride()
    else:
        outer, inner, col = tensor.stride()
    return {f"stride_{name}_outer": outer, f"stride_{name}_inner": inner, f"stride_{name}_col": col}


def down_strides(down_weight: torch.Tensor) -> dict[str, int]:
    """Strides of D [r, d] under the kernels' parameter names."""
    return dict(stride_down_rank=down_weight.stride(0), stride_down_col=down_weight.stride(1))


def up_strides(up_weight: torch.Tensor) -> dict[str, int]:
    """Strides of U [d, r] under the kernels' parameter names."""
    return dict(stride_up_col=up_weight.stride(0), stride_up_rank=up_weight.stride(1))


def steer_kwargs(
    rows: torch.Tensor, dtype: torch.dtype, rank: int, activation: int, scale: float
) -> dict:
    """The parameters post_block_steer's forward, rows and columns kernels share, under their
    names; ``activation`` is phi's id (``kernels.activations``).

    ``rows`` is the 2-D [N, d] or 3-D [B, T, d] tensor the kernel streams row by row (its
    ``rows_per_outer`` is T, or N for 2-D, whose outer stride is 0); ``dtype`` is the storage
    dtype, which sets the dot's operand dtype and precision.
    """
    hidden_size = rows.shape[-1]
    operand_dtype, input_precision = dot_types(dtype)
    return dict(
        n_rows=rows.numel() // hidden_size,
        hidden_size=hidden_size,
        rank=rank,
        rows_per_outer=max(rows.shape[-2], 1),
        scale=float(scale),
        ACTIVATION=activation,
        OPERAND_DTYPE=operand_dtype,
        INPUT_PRECISION=input_precision,
        R_PAD=padded_rank(rank),
    )
