"""The forward kernels of multi_adapter_steer: the gather path and the grouped path.

Specified in ``multi_adapter_steer`` (the maths, both paths, dtypes and layouts), which plans and
launches them. ``gather_forward_kernel`` takes one program per block of BLOCK_M token rows in
their natural order, each row loading its own adapter's weights; ``grouped_forward_kernel``
one program per slot block of the sorted slot table (``multi_adapter_steer_common``), running
the single-adapter two-pass forward (``tiles``) on that slot's weights.
"""

import triton
import triton.language as tl

from .multi_adapter_steer_common import activate_slot, slot_activation
from .tiles import down_projection_pass, load_hidden_tile, row_offsets, steer_output_pass


@triton.jit
def gather_forward_kernel(
    hidden_ptr,
    down_weights_ptr,
    up_weights_ptr,
    down_biases_ptr,
    up_biases_ptr,
    residual_ptr,
    adapter_index_ptr,
    scales_ptr,
    activation_ids_ptr,
    out_ptr,
    z_ptr,
    n_rows,
    n_slots,
    hidden_size,
    rank,
    rows_per_outer,
    stride_hidden_outer,
    stride_hidden_inner,
    stride_hidden_col,
    stride_residual_outer,
    stride_residual_inner,
    stride_residual_col,
    stride_down_slot,
    stride_down_rank,
    stride_down_col,
    stride_up_slot,
    stride_up_col,
    stride_up_rank,
    stride_up_bias_slot,
    stride_up_bias_col,
    ACTIVATION: tl.constexpr,
    ACTIVATION_SET: tl.constexpr,
    HAS_DOWN_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    R_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    slots = tl.load(adapter_index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    # Out-of-range slots (possible only with the index check off) steer nothing rather than
    # reading outside the weights.
    steered = row_mask & (slots > 0) & (slots < n_slots)
    slots = tl.where(steered, slots, 0)
    scale = tl.load(scales_ptr + rows, mask=steered, other=0.0).to(tl.float32)
    hidden_rows = row_offsets(rows, rows_per_outer, stride_hidden_outer, stride_hidden_inner)
    residual_rows = row_offsets(rows, rows_per_outer, stride_residual_outer, stride_residual_inner)
    ranks = tl.arange(0, R_PAD)
    rank_mask = ranks < rank
    weight_mask = steered[:, None, None] & rank_mask[None, :, None]
    down_rows = down_weights_ptr + slots[:, None, None] * stride_down_slot
    down_rows += ranks[None, :, None] * stride_down_rank
    up_rows = up_weights_ptr + slots[:, None, None] * stride_up_slot
    up_rows += ranks[None, :, None] * stride_up_rank

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
        down = tl.load(
            down_rows + cols[None, None, :] * stride_down_col,
            mask=weight_mask & col_mask[None, None, :],
            other=0.0,
        )
        z += tl.sum(h.to(tl.float32)[:, None, :] * down.to(tl.float32), axis=2)
    small_mask = steered[:, None] & rank_mask[None, :]
    if HAS_DOWN_BIAS:
        # down_biases is contiguous [A, R] (the launcher makes it so).
        z += tl.load(
            down_biases_ptr + slots[:, None] * rank + ranks[None, :], mask=small_mask, other=0.0
        ).to(tl.float32)
    tl.store(
        z_ptr + rows[:, None] * rank + ranks[None, :],
        z,
        mask=row_mask[:, None] & rank_mask[None, :],
    )
    if ACTIVATION >= 0:
        act = 0
    else:
        act = tl.load(activation_ids_ptr + slots, mask=steered, other=0)[:, None]
    a = activate_slot(z, act, ACTIVATION, ACTIVATION_SET)

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
        up = tl.load(
            up_rows + cols[None, None, :] * stride_up_col,
            mask=weight_mask & col_mask[None, None, :],
            other=0.0,
        )
        delta = tl.sum(a[:, :, None] * up.to(tl.float32), axis=1)
        if HAS_UP_BIAS:
            delta += tl.load(
                up_biases_ptr
                + slots[:, None] * stride_up_bias_slot
                + cols[None, :] * stride_up_bias_col,
                mask=steered[:, None] & col_mask[None, :],
                other=0.0,
            ).to(tl.float32)
        steered_out = (h.to(tl.float32) + scale[:, None] * delta).to(h.dtype)
        # Slot-0 rows store h itself: bit-identical (h + 0 would turn -0.0 into +0.0).
        out = tl.where(steered[:, None], steered_out, h)
        tl.store(out_ptr + rows[:, None] * hidden_size + cols[None, :], out, mask=mask)


@triton.jit
def grouped_forward_kernel(
    hidden_ptr,
    down_weights_ptr,
    up_weights_ptr,
    down_biases_ptr,
    up_biases_ptr,
    residual_ptr,
    scales_ptr,
    activation_ids_ptr,
    order_ptr,
    block_slot_ptr,
    block_start_ptr,
    block_end_ptr,
    out_ptr,
    z_ptr,
    hidden_size,
    rank,
    rows_per_outer,
    stride_hidden_outer,
    stride_hidden_inner,
    stride_hidden_col,
    stride_residual_outer,
    stride_residual_inner,
    stride_residual_col,
    stride_down_slot,
    stride_down_rank,
    stride_down_col,
    stride_up_slot,
    stride_up_col,
    stride_up_rank,
    stride_up_bias_slot,
    stride_up_bias_col,
    ACTIVATION: tl.constexpr,
    ACTIVATION_SET: tl.constexpr,
    HAS_DOWN_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    R_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    slot = tl.load(block_slot_ptr + pid).to(tl.int64)
    positions = tl.load(block_start_ptr + pid) + tl.arange(0, BLOCK_M)
    row_mask = positions < tl.load(block_end_ptr + pid)
    rows = tl.load(order_ptr + positions, mask=row_mask, other=0)
    hidden_rows = row_offsets(rows, rows_per_outer, stride_hidden_outer, stride_hidden_inner)
    residual_rows = row_offsets(rows, rows_per_outer, stride_residual_outer, stride_residual_inner)
    ranks = tl.arange(0, R_PAD)
    rank_mask = ranks < rank
    z_offsets = rows[:, None] * rank + ranks[None, :]
    z_mask = row_mask[:, None] & rank_mask[None, :]

    if slot == 0:
        # No steering: out = h (one read, one write) and z = 0.
        tl.store(z_ptr + z_offsets, tl.zeros((BLOCK_M, R_PAD), tl.float32), mask=z_mask)
        for start in range(0, hidden_size, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (cols < hidden_size)[None, :]
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
            tl.store(out_ptr + rows[:, None] * hidden_size + cols[None, :], h, mask=mask)
    else:
        scale = tl.load(scales_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        z = down_projection_pass(
            hidden_ptr,
            residual_ptr,
            hidden_rows,
            residual_rows,
            row_mask,
            down_weights_ptr + slot * stride_down_slot,
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
            z += tl.load(down_biases_ptr + slot * rank + ranks, mask=rank_mask, other=0.0).to(
                tl.float32
            )[None, :]
        tl.store(z_ptr + z_offsets, z, mask=z_mask)
        act = slot_activation(activation_ids_ptr, slot, ACTIVATION)
        a = activate_slot(z, act, ACTIVATION, ACTIVATION_SET)
        steer_output_pass(
            hidden_ptr,
            residual_ptr,
            hidden_rows,
            residual_rows,
            row_mask,
            a,
            up_weights_ptr + slot * stride_up_slot,
            up_biases_ptr + slot * stride_up_bias_slot,
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
            scale[:, None],
            HAS_RESIDUAL,
            HAS_UP_BIAS,
            OPERAND_DTYPE,
            INPUT_PRECISION,
            BLOCK_D,
        )
