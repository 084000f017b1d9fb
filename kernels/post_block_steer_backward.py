"""The backward of post_block_steer: a rows kernel, a column-stationary kernel and a fixed-order
reduction (three launches).

The maths, the saved tensors and the traffic are specified in ``post_block_steer``; with g =
dL/dout and z, out saved by the forward:

    1. rows kernel, a program per row block: s_r = g U over column chunks, gz = s phi'(z) * s_r,
       stored fp32 [N, r].
    2. columns kernel, a program per (column tile, token split): dh = g + gz D written out of
       place, h rebuilt as out - s (a U^T + b_u), and the tile's dD, dU, db_u (db_d on column
       tile 0) accumulated in registers, then written as one fp32 partial per token split.
    3. the reduction sums the partials over splits in split order and casts them to the weight
       dtype (deterministic, no atomics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .activations import activation_derivative, apply_activation
from .launch import (
    KernelLaunch,
    LaunchPlan,
    down_strides,
    num_sms,
    padded_rank,
    row_strides,
    steer_kwargs,
    token_splits,
    up_strides,
)
from .tiles import (
    dot,
    grad_up_projection,
    load_weight_tile,
    row_offsets,
    sum_partials,
)


@triton.jit
def _post_block_steer_backward_rows_kernel(
    grad_out_ptr,
    z_ptr,
    up_weight_ptr,
    grad_z_ptr,
    n_rows,
    hidden_size,
    rank,
    rows_per_outer,
    stride_grad_outer,
    stride_grad_inner,
    stride_grad_col,
    stride_up_col,
    stride_up_rank,
    scale,
    ACTIVATION: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """gz = s phi'(z) * (g U) for one block of rows, stored fp32 [N, r]."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    grad_rows = row_offsets(rows, rows_per_outer, stride_grad_outer, stride_grad_inner)
    ranks = tl.arange(0, R_PAD)
    rank_mask = ranks < rank

    projected = grad_up_projection(
        grad_out_ptr,
        grad_rows,
        row_mask,
        up_weight_ptr,
        ranks,
        rank_mask,
        hidden_size,
        stride_grad_col,
        stride_up_col,
        stride_up_rank,
        OPERAND_DTYPE,
        INPUT_PRECISION,
        BLOCK_M,
        BLOCK_D,
        R_PAD,
    )

    small_mask = row_mask[:, None] & rank_mask[None, :]
    small_offsets = rows[:, None] * rank + ranks[None, :]
    z = tl.load(z_ptr + small_offsets, mask=small_mask, other=0.0)
    grad_z = scale * activation_derivative(z, ACTIVATION) * projected
    tl.store(grad_z_ptr + small_offsets, grad_z, mask=small_mask)


