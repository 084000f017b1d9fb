"""Fused post-block steering: Triton kernels and their launchers.

The op, for hidden states x and the block's own residual stream res (optional):

    h     = res + x                                  [N, d]   (the block's skip connection)
    z     = h D^T + b_d                              [N, r]
    a     = phi(z)                                   [N, r]
    out   = h + s (a U^T + b_u)                      [N, d]

with D = down_weight [r, d], U = up_weight [d, r], b_d [r], b_u [d], scale s. With g = dL/dout:

    s_r   = g U                                      [N, r]
    gz    = s phi'(z) * s_r                          [N, r]   (= dL/dz)
    dh    = g + gz D                                 [N, d]   (the gradient of x and of res)
    dU    = s g^T a,    db_u = s sum_rows(g)
    dD    = gz^T h,     db_d = sum_rows(gz)

Saved for the backward: ``out`` and z (fp32, N x r). h is never kept: the backward rebuilds it
tile by tile as h = out - s (a U^T + b_u), which costs 2 N d r FLOPs and no memory. ``out`` is
the tensor the next layer consumes, so autograd keeps it alive anyway: the op adds only N x r
floats to what the model stores.

Forward (one launch, a program per block of BLOCK_M rows)
    Pass 1 streams h in BLOCK_D column chunks and accumulates z in fp32; pass 2 streams h again
    and writes out. Pass-1 loads are marked evict_last and pass-2 loads evict_first so that on a
    GPU the second read comes from L2 and DRAM sees one read of h and one write of out. When the
    whole row fits one chunk (d <= 256 at r <= 64) the program loads h once and keeps it in
    registers (SINGLE_PASS).

Backward (three launches)
    1. rows kernel, a program per row block: s_r = g U over column chunks, then gz, stored fp32.
    2. columns kernel, a program per (column tile, token split): holds its tiles of D, U and b_u
       in registers and walks its token range, writing dh = g + gz D and accumulating the four
       weight gradients for its column tile in registers (dD tile [r, BLOCK_D], dU tile
       [BLOCK_D, r], db_u tile, and db_d on column tile 0). At the end it writes one fp32
       partial per token split.
    3. a reduction kernel sums the partials over token splits in a fixed order and casts them to
       the weight dtype.

Why this reduction. The weight gradients are sums over every token. A row-block kernel that
also produced them would need a cross-program reduction of a full [r, d] + [d, r] per row block:
with fp32 atomics that is 2 (N / BLOCK_M) d r atomic adds onto the same d r addresses (67 MB of
L2 atomics at N = 16k, d = 4096, r = 8, BLOCK_M = 64), growing with r and with smaller row blocks,
and the order of the sums changes from run to run; per-program partials cost the same volume as
plain stores and a second read. The column-stationary kernel instead keeps a column tile's
gradient in registers over thousands of tokens and writes it once per token split: the partials
are splits x (2 d r + d + r) floats (a few hundred KB), the result is deterministic, and the
weight tiles are loaded once per program instead of once per row block. The price is one extra
read of g: kernel 1 reads g to form s_r (which needs the whole row), kernel 2 reads it again,
together with ``out``, and writes dh: four passes over N x d against the three of the minimum.
The number of token splits is chosen so that the grid has about two programs per SM while each
program still covers at least 256 tokens.

Dtypes. Elementwise maths, phi, z, gz and every accumulator are fp32. Matrix products take their
operands in the storage dtype (bf16/fp16 tensor cores) with fp32 accumulation; fp32 inputs use
``input_precision="ieee"`` so that they are not silently computed in TF32. Under the Triton
interpreter bf16 dot operands are upcast to fp32 first, because the interpreter's bf16 dot is wrong
(triton#11584); everything else runs as on the GPU.

Launches. ``plan_forward`` and ``plan_backward`` describe every launch as a ``KernelLaunch`` that
passes each kernel parameter by keyword, under its name in the kernel's signature. Tensors come in
one order from the public op down to the kernels' parameters: hidden, down_weight, up_weight,
down_bias, up_bias, residual for the forward; grad_out, out, z, down_weight, up_weight, up_bias
for the backward.

Layouts. ``hidden``, ``residual`` and ``grad_out`` may be 2-D [N, d] or 3-D [B, T, d] with any
strides (row r lives at (r // T) * stride_0 + (r % T) * stride_1); weights may have any strides.
``out``, ``z`` and the gradients are allocated contiguous. Row offsets are int64.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ..activations import activation_id
from .activations import activation_derivative, apply_activation

# ----------------------------------------------------------------------------------------------
# Triton helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_offsets(rows, rows_per_outer, stride_outer, stride_inner):
    """Element offset of each row of a 2-D or 3-D tensor viewed as [N, d]."""
    return (rows // rows_per_outer) * stride_outer + (rows % rows_per_outer) * stride_inner


@triton.jit
def _dot(lhs, rhs, acc, OPERAND_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    return tl.dot(
        lhs.to(OPERAND_DTYPE), rhs.to(OPERAND_DTYPE), acc, input_precision=INPUT_PRECISION
    )


@triton.jit
def _load_hidden_tile(
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
def _load_weight_tile(ptr, index_0, index_1, stride_0, stride_1, mask_0, mask_1):
    """A [len(index_0), len(index_1)] tile of a strided 2-D weight, zero outside the masks."""
    return tl.load(
        ptr + index_0[:, None] * stride_0 + index_1[None, :] * stride_1,
        mask=mask_0[:, None] & mask_1[None, :],
        other=0.0,
    )


@triton.jit
def _steer_output_tile(
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
    up_t = _load_weight_tile(
        up_weight_ptr, ranks, cols, stride_up_rank, stride_up_col, rank_mask, col_mask
    )
    delta = _dot(a, up_t, tl.zeros(h.shape, tl.float32), OPERAND_DTYPE, INPUT_PRECISION)
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
def _down_projection_pass(
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
        h = _load_hidden_tile(
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
        down_t = _load_weight_tile(
            down_weight_ptr, cols, ranks, stride_down_col, stride_down_rank, col_mask, rank_mask
        )
        z = _dot(h, down_t, z, OPERAND_DTYPE, INPUT_PRECISION)
    return z


@triton.jit
def _steer_output_pass(
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
        h = _load_hidden_tile(
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
        _steer_output_tile(
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
def _grad_up_projection(
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
        up = _load_weight_tile(
            up_weight_ptr, cols, ranks, stride_up_col, stride_up_rank, col_mask, rank_mask
        )
        projected = _dot(g, up, projected, OPERAND_DTYPE, INPUT_PRECISION)
    return projected


# ----------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _post_block_steer_forward_kernel(
    hidden_ptr,
    down_weight_ptr,
    up_weight_ptr,
    down_bias_ptr,
    up_bias_ptr,
    residual_ptr,
    out_ptr,
    z_ptr,
    n_rows,
    hidden_size,
    rank,
    rows_per_outer,
    stride_hidden_outer,
    stride_hidden_inner,
    stride_hidden_col,
    stride_residual_outer,
    stride_residual_inner,
    stride_residual_col,
    stride_down_rank,
    stride_down_col,
    stride_up_col,
    stride_up_rank,
    scale,
    ACTIVATION: tl.constexpr,
    HAS_DOWN_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    R_PAD: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    hidden_rows = _row_offsets(rows, rows_per_outer, stride_hidden_outer, stride_hidden_inner)
    residual_rows = _row_offsets(rows, rows_per_outer, stride_residual_outer, stride_residual_inner)
    ranks = tl.arange(0, R_PAD)
    rank_mask = ranks < rank
    z = tl.zeros((BLOCK_M, R_PAD), tl.float32)

    if SINGLE_PASS:
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < hidden_size
        mask = row_mask[:, None] & col_mask[None, :]
        h = _load_hidden_tile(
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
        down_t = _load_weight_tile(
            down_weight_ptr, cols, ranks, stride_down_col, stride_down_rank, col_mask, rank_mask
        )
        z = _dot(h, down_t, z, OPERAND_DTYPE, INPUT_PRECISION)
    else:
        z = _down_projection_pass(
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
            HAS_RESIDUAL,
            OPERAND_DTYPE,
            INPUT_PRECISION,
            BLOCK_M,
            BLOCK_D,
            R_PAD,
        )

    if HAS_DOWN_BIAS:
        z += tl.load(down_bias_ptr + ranks, mask=rank_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        z_ptr + rows[:, None] * rank + ranks[None, :],
        z,
        mask=row_mask[:, None] & rank_mask[None, :],
    )
    # Padded rank lanes hold z = 0 and phi(0) = 0 for every phi, so they add nothing below.
    a = apply_activation(z, ACTIVATION)

    if SINGLE_PASS:
        _steer_output_tile(
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
            1,
            scale,
            HAS_UP_BIAS,
            OPERAND_DTYPE,
            INPUT_PRECISION,
        )
    else:
        _steer_output_pass(
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
            1,
            scale,
            HAS_RESIDUAL,
            HAS_UP_BIAS,
            OPERAND_DTYPE,
            INPUT_PRECISION,
            BLOCK_D,
        )


# ----------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------


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
    grad_rows = _row_offsets(rows, rows_per_outer, stride_grad_outer, stride_grad_inner)
    ranks = tl.arange(0, R_PAD)
    rank_mask = ranks < rank

    projected = _grad_up_projection(
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

    down = _load_weight_tile(
        down_weight_ptr, ranks, cols, stride_down_rank, stride_down_col, rank_mask, col_mask
    )
    up_t = _load_weight_tile(
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

        grad_rows = _row_offsets(rows, rows_per_outer, stride_grad_outer, stride_grad_inner)
        g = tl.load(
            grad_out_ptr + grad_rows[:, None] + cols[None, :] * stride_grad_col,
            mask=mask,
            other=0.0,
        )
        grad_z = tl.load(grad_z_ptr + small_offsets, mask=small_mask, other=0.0)
        a = apply_activation(tl.load(z_ptr + small_offsets, mask=small_mask, other=0.0), ACTIVATION)

        grad_h = _dot(grad_z, down, g.to(tl.float32), OPERAND_DTYPE, INPUT_PRECISION)
        tl.store(
            grad_hidden_ptr + dense_offsets,
            grad_h.to(grad_hidden_ptr.dtype.element_ty),
            mask=mask,
        )

        # Rebuild h = out - s (a U^T + b_u) instead of having kept it from the forward.
        out = tl.load(out_ptr + dense_offsets, mask=mask, other=0.0)
        delta = _dot(
            a, up_t, tl.zeros((BLOCK_M, BLOCK_D), tl.float32), OPERAND_DTYPE, INPUT_PRECISION
        )
        h = out.to(tl.float32) - scale * (delta + up_bias[None, :])

        grad_down = _dot(tl.trans(grad_z), h, grad_down, OPERAND_DTYPE, INPUT_PRECISION)
        grad_up = _dot(tl.trans(g), a, grad_up, OPERAND_DTYPE, INPUT_PRECISION)
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
def _sum_partials(
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
    _sum_partials(
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


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

_REDUCE_BLOCK = 1024
# Programs per SM the backward's columns kernel aims for, and the fewest tokens one program
# covers, so that its weight tiles and partials stay small against the tokens it streams.
_PROGRAMS_PER_SM = 2
_MIN_TOKENS_PER_SPLIT = 256
# The SM count assumed where there is no GPU (the interpreter): an H100's, so that traffic counted
# on the CPU uses the launch shapes an H100 would.
_DEFAULT_NUM_SMS = 132


@dataclass(frozen=True)
class ForwardConfig:
    """Block shape of the forward kernel. ``single_pass`` iff one column chunk covers d."""

    block_m: int
    block_d: int
    num_warps: int = 8
    num_stages: int = 2


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


def padded_rank(rank: int) -> int:
    """The rank padded for tl.dot: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(rank))


