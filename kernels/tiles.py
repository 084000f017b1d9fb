"""The tile-level Triton helpers every steer_fast kernel is built from.

Each helper works on one block of rows of a 2-D [N, d] or 3-D [B, T, d] tensor viewed as [N, d]
(row r lives at (r // T) * stride_0 + (r % T) * stride_1, int64 offsets), in BLOCK_D column
chunks, with fp32 arithmetic:

    load_hidden_tile      h = residual + hidden for one tile, rounded to the storage dtype
    load_weight_tile      a masked tile of a strided 2-D weight
    dot                   tl.dot with the operand dtype and input precision of ``launch.dot_types``
    down_projection_pass  z = h D^T for a block of rows (pass 1 of the two-pass forward)
    steer_output_tile     out = h + s (a U^T + b_u) for one tile, stored contiguous
    steer_output_pass     the same over every column chunk (pass 2 of the two-pass forward)
    grad_up_projection    s_r = g U for a block of rows (the backward's rows kernels)
    sum_partials          fixed-order sum of fp32 weight-gradient partial rows

The maths they implement is specified in ``post_block_steer``; ``multi_adapter_steer`` runs the
same helpers on one slot's weights, and ``steering_vector`` uses the tile loads.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_offsets(rows, rows_per_outer, stride_outer, stride_inner):
    """Element offset of each row of a 2-D or 3-D tensor viewed as [N, d]."""
    return (rows // rows_per_outer) * stride_outer + (rows % rows_per_outer) * stride_inner


@triton.jit
def dot(lhs, rhs, acc, OPERAND_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    return tl.dot(
        lhs.to(OPERAND_DTYPE), rhs.to(OPERAND_DTYPE), acc, input_precision=INPUT_PRECISION
    )


@triton.jit
def load_hidden_tile(
    hidden_ptr,
    residual_ptr,
    hidden_rows,
    residual_rows,
    cols,
    mask,
    stride_hidden_col,
    stride_residual_col,
    HAS_RESIDUAL: tl.constexpr,
    EVICTION: tl.constexpr,
):
    """h = residual + hidden for one [BLOCK_M, BLOCK_D] tile, in the storage dtype.

    The sum is rounded to the storage dtype, as the unfused block would store it.
    """
    h = tl.load(
        hidden_ptr + hidden_rows[:, None] + cols[None, :] * stride_hidden_col,
        mask=mask,
        other=0.0,
        eviction_policy=EVICTION,
    )
    if HAS_RESIDUAL:
        res = tl.load(
            residual_ptr + residual_rows[:, None] + cols[None, :] * stride_residual_col,
            mask=mask,
            other=0.0,
            eviction_policy=EVICTION,
        )
        h = (h.to(tl.float32) + res.to(tl.float32)).to(h.dtype)
    return h


@triton.jit
def load_weight_tile(ptr, index_0, index_1, stride_0, stride_1, mask_0, mask_1):
    """A [len(index_0), len(index_1)] tile of a strided 2-D weight, zero outside the masks."""
    return tl.load(
        ptr + index_0[:, None] * stride_0 + index_1[None, :] * stride_1,
        mask=mask_0[:, None] & mask_1[None, :],
        other=0.0,
    )


@triton.jit
def steer_output_tile(
    h,
    a,
    up_weight_ptr,
    up_bias_ptr,
    out_ptr,
    rows,
    cols,
    mask,
    col_mask,
    ranks,
    rank_mask,
    hidden_size,
    stride_up_col,
    stride_up_rank,
    stride_up_bias_col,
    scale,
    HAS_UP_BIAS: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """out = h + s (a U^T + b_u) for one tile, stored to the contiguous output. ``scale`` is a
    scalar, or one strength per row as a [BLOCK_M, 1] block (multi_adapter_steer)."""
    up_t = load_weight_tile(
        up_weight_ptr, ranks, cols, stride_up_rank, stride_up_col, rank_mask, col_mask
    )
    delta = dot(a, up_t, tl.zeros(h.shape, tl.float32), OPERAND_DTYPE, INPUT_PRECISION)
    if HAS_UP_BIAS:
        delta += tl.load(up_bias_ptr + cols * stride_up_bias_col, mask=col_mask, other=0.0).to(
            tl.float32
        )[None, :]
    out = h.to(tl.float32) + scale * delta
    tl.store(
        out_ptr + rows[:, None] * hidden_size + cols[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def down_projection_pass(
    hidden_ptr,
    residual_ptr,
    hidden_rows,
    residual_rows,
    row_mask,
    down_weight_ptr,
    ranks,
    rank_mask,
    hidden_size,
    stride_hidden_col,
    stride_residual_col,
    stride_down_col,
    stride_down_rank,
    HAS_RESIDUAL: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """Pass 1 of the two-pass forward: h D^T for one block of rows ([BLOCK_M, R_PAD] fp32),
    streaming h in BLOCK_D column chunks marked evict_last (pass 2 reads them again)."""
    z = tl.zeros((BLOCK_M, R_PAD), tl.float32)
    for start in range(0, hidden_size, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_mask = cols < hidden_size
        h = load_hidden_tile(
            hidden_ptr,
            residual_ptr,
            hidden_rows,
            residual_rows,
            cols,
            row_mask[:, None] & col_mask[None, :],
            stride_hidden_col,
            stride_residual_col,
            HAS_RESIDUAL,
            "evict_last",
        )
        down_t = load_weight_tile(
            down_weight_ptr, cols, ranks, stride_down_col, stride_down_rank, col_mask, rank_mask
        )
        z = dot(h, down_t, z, OPERAND_DTYPE, INPUT_PRECISION)
    return z


@triton.jit
def steer_output_pass(
    hidden_ptr,
    residual_ptr,
    hidden_rows,
    residual_rows,
    row_mask,
    a,
    up_weight_ptr,
    up_bias_ptr,
    out_ptr,
    rows,
    ranks,
    rank_mask,
    hidden_size,
    stride_hidden_col,
    stride_residual_col,
    stride_up_col,
    stride_up_rank,
    stride_up_bias_col,
    scale,
    HAS_RESIDUAL: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Pass 2 of the two-pass forward: out = h + s (a U^T + b_u) for one block of rows, h
    streamed again in BLOCK_D column chunks marked evict_first."""
    for start in range(0, hidden_size, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_mask = cols < hidden_size
        mask = row_mask[:, None] & col_mask[None, :]
        h = load_hidden_tile(
            hidden_ptr,
            residual_ptr,
            hidden_rows,
            residual_rows,
            cols,
            mask,
            stride_hidden_col,
            stride_residual_col,
            HAS_RESIDUAL,
            "evict_first",
        )
        steer_output_tile(
            h,
            a,
            up_weight_ptr,
            up_bias_ptr,
            out_ptr,
            rows,
            cols,
            mask,
            col_mask,
            ranks,
            rank_mask,
            hidden_size,
            stride_up_col,
            stride_up_rank,
            stride_up_bias_col,
            scale,
            HAS_UP_BIAS,
            OPERAND_DTYPE,
            INPUT_PRECISION,
        )


@triton.jit
def grad_up_projection(
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
    OPERAND_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """s_r = g U for one block of rows ([BLOCK_M, R_PAD] fp32), streaming g and U in BLOCK_D
    column chunks. ``grad_rows`` are the rows' element offsets into grad_out."""
    projected = tl.zeros((BLOCK_M, R_PAD), tl.float32)
    for start in range(0, hidden_size, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_mask = cols < hidden_size
        g = tl.load(
            grad_out_ptr + grad_rows[:, None] + cols[None, :] * stride_grad_col,
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        up = load_weight_tile(
            up_weight_ptr, cols, ranks, stride_up_col, stride_up_rank, col_mask, rank_mask
        )
        projected = dot(g, up, projected, OPERAND_DTYPE, INPUT_PRECISION)
    return projected


@triton.jit
def sum_partials(
    partial_ptr,
    first,
    last,
    offsets,
    grad_down_weight_ptr,
    grad_up_weight_ptr,
    grad_down_bias_ptr,
    grad_up_bias_ptr,
    n_weight,
    hidden_size,
    rank,
    BLOCK: tl.constexpr,
):
    """Rows [first, last) of an fp32 partial buffer laid out [dD (r x d) | dU (d x r) | db_u (d)
    | db_d (r)] per row, summed in row order (deterministic) at ``offsets`` and stored, cast to
    the weight dtype, into the four gradients."""
    partial_stride = 2 * n_weight + hidden_size + rank
    mask = offsets < partial_stride
    total = tl.zeros((BLOCK,), tl.float32)
    for row in range(first, last):
        total += tl.load(partial_ptr + row * partial_stride + offsets, mask=mask, other=0.0)

    up_start = n_weight
    up_bias_start = 2 * n_weight
    down_bias_start = 2 * n_weight + hidden_size
    tl.store(
        grad_down_weight_ptr + offsets,
        total.to(grad_down_weight_ptr.dtype.element_ty),
        mask=offsets < up_start,
    )
    tl.store(
        grad_up_weight_ptr + (offsets - up_start),
        total.to(grad_up_weight_ptr.dtype.element_ty),
        mask=(offsets >= up_start) & (offsets < up_bias_start),
    )
    tl.store(
        grad_up_bias_ptr + (offsets - up_bias_start),
        total.to(grad_up_bias_ptr.dtype.element_ty),
        mask=(offsets >= up_bias_start) & (offsets < down_bias_start),
    )
    tl.store(
        grad_down_bias_ptr + (offsets - down_bias_start),
        total.to(grad_down_bias_ptr.dtype.element_ty),
        mask=(offsets >= down_bias_start) & mask,
    )
