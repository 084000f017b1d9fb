"""The backward of multi_adapter_steer: a grouped kernel and a fixed-order per-slot reduction.

The maths, the layout and why the backward always sorts tokens by slot are specified in
``steer_fast.kernels.multi_adapter_steer``. Partial row j of the fp32 buffer (one per slot block,
``partial_stride`` = 2 R d + d + R floats) is laid out as

    [dD (R x d, row-major) | dU (d x R, row-major) | dbu (d) | dbd (R)]

and holds block j's contribution to its slot's gradients. Slot-0 and empty blocks write no row;
the reduction never reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .multi_adapter_common import (
    MultiAdapterConfig,
    activate_slot,
    activation_derivative_slot,
    activation_kwargs,
    default_grouped_config,
    plan_slot_blocks,
    rows_per_outer,
    weight_strides,
)
from .post_block_steer import (
    KernelLaunch,
    LaunchPlan,
    _dot,
    _dot_types,
    _load_weight_tile,
    _row_offsets,
    _row_strides,
    padded_rank,
)

_REDUCE_BLOCK = 1024


@triton.jit
def _grouped_backward_kernel(
    grad_out_ptr, out_ptr, z_ptr, down_weights_ptr, up_weights_ptr, up_biases_ptr,
    scales_ptr, activation_ids_ptr, order_ptr, block_slot_ptr, block_start_ptr, block_end_ptr,
    grad_hidden_ptr, partial_ptr,
    hidden_size, rank, rows_per_outer, partial_stride,
    stride_grad_outer, stride_grad_inner, stride_grad_col,
    stride_down_slot, stride_down_rank, stride_down_col,
    stride_up_slot, stride_up_col, stride_up_rank,
    stride_up_bias_slot, stride_up_bias_col,
    ACTIVATION: tl.constexpr, ACTIVATION_SET: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr,
):
    """dh for one slot block (out of place) and the block's weight-gradient partials."""
    pid = tl.program_id(0)
    slot = tl.load(block_slot_ptr + pid).to(tl.int64)
    positions = tl.load(block_start_ptr + pid) + tl.arange(0, BLOCK_M)
    row_mask = positions < tl.load(block_end_ptr + pid)
    rows = tl.load(order_ptr + positions, mask=row_mask, other=0)
    grad_rows = _row_offsets(rows, rows_per_outer, stride_grad_outer, stride_grad_inner)
    ranks = tl.arange(0, R_PAD)
    rank_mask = ranks < rank

    if slot == 0:
        # No steering: dh = g, and no weight gradient.
        for start in range(0, hidden_size, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (cols < hidden_size)[None, :]
            g = tl.load(
                grad_out_ptr + grad_rows[:, None] + cols[None, :] * stride_grad_col,
                mask=mask, other=0.0,
            )
            tl.store(
                grad_hidden_ptr + rows[:, None] * hidden_size + cols[None, :],
                g.to(grad_hidden_ptr.dtype.element_ty), mask=mask,
            )
    else:
        down_ptr = down_weights_ptr + slot * stride_down_slot
        up_ptr = up_weights_ptr + slot * stride_up_slot
        # Masked rows get s = 0 and z = 0, so their gz, s a and s g are 0 below.
        scale = tl.load(scales_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)

        # Pass 1: s_r = g U_a, then gz = s phi'(z) * s_r.
        projected = tl.zeros((BLOCK_M, R_PAD), tl.float32)
        for start in range(0, hidden_size, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_mask = cols < hidden_size
            g = tl.load(
                grad_out_ptr + grad_rows[:, None] + cols[None, :] * stride_grad_col,
                mask=row_mask[:, None] & col_mask[None, :], other=0.0, eviction_policy="evict_last",
            )
            up = _load_weight_tile(
                up_ptr, cols, ranks, stride_up_col, stride_up_rank, col_mask, rank_mask
            )
            projected = _dot(g, up, projected, OPERAND_DTYPE, INPUT_PRECISION)
        z = tl.load(
            z_ptr + rows[:, None] * rank + ranks[None, :],
            mask=row_mask[:, None] & rank_mask[None, :], other=0.0,
        )
        if ACTIVATION >= 0:
            act = 0
        else:
            act = tl.load(activation_ids_ptr + slot)
        grad_z = scale[:, None] * activation_derivative_slot(z, act, ACTIVATION, ACTIVATION_SET)
        grad_z = grad_z * projected
        a = activate_slot(z, act, ACTIVATION, ACTIVATION_SET)
        scaled_a = scale[:, None] * a

        # Pass 2: dh, the rebuilt h, and this block's partials, column chunk by column chunk.
        partial = partial_ptr + pid.to(tl.int64) * partial_stride
        n_weight = rank * hidden_size
        for start in range(0, hidden_size, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_mask = cols < hidden_size
            mask = row_mask[:, None] & col_mask[None, :]
            dense_offsets = rows[:, None] * hidden_size + cols[None, :]
            g = tl.load(
                grad_out_ptr + grad_rows[:, None] + cols[None, :] * stride_grad_col,
                mask=mask, other=0.0, eviction_policy="evict_first",
            )
            down = _load_weight_tile(
                down_ptr, ranks, cols, stride_down_rank, stride_down_col, rank_mask, col_mask
            )
            grad_h = _dot(grad_z, down, g.to(tl.float32), OPERAND_DTYPE, INPUT_PRECISION)
            tl.store(
                grad_hidden_ptr + dense_offsets, grad_h.to(grad_hidden_ptr.dtype.element_ty),
                mask=mask,
            )
            # Rebuild h = out - s (a U_a^T + bu_a) instead of having kept it from the forward.
            up_t = _load_weight_tile(
                up_ptr, ranks, cols, stride_up_rank, stride_up_col, rank_mask, col_mask
            )
            delta = _dot(
                a, up_t, tl.zeros((BLOCK_M, BLOCK_D), tl.float32), OPERAND_DTYPE,
                INPUT_PRECISION,
            )
            if HAS_UP_BIAS:
                delta += tl.load(
                    up_biases_ptr + slot * stride_up_bias_slot + cols * stride_up_bias_col,
                    mask=col_mask, other=0.0,
                ).to(tl.float32)[None, :]
            out = tl.load(out_ptr + dense_offsets, mask=mask, other=0.0)
            h = out.to(tl.float32) - scale[:, None] * delta

            zero_down = tl.zeros((R_PAD, BLOCK_D), tl.float32)
            grad_down = _dot(tl.trans(grad_z), h, zero_down, OPERAND_DTYPE, INPUT_PRECISION)
            zero_up = tl.zeros((BLOCK_D, R_PAD), tl.float32)
            grad_up = _dot(tl.trans(g), scaled_a, zero_up, OPERAND_DTYPE, INPUT_PRECISION)
            grad_up_bias = tl.sum(scale[:, None] * g.to(tl.float32), axis=0)
            tl.store(
                partial + ranks[:, None] * hidden_size + cols[None, :], grad_down,
                mask=rank_mask[:, None] & col_mask[None, :],
            )
            tl.store(
                partial + n_weight + cols[:, None] * rank + ranks[None, :], grad_up,
                mask=col_mask[:, None] & rank_mask[None, :],
            )
            tl.store(partial + 2 * n_weight + cols, grad_up_bias, mask=col_mask)
        tl.store(
            partial + 2 * n_weight + hidden_size + ranks, tl.sum(grad_z, axis=0), mask=rank_mask
        )


@triton.jit
def _reduce_slot_grads_kernel(
    partial_ptr, first_block_ptr, blocks_ptr,
    grad_down_weights_ptr, grad_up_weights_ptr, grad_down_biases_ptr, grad_up_biases_ptr,
    hidden_size, rank,
    BLOCK: tl.constexpr,
):
    """One chunk of one slot's gradients: its blocks' partials summed in block order (fixed,
    hence deterministic), cast to the weight dtype. Slot 0 and unused slots get zeros."""
    slot = tl.program_id(1).to(tl.int64)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n_weight = rank * hidden_size
    partial_stride = 2 * n_weight + hidden_size + rank
    mask = offsets < partial_stride
    first = tl.load(first_block_ptr + slot)
    # Slot 0's blocks wrote no partials: sum none of them.
    last = tl.where(slot == 0, first, first + tl.load(blocks_ptr + slot))
    total = tl.zeros((BLOCK,), tl.float32)
    for block in range(first, last):
        total += tl.load(partial_ptr + block * partial_stride + offsets, mask=mask, other=0.0)

    up_start = n_weight
    up_bias_start = 2 * n_weight
    down_bias_start = 2 * n_weight + hidden_size
    tl.store(
        grad_down_weights_ptr + slot * n_weight + offsets,
        total.to(grad_down_weights_ptr.dtype.element_ty), mask=offsets < up_start,
    )
    tl.store(
        grad_up_weights_ptr + slot * n_weight + (offsets - up_start),
        total.to(grad_up_weights_ptr.dtype.element_ty),
        mask=(offsets >= up_start) & (offsets < up_bias_start),
    )
    tl.store(
        grad_up_biases_ptr + slot * hidden_size + (offsets - up_bias_start),
        total.to(grad_up_biases_ptr.dtype.element_ty),
        mask=(offsets >= up_bias_start) & (offsets < down_bias_start),
    )
    tl.store(
        grad_down_biases_ptr + slot * rank + (offsets - down_bias_start),
        total.to(grad_down_biases_ptr.dtype.element_ty),
        mask=(offsets >= down_bias_start) & mask,
    )


class MultiSteerBackward(NamedTuple):
    grad_hidden: torch.Tensor  # [..., d]: also the gradient of the residual
    grad_down_weights: torch.Tensor  # [A, R, d]
    grad_up_weights: torch.Tensor  # [A, d, R]
    grad_down_biases: torch.Tensor  # [A, R]
    grad_up_biases: torch.Tensor  # [A, d]


def plan_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    z: torch.Tensor,
    down_weights: torch.Tensor,
    up_weights: torch.Tensor,
    up_biases: torch.Tensor | None,
    adapter_index: torch.Tensor,
    scales: torch.Tensor,
    activations: Sequence[str],
    config: MultiAdapterConfig | None = None,
) -> LaunchPlan:
    """Allocate the backward's outputs and buffers, build the slot-block table (device ops) and
    describe the two launches. ``out`` and ``z`` are what the forward returned."""
    n_slots, rank, hidden_size = down_weights.shape
    n_rows = out.numel() // hidden_size
    device = out.device
    dtype = down_weights.dtype
    result = MultiSteerBackward(
        grad_hidden=torch.empty(out.shape, dtype=out.dtype, device=device),
        grad_down_weights=torch.empty((n_slots, rank, hidden_size), dtype=dtype, device=device),
        grad_up_weights=torch.empty((n_slots, hidden_size, rank), dtype=dtype, device=device),
        grad_down_biases=torch.empty((n_slots, rank), dtype=dtype, device=device),
        grad_up_biases=torch.empty((n_slots, hidden_size), dtype=dtype, device=device),
    )
    if n_rows == 0:
        for weight_grad in result[1:]:
            weight_grad.zero_()
        return LaunchPlan([], result)

    config = config or default_grouped_config(hidden_size, rank)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    table = plan_slot_blocks(adapter_index, n_slots, config.block_m)
    partial_stride = 2 * rank * hidden_size + hidden_size + rank
    partials = torch.empty((table.grid, partial_stride), dtype=torch.float32, device=device)
    operand_dtype, input_precision = _dot_types(out.dtype)
    grouped = KernelLaunch(
        _grouped_backward_kernel,
        (table.grid,),
        dict(
            grad_out_ptr=grad_out,
            out_ptr=out,
            z_ptr=z,
            down_weights_ptr=down_weights,
            up_weights_ptr=up_weights,
            up_biases_ptr=up_biases if up_biases is not None else up_weights,  # HAS_UP_BIAS
            scales_ptr=scales,
            order_ptr=table.order,
            block_slot_ptr=table.block_slot,
            block_start_ptr=table.block_start,
            block_end_ptr=table.block_end,
            grad_hidden_ptr=result.grad_hidden,
            partial_ptr=partials,
            hidden_size=hidden_size,
            rank=rank,
            rows_per_outer=rows_per_outer(grad_out),
            partial_stride=partial_stride,
            **_row_strides("grad", grad_out),
            **weight_strides(down_weights, up_weights, up_biases),
            **activation_kwargs(activations, device, adapter_index),
            HAS_UP_BIAS=up_biases is not None,
            OPERAND_DTYPE=operand_dtype,
            INPUT_PRECISION=input_precision,
            BLOCK_M=config.block_m,
            BLOCK_D=config.block_d,
            R_PAD=padded_rank(rank),
        ),
        options,
    )
    reduce = KernelLaunch(
        _reduce_slot_grads_kernel,
        (triton.cdiv(partial_stride, _REDUCE_BLOCK), n_slots),
        dict(
            partial_ptr=partials,
            first_block_ptr=table.first_block,
            blocks_ptr=table.blocks,
            grad_down_weights_ptr=result.grad_down_weights,
            grad_up_weights_ptr=result.grad_up_weights,
            grad_down_biases_ptr=result.grad_down_biases,
            grad_up_biases_ptr=result.grad_up_biases,
            hidden_size=hidden_size,
            rank=rank,
            BLOCK=_REDUCE_BLOCK,
        ),
        {},  # Triton's default warps and stages
    )
    return LaunchPlan([grouped, reduce], result)


def multi_adapter_steer_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    z: torch.Tensor,
    down_weights: torch.Tensor,
    up_weights: torch.Tensor,
    up_biases: torch.Tensor | None,
    adapter_index: torch.Tensor,
    scales: torch.Tensor,
    activations: Sequence[str],
    config: MultiAdapterConfig | None = None,
) -> MultiSteerBackward:
    """Run the backward: dh and per-block partials (grouped kernel), then the per-slot sums.
    ``grad_out`` has the shape of ``out`` and any strides. Bias gradients are always
    produced."""
    plan = plan_backward(
        grad_out, out, z, down_weights, up_weights, up_biases, adapter_index, scales,
        activations, config,
    )
    for launch in plan.launches:
        launch()
    return plan.result