# Launch heuristics, keyed on (d, padded rank, dtype), never on the token count. They were
# chosen by compiling candidate shapes for sm_90 (bench/compile_check.py reports registers
# and spills) and keeping the largest tiles that compile without register spills:
#   forward two-pass  32 x 128, 8 warps: 80 registers (bf16, r <= 64), 128 (fp32, r <= 16);
#                     fp32 at r_pad >= 32 needs 16 rows; r_pad >= 128 needs 64-column chunks.
#   forward one-pass  16 x d_pad (d_pad <= 256), 8 warps: 100-204 registers.
#   rows kernel       32 x 256, 8 warps (64-column chunks for r_pad >= 128).
#   columns kernel    16 x 64 at r_pad = 16 (100 registers bf16, 128 fp32), 16 x 32 up to
#                     r_pad = 64 (163 / 245), 16 x 16 beyond (spills 72 B bf16, 408 B fp32 at
#                     r = 256: the [rows, r] tiles of gz, z and a dominate there).
# Throughput on a GPU is still to be tuned against these (the L2 reuse of the forward's second
# pass, and the weight-tile reloads, depend on the row-block height).
_SINGLE_PASS_MAX_D = 256


def default_forward_config(
    hidden_size: int, rank: int, dtype: torch.dtype = torch.bfloat16
) -> ForwardConfig:
    """Forward block shape for d = ``hidden_size``, ``rank`` and the storage ``dtype``."""
    r_pad = padded_rank(rank)
    d_pad = max(16, triton.next_power_of_2(hidden_size))
    if d_pad <= _SINGLE_PASS_MAX_D and r_pad <= 64:
        return ForwardConfig(block_m=16, block_d=d_pad)
    block_m = 16 if dtype == torch.float32 and r_pad > 16 else 32
    return ForwardConfig(block_m=block_m, block_d=128 if r_pad <= 64 else 64)


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


