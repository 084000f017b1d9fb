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

Backward (three launches of the kernels in ``multi_adapter_steer_backward``). Whatever path the
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

Files. This module plans and launches (``plan_forward``, ``plan_backward``, the two launchers);
the jit kernels are in ``multi_adapter_steer_forward`` (gather, grouped) and
``multi_adapter_steer_backward`` (rows, columns, reduction), and what they share (per-slot
activations, the slot-block table, block shapes) in ``multi_adapter_steer_common``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton

from .launch import (
    KernelLaunch,
    LaunchPlan,
    dot_types,
    num_sms,
    padded_rank,
    row_strides,
    token_splits,
)
from .multi_adapter_steer_backward import (
    multi_backward_cols_kernel,
    multi_backward_rows_kernel,
    reduce_slot_grads_kernel,
)
from .multi_adapter_steer_common import (
    MultiAdapterConfig,
    SlotBlocks,
    activation_kwargs,
    cut_slot_blocks,
    default_gather_config,
    default_grouped_config,
    gather_rank,
    plan_slot_blocks,
    rows_per_outer,
    sort_by_slot,
    weight_strides,
)
from .multi_adapter_steer_forward import gather_forward_kernel, grouped_forward_kernel
from .post_block_steer_backward import (
    MIN_TOKENS_PER_SPLIT,
    PROGRAMS_PER_SM,
    BackwardConfig,
    default_backward_config,
)

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

_REDUCE_BLOCK = 1024


class MultiSteerForward(NamedTuple):
    out: torch.Tensor  # [..., d], hidden's shape and dtype, contiguous
    z: torch.Tensor  # [..., R] fp32: the pre-activation (0 for slot-0 tokens)


class MultiSteerBackward(NamedTuple):
    grad_hidden: torch.Tensor  # [..., d]: also the gradient of the residual
    grad_down_weights: torch.Tensor  # [A, R, d]
    grad_up_weights: torch.Tensor  # [A, d, R]
    grad_down_biases: torch.Tensor  # [A, R]
    grad_up_biases: torch.Tensor  # [A, d]


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
        kernel, grid = gather_forward_kernel, triton.cdiv(n_rows, config.block_m)
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
        kernel, grid = grouped_forward_kernel, table.grid
    else:
        raise ValueError(f"path must be 'auto', 'gather' or 'grouped', got {path!r}")
    kwargs.update(BLOCK_M=config.block_m, BLOCK_D=config.block_d)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return LaunchPlan([KernelLaunch(kernel, (grid,), kwargs, options)], result)


def plan_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    z: torch.Tensor,
    down_weights: torch.Tensor,
    up_weights: torch.Tensor,
    up_biases: torch.Tensor | None,
    adapter_index: torch.Tensor,
    scales: torch.Tensor,
    activation_ids: Sequence[int],
    config: BackwardConfig | None = None,
) -> LaunchPlan:
    """Allocate the backward's outputs and buffers, build the row-block and token-unit tables
    (device ops, no host sync) and describe the three launches. ``out`` and ``z`` are what the
    forward returned; ``config`` takes the single-adapter backward's block shapes, whose
    ``splits`` is the token-split count behind the unit size."""
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

    config = config or default_backward_config(hidden_size, rank, out.dtype)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    sort = sort_by_slot(adapter_index, n_slots)
    row_blocks = cut_slot_blocks(sort, config.rows_block_m)
    n_col_tiles = triton.cdiv(hidden_size, config.cols_block_d)
    splits = config.splits or token_splits(
        n_rows,
        config.cols_block_m,
        n_col_tiles,
        num_sms(device),
        programs_per_sm=PROGRAMS_PER_SM,
        min_tokens_per_split=MIN_TOKENS_PER_SPLIT,
    )
    # A unit holds at most a token split's worth of a slot's rows, in whole columns-kernel blocks.
    unit_rows = triton.cdiv(triton.cdiv(n_rows, config.cols_block_m), splits) * config.cols_block_m
    units = cut_slot_blocks(sort, unit_rows)
    partial_stride = 2 * rank * hidden_size + hidden_size + rank
    partials = torch.empty((units.grid, partial_stride), dtype=torch.float32, device=device)
    grad_z = torch.empty((n_rows, rank), dtype=torch.float32, device=device)
    operand_dtype, input_precision = dot_types(out.dtype)
    # The parameters the rows and columns kernels share, under the same names.
    shared = dict(
        grad_out_ptr=grad_out,
        z_ptr=z,
        up_weights_ptr=up_weights,
        scales_ptr=scales,
        order_ptr=sort.order,
        grad_z_ptr=grad_z,
        hidden_size=hidden_size,
        rank=rank,
        rows_per_outer=rows_per_outer(grad_out),
        **row_strides("grad", grad_out),
        **activation_kwargs(activation_ids, device, adapter_index),
        OPERAND_DTYPE=operand_dtype,
        INPUT_PRECISION=input_precision,
        R_PAD=padded_rank(rank),
    )
    strides = weight_strides(down_weights, up_weights, up_biases)
    rows_launch = KernelLaunch(
        multi_backward_rows_kernel,
        (row_blocks.grid,),
        dict(
            shared,
            block_slot_ptr=row_blocks.block_slot,
            block_start_ptr=row_blocks.block_start,
            block_end_ptr=row_blocks.block_end,
            stride_up_slot=strides["stride_up_slot"],
            stride_up_col=strides["stride_up_col"],
            stride_up_rank=strides["stride_up_rank"],
            BLOCK_M=config.rows_block_m,
            BLOCK_D=config.rows_block_d,
        ),
        options,
    )
    cols_launch = KernelLaunch(
        multi_backward_cols_kernel,
        (n_col_tiles, units.grid),
        dict(
            shared,
            out_ptr=out,
            down_weights_ptr=down_weights,
            up_biases_ptr=up_biases if up_biases is not None else up_weights,  # HAS_UP_BIAS
            unit_slot_ptr=units.block_slot,
            unit_start_ptr=units.block_start,
            unit_end_ptr=units.block_end,
            grad_hidden_ptr=result.grad_hidden,
            partial_ptr=partials,
            partial_stride=partial_stride,
            **strides,
            HAS_UP_BIAS=up_biases is not None,
            BLOCK_M=config.cols_block_m,
            BLOCK_D=config.cols_block_d,
        ),
        options,
    )
    reduce_launch = KernelLaunch(
        reduce_slot_grads_kernel,
        (triton.cdiv(partial_stride, _REDUCE_BLOCK), n_slots),
        dict(
            partial_ptr=partials,
            first_block_ptr=units.first_block,
            blocks_ptr=units.blocks,
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
    return LaunchPlan([rows_launch, cols_launch, reduce_launch], result)


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


def multi_adapter_steer_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    z: torch.Tensor,
    down_weights: torch.Tensor,
    up_weights: torch.Tensor,
    up_biases: torch.Tensor | None,
    adapter_index: torch.Tensor,
    scales: torch.Tensor,
    activation_ids: Sequence[int],
    config: BackwardConfig | None = None,
) -> MultiSteerBackward:
    """Run the backward: gz (rows kernel), dh and per-unit partials (columns kernel), then the
    per-slot sums. ``grad_out`` has the shape of ``out`` and any strides. Bias gradients are
    always produced."""
    plan = plan_backward(
        grad_out,
        out,
        z,
        down_weights,
        up_weights,
        up_biases,
        adapter_index,
        scales,
        activation_ids,
        config,
    )
    for launch in plan.launches:
        launch()
    return plan.result
