"""Fused steering vector: Triton kernels and their launchers.

The op adds one vector b to every token, fused with the block's residual add. For hidden states
x and the block's own residual stream res (optional):

    h     = res + x                                  [N, d]   (the block's skip connection)
    out   = h + s b                                  [N, d]

with b = bias [d] and scale s. It is post_block_steer at rank 0: the fixed-vector ablation, and
classic activation steering with a trained vector per layer. With g = dL/dout:

    dx    = g                                        [N, d]   (also the gradient of res)
    db    = s sum_rows(g)                            [d]

Saved for the backward: nothing. Neither dx nor db needs a forward tensor, so autograd keeps no
tensor of size N x d (or of any size) for this op; s is a plain float attribute.

Forward (one launch, ``_steering_vector_forward_kernel``)
    A 2-D grid of (row blocks, column tiles). Each program loads a [BLOCK_M, BLOCK_D] tile of x
    (and of res), rounds h = res + x to the storage dtype as the unfused block would store it,
    adds s b in fp32 and stores the tile of ``out``, contiguous, in the input dtype. Traffic:
    read x, read res, write out, 3 passes over N x d (2 without a residual), which is the
    minimum for an op that reads two tensors and writes one; b adds d elements per row block
    (from L2 on a GPU).

Backward
    dx is g itself: no kernel runs and no N x d buffer is written (the gradient of x and of res
    is the very tensor autograd passed in, as for an eager ``res + x``).
    db is a column reduction over all tokens, made deterministic by a fixed summation order:
      1. ``_steering_vector_backward_kernel``, a program per (column tile, token split): walks
         its token range in BLOCK_M-row blocks, accumulating a [BLOCK_M, BLOCK_D] fp32 tile,
         reduces it over rows once at the end and writes one fp32 partial row per split
         ([splits, d]). With a single split (few tokens) it writes s sum(g) in b's dtype
         directly and the second launch is skipped (FINAL).
      2. ``_steering_vector_reduce_kernel`` sums the partials over splits in split order, times
         s, cast to b's dtype.
    Traffic: g is read once (1 pass over N x d); the partials are splits x d floats written and
    read once (a few hundred KB at most). No atomics: two runs on one device give bit-identical
    db. The split count gives about four programs per SM over the column tiles while each program
    covers at least 128 tokens.

Dtypes. Loads in the storage dtype, every sum and product in fp32 (s is cast to fp32 inside the
kernels: a float reaching a kernel from torch.compile can arrive as fp64), stores in the storage
dtype; partials are fp32.

Launches. ``plan_forward`` and ``plan_backward`` describe every launch as a ``KernelLaunch`` (the
one of ``post_block_steer``) that passes each kernel parameter by keyword, under its name in the
kernel's signature. Tensors come in one order from the public op down to the kernels' parameters:
hidden, bias, residual forward; grad_out backward.

Layouts. ``hidden``, ``residual`` and ``grad_out`` may be 2-D [N, d] or 3-D [B, T, d] with any
strides, stride 0 included (row r lives at (r // T) * stride_0 + (r % T) * stride_1); ``bias`` may
have any stride. ``out``, the partials and db are allocated contiguous. Row offsets are int64, so
tensors of more than 2^31 elements are addressed correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import KernelLaunch, LaunchPlan, num_sms, row_strides, token_splits
from .tiles import load_hidden_tile, row_offsets

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _steering_vector_forward_kernel(
    hidden_ptr,
    bias_ptr,
    residual_ptr,
    out_ptr,
    n_rows,
    hidden_size,
    rows_per_outer,
    stride_hidden_outer,
    stride_hidden_inner,
    stride_hidden_col,
    stride_residual_outer,
    stride_residual_inner,
    stride_residual_col,
    stride_bias,
    scale,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out = (res + x) + s b for one [BLOCK_M, BLOCK_D] tile, stored to the contiguous out."""
    scale = tl.cast(scale, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    col_mask = cols < hidden_size
    mask = row_mask[:, None] & col_mask[None, :]
    hidden_rows = row_offsets(rows, rows_per_outer, stride_hidden_outer, stride_hidden_inner)
    residual_rows = row_offsets(rows, rows_per_outer, stride_residual_outer, stride_residual_inner)
    # Every element is read once: nothing is worth keeping in L2.
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
    bias = tl.load(bias_ptr + cols * stride_bias, mask=col_mask, other=0.0).to(tl.float32)
    out = h.to(tl.float32) + scale * bias[None, :]
    tl.store(
        out_ptr + rows[:, None] * hidden_size + cols[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _steering_vector_backward_kernel(
    grad_out_ptr,
    partial_ptr,
    grad_bias_ptr,
    n_rows,
    hidden_size,
    rows_per_outer,
    rows_per_split,
    stride_grad_outer,
    stride_grad_inner,
    stride_grad_col,
    scale,
    FINAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Column sums of g over one token split, for one column tile.

    FINAL (a single split): store s sum(g) in b's dtype to ``grad_bias_ptr``. Otherwise store the
    fp32 sum to row ``pid_split`` of ``partial_ptr`` ([splits, d], contiguous).
    """
    scale = tl.cast(scale, tl.float32)
    pid_col = tl.program_id(0)
    pid_split = tl.program_id(1)
    cols = pid_col * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < hidden_size

    # Lane-wise fp32 sums over the split's row blocks, reduced over rows once after the loop: a
    # fixed order for a fixed block shape.
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    row_start = pid_split.to(tl.int64) * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
    for block_start in range(row_start, row_end, BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        grad_rows = row_offsets(rows, rows_per_outer, stride_grad_outer, stride_grad_inner)
        g = tl.load(
            grad_out_ptr + grad_rows[:, None] + cols[None, :] * stride_grad_col,
            mask=(rows < row_end)[:, None] & col_mask[None, :],
            other=0.0,
            eviction_policy="evict_first",
        )
        acc += g.to(tl.float32)
    total = tl.sum(acc, axis=0)

    if FINAL:
        tl.store(
            grad_bias_ptr + cols,
            (scale * total).to(grad_bias_ptr.dtype.element_ty),
            mask=col_mask,
        )
    else:
        tl.store(partial_ptr + pid_split * hidden_size + cols, total, mask=col_mask)


@triton.jit
def _steering_vector_reduce_kernel(
    partial_ptr,
    grad_bias_ptr,
    n_splits,
    hidden_size,
    scale,
    BLOCK_D: tl.constexpr,
):
    """db = s * (sum of the [splits, d] fp32 partials in split order), cast to b's dtype."""
    scale = tl.cast(scale, tl.float32)
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < hidden_size
    total = tl.zeros((BLOCK_D,), tl.float32)
    for split in range(0, n_splits):
        total += tl.load(partial_ptr + split * hidden_size + cols, mask=col_mask, other=0.0)
    tl.store(
        grad_bias_ptr + cols, (scale * total).to(grad_bias_ptr.dtype.element_ty), mask=col_mask
    )


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# Elements per program of the forward tile and of the backward's accumulator tile: 32 per thread
# at 4 warps (two 16-byte vectors per tensor in bf16, eight in fp32).
_TILE_ELEMENTS = 4096
# Small d fills the tile with rows up to this many: every row a thread holds costs int64 offsets.
_MAX_BLOCK_M = 64
_FORWARD_MAX_BLOCK_D = 512
_BACKWARD_MAX_BLOCK_D = 256
_REDUCE_BLOCK_D = 1024
# The backward's split count: programs per SM it aims for over all column tiles, and the fewest
# tokens a split covers.
PROGRAMS_PER_SM = 4
MIN_TOKENS_PER_SPLIT = 128


@dataclass(frozen=True)
class ForwardConfig:
    """Tile shape of the forward kernel."""

    block_m: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class BackwardConfig:
    """Tile shape of the backward kernel; ``splits`` None picks the token-split count."""

    block_m: int
    block_d: int
    splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3


def _padded_width(hidden_size: int) -> int:
    return max(16, triton.next_power_of_2(hidden_size))


# The tiles hold up to _TILE_ELEMENTS elements: the full (padded) row up to 512 columns forward
# and 256 backward, rows (at most 64) making up the rest. They compile for sm_90 without spills
# (bench/dev/compile_check.py: 48-96 registers forward, 70-92 backward, no stack) and are chosen
# from those register and traffic figures, not yet from GPU timings.
def _tile(hidden_size: int, max_block_d: int) -> tuple[int, int]:
    block_d = min(_padded_width(hidden_size), max_block_d)
    return min(_TILE_ELEMENTS // block_d, _MAX_BLOCK_M), block_d


def default_forward_config(hidden_size: int) -> ForwardConfig:
    """Forward tile for d = ``hidden_size`` (any dtype, any token count)."""
    block_m, block_d = _tile(hidden_size, _FORWARD_MAX_BLOCK_D)
    return ForwardConfig(block_m=block_m, block_d=block_d)


def default_backward_config(hidden_size: int) -> BackwardConfig:
    """Backward tile for d = ``hidden_size`` (any dtype, any token count)."""
    block_m, block_d = _tile(hidden_size, _BACKWARD_MAX_BLOCK_D)
    return BackwardConfig(block_m=block_m, block_d=block_d)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


class VectorForward(NamedTuple):
    out: torch.Tensor  # [..., d], same shape and dtype as hidden, contiguous


class VectorBackward(NamedTuple):
    grad_bias: torch.Tensor  # [d] in grad_out's dtype (the dtype of every tensor of the op)


def plan_forward(
    hidden: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    scale: float,
    config: ForwardConfig | None = None,
) -> LaunchPlan:
    """Allocate ``out`` and describe the forward's one launch (nothing runs yet).

    hidden: [N, d] or [B, T, d], any strides. bias: [d], any stride. residual: hidden's shape,
    any strides, or None.
    """
    hidden_size = hidden.shape[-1]
    n_rows = hidden.numel() // hidden_size
    out = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    result = VectorForward(out)
    if n_rows == 0:
        return LaunchPlan([], result)

    config = config or default_forward_config(hidden_size)
    kwargs = dict(
        hidden_ptr=hidden,
        bias_ptr=bias,
        # HAS_RESIDUAL off: the kernel never reads it, any pointer does.
        residual_ptr=residual if residual is not None else hidden,
        out_ptr=out,
        n_rows=n_rows,
        hidden_size=hidden_size,
        rows_per_outer=max(hidden.shape[-2], 1),
        **row_strides("hidden", hidden),
        **row_strides("residual", residual if residual is not None else hidden),
        stride_bias=bias.stride(0),
        scale=float(scale),
        HAS_RESIDUAL=residual is not None,
        BLOCK_M=config.block_m,
        BLOCK_D=config.block_d,
    )
    grid = (triton.cdiv(n_rows, config.block_m), triton.cdiv(hidden_size, config.block_d))
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    launch = KernelLaunch(_steering_vector_forward_kernel, grid, kwargs, options)
    return LaunchPlan([launch], result)


def plan_backward(
    grad_out: torch.Tensor,
    scale: float,
    config: BackwardConfig | None = None,
) -> LaunchPlan:
    """Allocate db and describe the backward's launches: one with a single token split, two
    (partials, then their fixed-order sum) otherwise. grad_out: [N, d] or [B, T, d], any strides.
    """
    hidden_size = grad_out.shape[-1]
    n_rows = grad_out.numel() // hidden_size
    device = grad_out.device
    grad_bias = torch.empty((hidden_size,), dtype=grad_out.dtype, device=device)
    result = VectorBackward(grad_bias)
    if n_rows == 0:
        grad_bias.zero_()
        return LaunchPlan([], result)

    config = config or default_backward_config(hidden_size)
    n_col_tiles = triton.cdiv(hidden_size, config.block_d)
    splits = config.splits or token_splits(
        n_rows,
        config.block_m,
        n_col_tiles,
        num_sms(device),
        programs_per_sm=PROGRAMS_PER_SM,
        min_tokens_per_split=MIN_TOKENS_PER_SPLIT,
    )
    n_row_blocks = triton.cdiv(n_rows, config.block_m)
    rows_per_split = triton.cdiv(n_row_blocks, splits) * config.block_m
    splits = triton.cdiv(n_rows, rows_per_split)  # no empty splits
    final = splits == 1
    # Unused (never read or written) when FINAL: the kernel then stores to grad_bias.
    partials = (
        grad_bias
        if final
        else torch.empty((splits, hidden_size), dtype=torch.float32, device=device)
    )
    columns = KernelLaunch(
        _steering_vector_backward_kernel,
        (n_col_tiles, splits),
        dict(
            grad_out_ptr=grad_out,
            partial_ptr=partials,
            grad_bias_ptr=grad_bias,
            n_rows=n_rows,
            hidden_size=hidden_size,
            rows_per_outer=max(grad_out.shape[-2], 1),
            rows_per_split=rows_per_split,
            **row_strides("grad", grad_out),
            scale=float(scale),
            FINAL=final,
            BLOCK_M=config.block_m,
            BLOCK_D=config.block_d,
        ),
        dict(num_warps=config.num_warps, num_stages=config.num_stages),
    )
    if final:
        return LaunchPlan([columns], result)
    reduce = KernelLaunch(
        _steering_vector_reduce_kernel,
        (triton.cdiv(hidden_size, _REDUCE_BLOCK_D),),
        dict(
            partial_ptr=partials,
            grad_bias_ptr=grad_bias,
            n_splits=splits,
            hidden_size=hidden_size,
            scale=float(scale),
            BLOCK_D=_REDUCE_BLOCK_D,
        ),
        {},  # Triton's default warps and stages
    )
    return LaunchPlan([columns, reduce], result)


def steering_vector_forward(
    hidden: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    scale: float,
    config: ForwardConfig | None = None,
) -> torch.Tensor:
    """Run the fused forward; returns ``out``. Inputs are assumed validated
    (``steer_fast.ops.steering_vector`` does that)."""
    plan = plan_forward(hidden, bias, residual, scale, config)
    for launch in plan.launches:
        launch()
    return plan.result.out


def steering_vector_backward(
    grad_out: torch.Tensor,
    scale: float,
    config: BackwardConfig | None = None,
) -> torch.Tensor:
    """db = s sum_rows(grad_out) in grad_out's dtype, deterministically. The gradient of hidden
    and of residual is ``grad_out`` itself and needs no kernel."""
    plan = plan_backward(grad_out, scale, config)
    for launch in plan.launches:
        launch()
    return plan.result.grad_bias