def _token_splits(n_rows: int, block_m: int, n_col_tiles: int, num_sms: int) -> int:
    n_blocks = triton.cdiv(n_rows, block_m)
    wanted = triton.cdiv(_PROGRAMS_PER_SM * num_sms, n_col_tiles)
    return max(1, min(wanted, triton.cdiv(n_rows, _MIN_TOKENS_PER_SPLIT), n_blocks))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_NUM_SMS


def interpreted() -> bool:
    """True when these kernels were built for the Triton interpreter (TRITON_INTERPRET=1 was set
    when this module was first imported): they then run on CPU tensors, in numpy."""
    return isinstance(_post_block_steer_forward_kernel, InterpretedFunction)


def _dot_types(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """tl.dot operand dtype and input precision for storage dtype ``dtype``."""
    if dtype == torch.float16:
        return tl.float16, "tf32"
    if dtype == torch.bfloat16 and not interpreted():
        return tl.bfloat16, "tf32"
    # fp32 (and bf16 under the interpreter, whose bf16 dot is wrong): exact fp32 products.
    return tl.float32, "ieee"


def _common_kwargs(
    rows: torch.Tensor, dtype: torch.dtype, rank: int, activation: str, scale: float
) -> dict:
    """The parameters the forward, rows and columns kernels share, under their names.

    ``rows`` is the 2-D [N, d] or 3-D [B, T, d] tensor the kernel streams row by row (its
    ``rows_per_outer`` is T, or N for 2-D, whose outer stride is 0); ``dtype`` is the storage
    dtype, which sets the dot's operand dtype and precision.
    """
    hidden_size = rows.shape[-1]
    operand_dtype, input_precision = _dot_types(dtype)
    return dict(
        n_rows=rows.numel() // hidden_size,
        hidden_size=hidden_size,
        rank=rank,
        rows_per_outer=max(rows.shape[-2], 1),
        scale=float(scale),
        ACTIVATION=activation_id(activation),
        OPERAND_DTYPE=operand_dtype,
        INPUT_PRECISION=input_precision,
        R_PAD=padded_rank(rank),
    )


def _row_strides(name: str, tensor: torch.Tensor) -> dict[str, int]:
    """The kernel arguments ``stride_{name}_outer``, ``_inner`` and ``_col`` that address a 2-D
    [N, d] or 3-D [B, T, d] tensor row by row, without a copy."""
    if tensor.dim() == 2:
        outer, (inner, col) = 0, tensor.stride()
    else:
        outer, inner, col = tensor.stride()
    return {f"stride_{name}_outer": outer, f"stride_{name}_inner": inner, f"stride_{name}_col": col}


def _down_strides(down_weight: torch.Tensor) -> dict[str, int]:
    """Strides of D [r, d] under the kernels' parameter names."""
    return dict(stride_down_rank=down_weight.stride(0), stride_down_col=down_weight.stride(1))


def _up_strides(up_weight: torch.Tensor) -> dict[str, int]:
    """Strides of U [d, r] under the kernels' parameter names."""
    return dict(stride_up_col=up_weight.stride(0), stride_up_rank=up_weight.stride(1))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


class SteerForward(NamedTuple):
    out: torch.Tensor  # [..., d], same shape and dtype as hidden, contiguous
    z: torch.Tensor  # [..., r] fp32: the pre-activation, saved for the backward


class SteerBackward(NamedTuple):
    grad_hidden: torch.Tensor  # [..., d]: also the gradient of the residual
    grad_down_weight: torch.Tensor  # [r, d]
    grad_up_weight: torch.Tensor  # [d, r]
    grad_down_bias: torch.Tensor  # [r]
    grad_up_bias: torch.Tensor  # [d]


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


def plan_forward(
    hidden: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    scale: float,
    config: ForwardConfig | None = None,
) -> LaunchPlan:
    """Allocate the forward's outputs and describe its launch (nothing runs yet)."""
    rank, hidden_size = down_weight.shape
    n_rows = hidden.numel() // hidden_size
    out = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    z = torch.empty((*hidden.shape[:-1], rank), dtype=torch.float32, device=hidden.device)
    result = SteerForward(out, z)
    if n_rows == 0:
        return LaunchPlan([], result)

    config = config or default_forward_config(hidden_size, rank, hidden.dtype)
    kwargs = dict(
        hidden_ptr=hidden,
        down_weight_ptr=down_weight,
        up_weight_ptr=up_weight,
        # An absent tensor's HAS_* flag is off and the kernel never reads it: any pointer does.
        down_bias_ptr=down_bias if down_bias is not None else down_weight,
        up_bias_ptr=up_bias if up_bias is not None else up_weight,
        residual_ptr=residual if residual is not None else hidden,
        out_ptr=out,
        z_ptr=z,
        **_common_kwargs(hidden, hidden.dtype, rank, activation, scale),
        **_row_strides("hidden", hidden),
        **_row_strides("residual", residual if residual is not None else hidden),
        **_down_strides(down_weight),
        **_up_strides(up_weight),
        HAS_DOWN_BIAS=down_bias is not None,
        HAS_UP_BIAS=up_bias is not None,
        HAS_RESIDUAL=residual is not None,
        BLOCK_M=config.block_m,
        BLOCK_D=config.block_d,
        SINGLE_PASS=config.block_d >= hidden_size,
    )
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    grid = (triton.cdiv(n_rows, config.block_m),)
    launch = KernelLaunch(_post_block_steer_forward_kernel, grid, kwargs, options)
    return LaunchPlan([launch], result)


def plan_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    z: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    activation: str,
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
        **_common_kwargs(grad_out, out.dtype, rank, activation, scale),
        **_row_strides("grad", grad_out),
        **_up_strides(up_weight),
    )

    rows_launch = KernelLaunch(
        _post_block_steer_backward_rows_kernel,
        (triton.cdiv(n_rows, config.rows_block_m),),
        dict(shared, BLOCK_M=config.rows_block_m, BLOCK_D=config.rows_block_d),
        options,
    )

    n_col_tiles = triton.cdiv(hidden_size, config.cols_block_d)
    splits = config.splits or _token_splits(
        n_rows, config.cols_block_m, n_col_tiles, _num_sms(device)
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
            **_down_strides(down_weight),
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


def post_block_steer_forward(
    hidden: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    scale: float,
    config: ForwardConfig | None = None,
) -> SteerForward:
    """Run the fused forward. Inputs are assumed validated (steer_fast.ops does that)."""
    plan = plan_forward(
        hidden, down_weight, up_weight, down_bias, up_bias, residual, activation, scale, config
    )
    for launch in plan.launches:
        launch()
    return plan.result


def post_block_steer_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    z: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    activation: str,
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