@triton.jit
def _post_block_steer_backward_cols_kernel(
    grad_out_ptr,
    out_ptr,
    z_ptr,
    down_weight_ptr,
    up_weight_ptr,
    up_bias_ptr,
    grad_z_ptr,
    grad_hidden_ptr,
    partial_ptr,
    n_rows,
    hidden_size,
    rank,
    rows_per_outer,
    rows_per_split,
    partial_stride,
    stride_grad_outer,
    stride_grad_inner,
    stride_grad_col,
    stride_down_rank,
    stride_down_col,
    stride_up_col,
    stride_up_rank,
    scale,
    ACTIVATION: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """dh for a column tile over a token range, and that tile's weight-gradient partials.

    Partial row ``split`` of ``partial_ptr`` (fp32, ``partial_stride`` floats) is laid out as
    [dD (r x d) | dU (d x r) | db_u (d) | db_d (r)].
    """
    pid_col = tl.program_id(0)
    pid_split = tl.program_id(1)
    cols = pid_col * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < hidden_size
    ranks = tl.arange(0, R_PAD)
    rank_mask = ranks < rank

    down = load_weight_tile(
        down_weight_ptr, ranks, cols, stride_down_rank, stride_down_col, rank_mask, col_mask
    )
    up_t = load_weight_tile(
        up_weight_ptr, ranks, cols, stride_up_rank, stride_up_col, rank_mask, col_mask
    )
    if HAS_UP_BIAS:
        up_bias = tl.load(up_bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    else:
        up_bias = tl.zeros((BLOCK_D,), tl.float32)

    grad_down = tl.zeros((R_PAD, BLOCK_D), tl.float32)
    grad_up = tl.zeros((BLOCK_D, R_PAD), tl.float32)
    grad_up_bias = tl.zeros((BLOCK_D,), tl.float32)
    grad_down_bias = tl.zeros((R_PAD,), tl.float32)

    row_start = pid_split.to(tl.int64) * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
    for block_start in range(row_start, row_end, BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        small_mask = row_mask[:, None] & rank_mask[None, :]
        small_offsets = rows[:, None] * rank + ranks[None, :]
        dense_offsets = rows[:, None] * hidden_size + cols[None, :]

        grad_rows = row_offsets(rows, rows_per_outer, stride_grad_outer, stride_grad_inner)
        g = tl.load(
            grad_out_ptr + grad_rows[:, None] + cols[None, :] * stride_grad_col,
            mask=mask,
            other=0.0,
        )
        grad_z = tl.load(grad_z_ptr + small_offsets, mask=small_mask, other=0.0)
        a = apply_activation(tl.load(z_ptr + small_offsets, mask=small_mask, other=0.0), ACTIVATION)

        grad_h = dot(grad_z, down, g.to(tl.float32), OPERAND_DTYPE, INPUT_PRECISION)
        tl.store(
            grad_hidden_ptr + dense_offsets,
            grad_h.to(grad_hidden_ptr.dtype.element_ty),
            mask=mask,
        )

        # Rebuild h = out - s (a U^T + b_u) instead of having kept it from the forward.
        out = tl.load(out_ptr + dense_offsets, mask=mask, other=0.0)
        delta = dot(
            a, up_t, tl.zeros((BLOCK_M, BLOCK_D), tl.float32), OPERAND_DTYPE, INPUT_PRECISION
        )
        h = out.to(tl.float32) - scale * (delta + up_bias[None, :])

        grad_down = dot(tl.trans(grad_z), h, grad_down, OPERAND_DTYPE, INPUT_PRECISION)
        grad_up = dot(tl.trans(g), a, grad_up, OPERAND_DTYPE, INPUT_PRECISION)
        grad_up_bias += tl.sum(g.to(tl.float32), axis=0)
        grad_down_bias += tl.sum(grad_z, axis=0)

    partial = partial_ptr + pid_split.to(tl.int64) * partial_stride
    n_weight = rank * hidden_size
    tl.store(
        partial + ranks[:, None] * hidden_size + cols[None, :],
        grad_down,
        mask=rank_mask[:, None] & col_mask[None, :],
    )
    tl.store(
        partial + n_weight + cols[:, None] * rank + ranks[None, :],
        scale * grad_up,
        mask=col_mask[:, None] & rank_mask[None, :],
    )
    tl.store(partial + 2 * n_weight + cols, scale * grad_up_bias, mask=col_mask)
    # Every column tile sums the same gz; tile 0 writes it. (The program-id test is broadcast
    # to a block: a scalar-and-block mask is not a boolean block under every interpreter.)
    first_tile = (ranks * 0 + pid_col) == 0
    tl.store(
        partial + 2 * n_weight + hidden_size + ranks,
        grad_down_bias,
        mask=rank_mask & first_tile,
    )


@triton.jit
def _reduce_weight_grads_kernel(
    partial_ptr,
    grad_down_weight_ptr,
    grad_up_weight_ptr,
    grad_down_bias_ptr,
    grad_up_bias_ptr,
    n_splits,
    n_weight,
    hidden_size,
    rank,
    BLOCK: tl.constexpr,
):
    """Sum the per-split partials in split order (deterministic) and cast to the weight dtype."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    sum_partials(
        partial_ptr,
        0,
        n_splits,
        offsets,
        grad_down_weight_ptr,
        grad_up_weight_ptr,
        grad_down_bias_ptr,
        grad_up_bias_ptr,
        n_weight,
        hidden_size,
        rank,
        BLOCK,
    )


_REDUCE_BLOCK = 1024
# Programs per SM the columns kernel aims for, and the fewest tokens one program covers, so
# that its weight tiles and partials stay small against the tokens it streams.
PROGRAMS_PER_SM = 2
MIN_TOKENS_PER_SPLIT = 256


@dataclass(frozen=True)
class BackwardConfig:
    """Block shapes of the backward kernels; ``splits`` None picks the token-split count."""

    rows_block_m: int
    rows_block_d: int
    cols_block_m: int
    cols_block_d: int
    splits: int | None = None
    num_warps: int = 8
    num_stages: int = 2


# Launch heuristics, keyed on (d, padded rank, dtype), never on the token count. They were
# chosen by compiling candidate shapes for sm_90 (bench/dev/compile_check.py reports registers
# and spills) and keeping the largest tiles that compile without register spills:
#   rows kernel       32 x 256, 8 warps (64-column chunks for r_pad >= 128).
#   columns kernel    16 x 64 at r_pad = 16 (100 registers bf16, 128 fp32), 16 x 32 up to
#                     r_pad = 64 (163 / 245), 16 x 16 beyond (spills 72 B bf16, 408 B fp32 at
#                     r = 256: the [rows, r] tiles of gz, z and a dominate there).
# Throughput on a GPU is still to be tuned against these (the weight-tile reloads depend on the
# row-block height).
def default_backward_config(
    hidden_size: int, rank: int, dtype: torch.dtype = torch.bfloat16
) -> BackwardConfig:
    """Backward block shapes for d = ``hidden_size``, ``rank`` and the storage ``dtype``."""
    r_pad = padded_rank(rank)
    d_pad = max(16, triton.next_power_of_2(hidden_size))
    cols_block_d = 64 if r_pad <= 16 else 32 if r_pad <= 64 else 16
    return BackwardConfig(
        rows_block_m=32,
        rows_block_d=min(d_pad, 256 if r_pad <= 64 else 64),
        cols_block_m=16,
        cols_block_d=min(d_pad, cols_block_d),
    )


class SteerBackward(NamedTuple):
    grad_hidden: torch.Tensor  # [..., d]: also the gradient of the residual
    grad_down_weight: torch.Tensor  # [r, d]
    grad_up_weight: torch.Tensor  # [d, r]
    grad_down_bias: torch.Tensor  # [r]
    grad_up_bias: torch.Tensor  # [d]


def plan_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    z: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    activation: int,
    scale: float,
    config: BackwardConfig | None = None,
) -> LaunchPlan:
    """Allocate the backward's outputs and buffers and describe its three launches."""
    rank, hidden_size = down_weight.shape
    n_rows = out.numel() // hidden_size
    device = out.device
    weight_dtype = down_weight.dtype
    result = SteerBackward(
        grad_hidden=torch.empty(out.shape, dtype=out.dtype, device=device),
        grad_down_weight=torch.empty((rank, hidden_size), dtype=weight_dtype, device=device),
        grad_up_weight=torch.empty((hidden_size, rank), dtype=weight_dtype, device=device),
        grad_down_bias=torch.empty((rank,), dtype=weight_dtype, device=device),
        grad_up_bias=torch.empty((hidden_size,), dtype=weight_dtype, device=device),
    )
    if n_rows == 0:
        for weight_grad in result[1:]:
            weight_grad.zero_()
        return LaunchPlan([], result)

    config = config or default_backward_config(hidden_size, rank, out.dtype)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    grad_z = torch.empty((n_rows, rank), dtype=torch.float32, device=device)
    # The parameters the rows and columns kernels share, under the same names.
    shared = dict(
        grad_out_ptr=grad_out,
        z_ptr=z,
        up_weight_ptr=up_weight,
        grad_z_ptr=grad_z,
        **steer_kwargs(grad_out, out.dtype, rank, activation, scale),
        **row_strides("grad", grad_out),
        **up_strides(up_weight),
    )

    rows_launch = KernelLaunch(
        _post_block_steer_backward_rows_kernel,
        (triton.cdiv(n_rows, config.rows_block_m),),
        dict(shared, BLOCK_M=config.rows_block_m, BLOCK_D=config.rows_block_d),
        options,
    )

    n_col_tiles = triton.cdiv(hidden_size, config.cols_block_d)
    splits = config.splits or token_splits(
        n_rows,
        config.cols_block_m,
        n_col_tiles,
        num_sms(device),
        programs_per_sm=PROGRAMS_PER_SM,
        min_tokens_per_split=MIN_TOKENS_PER_SPLIT,
    )
    n_row_blocks = triton.cdiv(n_rows, config.cols_block_m)
    rows_per_split = triton.cdiv(n_row_blocks, splits) * config.cols_block_m
    splits = triton.cdiv(n_rows, rows_per_split)  # no empty splits
    partial_stride = 2 * rank * hidden_size + hidden_size + rank
    partials = torch.empty((splits, partial_stride), dtype=torch.float32, device=device)
    cols_launch = KernelLaunch(
        _post_block_steer_backward_cols_kernel,
        (n_col_tiles, splits),
        dict(
            shared,
            out_ptr=out,
            down_weight_ptr=down_weight,
            # HAS_UP_BIAS off: never read.
            up_bias_ptr=up_bias if up_bias is not None else up_weight,
            grad_hidden_ptr=result.grad_hidden,
            partial_ptr=partials,
            rows_per_split=rows_per_split,
            partial_stride=partial_stride,
            **down_strides(down_weight),
            HAS_UP_BIAS=up_bias is not None,
            BLOCK_M=config.cols_block_m,
            BLOCK_D=config.cols_block_d,
        ),
        options,
    )

    reduce_launch = KernelLaunch(
        _reduce_weight_grads_kernel,
        (triton.cdiv(partial_stride, _REDUCE_BLOCK),),
        dict(
            partial_ptr=partials,
            grad_down_weight_ptr=result.grad_down_weight,
            grad_up_weight_ptr=result.grad_up_weight,
            grad_down_bias_ptr=result.grad_down_bias,
            grad_up_bias_ptr=result.grad_up_bias,
            n_splits=splits,
            n_weight=rank * hidden_size,
            hidden_size=hidden_size,
            rank=rank,
            BLOCK=_REDUCE_BLOCK,
        ),
        {},  # Triton's default warps and stages
    )
    return LaunchPlan([rows_launch, cols_launch, reduce_launch], result)


def post_block_steer_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    z: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    activation: int,
    scale: float,
    config: BackwardConfig | None = None,
) -> SteerBackward:
    """Run the backward: gz (rows kernel), dh and weight partials (columns kernel), reduction.

    ``out`` and ``z`` are what the forward returned; ``grad_out`` has the shape of ``out`` and
    any strides. Bias gradients are always produced (they cost one extra d + r floats).
    """
    plan = plan_backward(
        grad_out, out, z, down_weight, up_weight, up_bias, activation, scale, config
    )
    for launch in plan.launches:
        launch()
    return plan.result
