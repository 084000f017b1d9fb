"""The backward kernels of multi_adapter_steer: a rows kernel, a column-stationary kernel over
per-slot token ranges, and a fixed-order per-slot reduction (planned and launched by
``multi_adapter_steer.plan_backward``).

The maths and the forward are specified in ``multi_adapter_steer``; this is
the multi-adapter form of the single-adapter backward in ``post_block_steer``
(same three launches, same block-shape heuristic ``default_backward_config``). Tokens are sorted
by slot once (``sort_by_slot``), and the sorted list is cut twice:

    row blocks   of rows_block_m positions (``cut_slot_blocks``), one slot each
    token units  of unit_rows positions, one slot each: a slot with many rows gets several
                 units, a slot with a few rows one; at most cdiv(N, unit_rows) + min(A, N)

Launches:
    1. rows kernel, a program per row block: s_r = g U_a over column chunks (tl.dot on the
       slot's tiles), gz = s phi_a'(z) * s_r, stored fp32 [N, R] by sorted position. Slot-0 and
       empty blocks do nothing.
    2. columns kernel, a program per (column tile, token unit): holds its slot's tiles of D_a,
       U_a and bu_a and walks the unit's positions BLOCK_M at a time, writing dh = g + gz D_a
       out of place and accumulating the tile's dD_a, dU_a, dbu_a (and dbd_a on column tile 0)
       in registers; h is rebuilt as out - s (a U_a^T + bu_a). At the end it writes its unit's
       fp32 partial for its column tile. Slot-0 units copy g into dh and write no partial.
    3. ``reduce_slot_grads_kernel`` sums each slot's unit partials in unit order (fixed, hence
       deterministic, no atomics) and casts them; slot 0 and slots without rows get zeros.

Partial row u of the fp32 buffer (``partial_stride`` = 2 R d + d + R floats) is laid out as

    [dD (R x d, row-major) | dU (d x R, row-major) | dbu (d) | dbd (R)]

The buffer has one row per token unit: (splits + A) rows at most, where splits is the token-split
count of the single-adapter backward (about two programs per SM, at least 256 tokens each). At
N = 16k, d = 4096, R = 16 on a 132-SM GPU that is 5 splits: 7 rows (3.7 MB) with one adapter and
69 rows (36 MB, against 17 MB of bf16 weight gradients) with 64, where a partial per 32-row block
would take 280 MB. The price, as in the single-adapter backward, is a second read of g.
"""

import triton
import triton.language as tl

from .multi_adapter_steer_common import activate_slot, activation_derivative_slot, slot_activation
from .tiles import dot, grad_up_projection, load_weight_tile, row_offsets, sum_partials


