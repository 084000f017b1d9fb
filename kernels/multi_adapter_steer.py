"""Mixed-batch steering: Triton kernels where every token row picks its own adapter.

The op, for token n with slot a = index[n] (slot 0 = no steering) and strength s_n = scales[n]:

    h_n   = res_n + x_n                                      [d]
    z_n   = D_a h_n + bd_a                                   [R]   (0 for slot-0 tokens)
    out_n = h_n + s_n (U_a phi_a(z_n) + bu_a)                [d]   (h_n, bit-exact, for slot 0)

with D [A, R, d], U [A, d, R], bd [A, R], bu [A, d] stacked over A slots and zero-padded to the
largest rank R (phi(0) = 0 for every phi, so padded lanes add nothing). With g = dL/dout, for the
tokens of slot a:

    gz_n  = s_n phi_a'(z_n) * (g_n U_a)                      [R]
    dh_n  = g_n + gz_n D_a                                   [d]   (g_n for slot 0)
    dU_a  = sum_n s_n g_n^T phi_a(z_n),    dbu_a = sum_n s_n g_n
    dD_a  = sum_n gz_n^T h_n,              dbd_a = sum_n gz_n

Saved for the backward: ``out``, z [N, R] fp32, the index and the scales. h is rebuilt in the
backward as h = out - s (a U_a^T + bu_a), as in ``post_block_steer``.

Forward, two paths (same results up to fp32 summation order)
    gather   one program per block of BLOCK_M token rows in their natural order. Rows of one
             block may belong to different slots, so each row loads its own adapter's weights:
             a gathered [BLOCK_M, R, BLOCK_D] tile of D (and of U), multiplied elementwise with
             h and reduced over the column (rank) axis, in fp32. No sort, no tl.dot, no tile
             reuse across rows: the weight traffic is BLOCK_M R d per block, which is what
             decode has anyway (a few tokens per adapter). Slot-0 rows load no weights and are
             stored as h.
    grouped  tokens sorted by slot on the device and cut into blocks of one slot each (the
             slot-block table of ``multi_adapter_steer_common``). A program loads its block's token
             rows through ``order`` and runs the single-adapter two-pass forward on that slot's
             tiles with tl.dot, so each weight tile serves BLOCK_M rows (prefill). Slot-0
             blocks only copy h. The sort costs a few small torch ops and an [N] gather of
             row ids per block; the price is padding: up to one partial block per slot.

``path="auto"`` takes "grouped" when N >= GROUPED_MIN_ROWS_PER_SLOT * (A - 1), i.e. when a
steering slot would on average fill a few row blocks, and "gather" otherwise. The choice uses
shapes only (never the index values: no host sync, and a CUDA graph or compiled graph stays
valid when the routing changes). The threshold is a guess, NOT a measurement: no GPU was
available when this was written. ``bench/dev/multi_adapter_switch.py`` measures the switch point
(both paths over N and A, at the model's d and R) on a GPU; set the constant from it.

Backward (three launches, ``multi_adapter_steer_backward``). Whatever path the
forward took, the backward sorts the tokens by slot again (cheap, and the order is
deterministic), because the weight gradients are per-slot reductions:
    1. rows kernel, a program per slot block: s_r = g U_a (tl.dot on the slot's tiles) and gz.
    2. columns kernel, a program per (column tile, token unit), where a unit is one slot's run
       of at most a token split's sorted positions: it keeps the slot's weight tiles and the
       tile's gradients in registers while it walks the unit, writes dh = g + gz D_a (slot-0
       units copy g), and stores one fp32 partial per unit.
    3. a reduction sums each slot's unit partials in unit order (deterministic, no atomics).
    The partial buffer has (token splits + A) rows at most: a few MB at N = 16k, d = 4096,
    R = 16, where a partial per row block would take ~280 MB.

Dtypes. Elementwise maths, phi, z, gz and accumulators are fp32. tl.dot operands take the
storage dtype on a GPU (fp32 with input_precision="ieee" for fp32), and fp32 under the
interpreter for bf16, whose bf16 dot is wrong (triton#11584); see ``dot_types``. Per-slot phis:
one constexpr when every steering slot shares it, else a per-slot id read from an [A] table and a
tl.where chain over the ids present (``multi_adapter_steer_common.activate_slot``). Row offsets are
int64; hidden, residual and grad_out may be 2-D or 3-D with any strides; the weights any strides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import KernelLaunch, LaunchPlan, dot_types, padded_rank, row_strides
from .multi_adapter_steer_backward import (
    MultiSteerBackward,
    multi_adapter_steer_backward,
    plan_backward,
)
from .multi_adapter_steer_common import (
    MultiAdapterConfig,
    SlotBlocks,
    activate_slot,
    activation_kwargs,
    default_gather_config,
    default_grouped_config,
    gather_rank,
    plan_slot_blocks,
    rows_per_outer,
    slot_activation,
    weight_strides,
)
from .post_block_steer_backward import BackwardConfig
from .tiles import down_projection_pass, load_hidden_tile, row_offsets, steer_output_pass

__all__ = [
    "GROUPED_MIN_ROWS_PER_SLOT",
    "BackwardConfig",
    "MultiAdapterConfig",
    "MultiSteerBackward",
    "MultiSteerForward",
    "choose_path",
    "multi_adapter_steer_backward",
    "multi_adapter_steer_forward",
    "plan_backward",
    "plan_forward",
]

# "auto" takes the grouped path from this many token rows per steering slot on. A guess to be
# measured on a GPU (see the module docstring): at 32 rows a slot fills one grouped block.
GROUPED_MIN_ROWS_PER_SLOT = 32


@triton.jit
def _gather_forward_kernel(
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
def _grouped_forward_kernel(
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


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


class MultiSteerForward(NamedTuple):
    out: torch.Tensor  # [..., d], hidden's shape and dtype, contiguous
    z: torch.Tensor  # [..., R] fp32: the pre-activation (0 for slot-0 tokens)


def choose_path(n_rows: int, n_slots: int) -> str:
    """The forward path "auto" takes for N = ``n_rows`` tokens and A = ``n_slots`` slots."""
    return "grouped" if n_rows >= GROUPED_MIN_ROWS_PER_SLOT * max(n_slots - 1, 1) else "gather"


def plan_forward(
    hidden: torch.Tensor,
    down_weights: torch.Tensor,
    up_weights: torch.Tensor,
    down_biases: torch.Tensor | None,
    up_biases: torch.Tensor | None,
    residual: torch.Tensor | None,
    adapter_index: torch.Tensor,
    scales: torch.Tensor,
    activation_ids: Sequence[int],
    path: str = "auto",
    config: MultiAdapterConfig | None = None,
) -> LaunchPlan:
    """Allocate the forward's outputs and describe its launch. ``adapter_index`` [N] int32 or
    int64 and ``scales`` [N] fp32 must be contiguous (the op flattens them). For the grouped
    path the slot-block table is built here (device ops, no host sync)."""
    n_slots, rank, hidden_size = down_weights.shape
    n_rows = hidden.numel() // hidden_size
    device = hidden.device
    out = torch.empty(hidden.shape, dtype=hidden.dtype, device=device)
    z = torch.empty((*hidden.shape[:-1], rank), dtype=torch.float32, device=device)
    result = MultiSteerForward(out, z)
    if n_rows == 0:
        return LaunchPlan([], result)
    if path == "auto":
        path = choose_path(n_rows, n_slots)
    kwargs = dict(
        hidden_ptr=hidden,
        down_weights_ptr=down_weights,
        up_weights_ptr=up_weights,
        # An absent tensor's HAS_* flag is off and the kernel never reads it: any pointer does.
        down_biases_ptr=down_biases.contiguous() if down_biases is not None else down_weights,
        up_biases_ptr=up_biases if up_biases is not None else up_weights,
        residual_ptr=residual if residual is not None else hidden,
        scales_ptr=scales,
        out_ptr=out,
        z_ptr=z,
        hidden_size=hidden_size,
        rank=rank,
        rows_per_outer=rows_per_outer(hidden),
        **row_strides("hidden", hidden),
        **row_strides("residual", residual if residual is not None else hidden),
        **weight_strides(down_weights, up_weights, up_biases),
        **activation_kwargs(activation_ids, device, adapter_index),
        HAS_DOWN_BIAS=down_biases is not None,
        HAS_UP_BIAS=up_biases is not None,
        HAS_RESIDUAL=residual is not None,
    )
    if path == "gather":
        config = config or default_gather_config(hidden_size, rank)
        kwargs.update(
            adapter_index_ptr=adapter_index,
            n_rows=n_rows,
            n_slots=n_slots,
            R_PAD=gather_rank(rank),
        )
        kernel, grid = _gather_forward_kernel, triton.cdiv(n_rows, config.block_m)
    elif path == "grouped":
        config = config or default_grouped_config(hidden_size, rank)
        table: SlotBlocks = plan_slot_blocks(adapter_index, n_slots, config.block_m)
        operand_dtype, input_precision = dot_types(hidden.dtype)
        kwargs.update(
            order_ptr=table.order,
            block_slot_ptr=table.block_slot,
            block_start_ptr=table.block_start,
            block_end_ptr=table.block_end,
            OPERAND_DTYPE=operand_dtype,
            INPUT_PRECISION=input_precision,
            R_PAD=padded_rank(rank),
        )
        kernel, grid = _grouped_forward_kernel, table.grid
    else:
        raise ValueError(f"path must be 'auto', 'gather' or 'grouped', got {path!r}")
    kwargs.update(BLOCK_M=config.block_m, BLOCK_D=config.block_d)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return LaunchPlan([KernelLaunch(kernel, (grid,), kwargs, options)], result)


def multi_adapter_steer_forward(
    hidden: torch.Tensor,
    down_weights: torch.Tensor,
    up_weights: torch.Tensor,
    down_biases: torch.Tensor | None,
    up_biases: torch.Tensor | None,
    residual: torch.Tensor | None,
    adapter_index: torch.Tensor,
    scales: torch.Tensor,
    activation_ids: Sequence[int],
    path: str = "auto",
    config: MultiAdapterConfig | None = None,
) -> MultiSteerForward:
    """Run the forward. Inputs are assumed validated (``steer_fast.ops.multi_adapter_steer``
    does that)."""
    plan = plan_forward(
        hidden,
        down_weights,
        up_weights,
        down_biases,
        up_biases,
        residual,
        adapter_index,
        scales,
        activation_ids,
        path,
        config,
    )
    for launch in plan.launches:
        launch()
    return plan.result