@triton.jit
def multi_backward_rows_kernel(
    grad_out_ptr,
    z_ptr,
    up_weights_ptr,
    scales_ptr,
    activation_ids_ptr,
    order_ptr,
    block_slot_ptr,
    block_start_ptr,
    block_end_ptr,
    grad_z_ptr,
    hidden_size,
    rank,
    rows_per_outer,
    stride_grad_outer,
    stride_grad_inner,
    stride_grad_col,
    stride_up_slot,
    stride_up_col,
    stride_up_rank,
    ACTIVATION: tl.constexpr,
    ACTIVATION_SET: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """gz = s phi_a'(z) * (g U_a) for one row block of slot a, stored fp32 by sorted position."""
    pid = tl.program_id(0)
    slot = tl.load(block_slot_ptr + pid).to(tl.int64)
    if slot != 0:
        positions = tl.load(block_start_ptr + pid) + tl.arange(0, BLOCK_M)
        row_mask = positions < tl.load(block_end_ptr + pid)
        rows = tl.load(order_ptr + positions, mask=row_mask, other=0)
        grad_rows = row_offsets(rows, rows_per_outer, stride_grad_outer, stride_grad_inner)
        ranks = tl.arange(0, R_PAD)
        rank_mask = ranks < rank
        projected = grad_up_projection(
            grad_out_ptr,
            grad_rows,
            row_mask,
            up_weights_ptr + slot * stride_up_slot,
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
        z = tl.load(z_ptr + rows[:, None] * rank + ranks[None, :], mask=small_mask, other=0.0)
        scale = tl.load(scales_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        act = slot_activation(activation_ids_ptr, slot, ACTIVATION)
        grad_z = scale[:, None] * activation_derivative_slot(z, act, ACTIVATION, ACTIVATION_SET)
        tl.store(
            grad_z_ptr + positions[:, None] * rank + ranks[None, :],
            grad_z * projected,
            mask=small_mask,
        )


@triton.jit
def multi_backward_cols_kernel(
    grad_out_ptr,
    out_ptr,
    z_ptr,
    down_weights_ptr,
    up_weights_ptr,
    up_biases_ptr,
    grad_z_ptr,
    scales_ptr,
    activation_ids_ptr,
    order_ptr,
    unit_slot_ptr,
    unit_start_ptr,
    unit_end_ptr,
    grad_hidden_ptr,
    partial_ptr,
    hidden_size,
    rank,
    rows_per_outer,
    partial_stride,
    stride_grad_outer,
    stride_grad_inner,
    stride_grad_col,
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
    HAS_UP_BIAS: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """dh for a column tile over one token unit (one slot's run of sorted positions), and the
    unit's weight-gradient partials for that tile."""
    pid_col = tl.program_id(0)
    pid_unit = tl.program_id(1)
    slot = tl.load(unit_slot_ptr + pid_unit).to(tl.int64)
    unit_start = tl.load(unit_start_ptr + pid_unit)
    unit_end = tl.load(unit_end_ptr + pid_unit)
    cols = pid_col * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < hidden_size
    ranks = tl.arange(0, R_PAD)
    rank_mask = ranks < rank

    if slot == 0:
        # No steering: dh = g, and no weight gradient. (Empty units have start = end.)
        for block_start in range(unit_start, unit_end, BLOCK_M):
            positions = block_start + tl.arange(0, BLOCK_M)
            row_mask = positions < unit_end
            rows = tl.load(order_ptr + positions, mask=row_mask, other=0)
            grad_rows = row_offsets(rows, rows_per_outer, stride_grad_outer, stride_grad_inner)
            mask = row_mask[:, None] & col_mask[None, :]
            g = tl.load(
                grad_out_ptr + grad_rows[:, None] + cols[None, :] * stride_grad_col,
                mask=mask,
                other=0.0,
            )
            tl.store(
                grad_hidden_ptr + rows[:, None] * hidden_size + cols[None, :],
                g.to(grad_hidden_ptr.dtype.element_ty),
                mask=mask,
            )
    else:
        down = load_weight_tile(
            down_weights_ptr + slot * stride_down_slot,
            ranks,
            cols,
            stride_down_rank,
            stride_down_col,
            rank_mask,
            col_mask,
        )
        up_t = load_weight_tile(
            up_weights_ptr + slot * stride_up_slot,
            ranks,
            cols,
            stride_up_rank,
            stride_up_col,
            rank_mask,
            col_mask,
        )
        if HAS_UP_BIAS:
            up_bias = tl.load(
                up_biases_ptr + slot * stride_up_bias_slot + cols * stride_up_bias_col,
                mask=col_mask,
                other=0.0,
            ).to(tl.float32)
        else:
            up_bias = tl.zeros((BLOCK_D,), tl.float32)
        act = slot_activation(activation_ids_ptr, slot, ACTIVATION)

        grad_down = tl.zeros((R_PAD, BLOCK_D), tl.float32)
        grad_up = tl.zeros((BLOCK_D, R_PAD), tl.float32)
        grad_up_bias = tl.zeros((BLOCK_D,), tl.float32)
        grad_down_bias = tl.zeros((R_PAD,), tl.float32)
        for block_start in range(unit_start, unit_end, BLOCK_M):
            positions = block_start + tl.arange(0, BLOCK_M)
            row_mask = positions < unit_end
            rows = tl.load(order_ptr + positions, mask=row_mask, other=0)
            mask = row_mask[:, None] & col_mask[None, :]
            small_mask = row_mask[:, None] & rank_mask[None, :]
            dense_offsets = rows[:, None] * hidden_size + cols[None, :]

            grad_rows = row_offsets(rows, rows_per_outer, stride_grad_outer, stride_grad_inner)
            g = tl.load(
                grad_out_ptr + grad_rows[:, None] + cols[None, :] * stride_grad_col,
                mask=mask,
                other=0.0,
            )
            grad_z = tl.load(
                grad_z_ptr + positions[:, None] * rank + ranks[None, :],
                mask=small_mask,
                other=0.0,
            )
            z = tl.load(z_ptr + rows[:, None] * rank + ranks[None, :], mask=small_mask, other=0.0)
            a = activate_slot(z, act, ACTIVATION, ACTIVATION_SET)
            # Masked rows get s = 0: their s a and s g are 0 below.
            scale = tl.load(scales_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            scaled_a = scale[:, None] * a

            grad_h = dot(grad_z, down, g.to(tl.float32), OPERAND_DTYPE, INPUT_PRECISION)
            tl.store(
                grad_hidden_ptr + dense_offsets,
                grad_h.to(grad_hidden_ptr.dtype.element_ty),
                mask=mask,
            )

            # Rebuild h = out - s (a U_a^T + bu_a) instead of having kept it from the forward.
            out = tl.load(out_ptr + dense_offsets, mask=mask, other=0.0)
            delta = dot(
                a,
                up_t,
                tl.zeros((BLOCK_M, BLOCK_D), tl.float32),
                OPERAND_DTYPE,
                INPUT_PRECISION,
            )
            h = out.to(tl.float32) - scale[:, None] * (delta + up_bias[None, :])

            grad_down = dot(tl.trans(grad_z), h, grad_down, OPERAND_DTYPE, INPUT_PRECISION)
            grad_up = dot(tl.trans(g), scaled_a, grad_up, OPERAND_DTYPE, INPUT_PRECISION)
            grad_up_bias += tl.sum(scale[:, None] * g.to(tl.float32), axis=0)
            grad_down_bias += tl.sum(grad_z, axis=0)

        partial = partial_ptr + pid_unit.to(tl.int64) * partial_stride
        n_weight = rank * hidden_size
        tl.store(
            partial + ranks[:, None] * hidden_size + cols[None, :],
            grad_down,
            mask=rank_mask[:, None] & col_mask[None, :],
        )
        tl.store(
            partial + n_weight + cols[:, None] * rank + ranks[None, :],
            grad_up,
            mask=col_mask[:, None] & rank_mask[None, :],
        )
        tl.store(partial + 2 * n_weight + cols, grad_up_bias, mask=col_mask)
        # Every column tile sums the same gz; tile 0 writes it (the test is broadcast to a
        # block, as in the single-adapter columns kernel).
        first_tile = (ranks * 0 + pid_col) == 0
        tl.store(
            partial + 2 * n_weight + hidden_size + ranks,
            grad_down_bias,
            mask=rank_mask & first_tile,
        )


@triton.jit
def reduce_slot_grads_kernel(
    partial_ptr,
    first_block_ptr,
    blocks_ptr,
    grad_down_weights_ptr,
    grad_up_weights_ptr,
    grad_down_biases_ptr,
    grad_up_biases_ptr,
    hidden_size,
    rank,
    BLOCK: tl.constexpr,
):
    """One chunk of one slot's gradients: its units' partials summed in unit order (fixed,
    hence deterministic), cast to the weight dtype. Slot 0 and unused slots get zeros."""
    slot = tl.program_id(1).to(tl.int64)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n_weight = rank * hidden_size
    first = tl.load(first_block_ptr + slot)
    # Slot 0's units wrote no partials: sum none of them.
    last = tl.where(slot == 0, first, first + tl.load(blocks_ptr + slot))
    sum_partials(
        partial_ptr,
        first,
        last,
        offsets,
        grad_down_weights_ptr + slot * n_weight,
        grad_up_weights_ptr + slot * n_weight,
        grad_down_biases_ptr + slot * rank,
        grad_up_biases_ptr + slot * hidden_size,
        n_weight,
        hidden_size,
        rank,
        BLOCK,
    )
