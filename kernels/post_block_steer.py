"""Fused post-block steering: the specification, the forward kernel and its launcher.

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

Backward (three launches, ``post_block_steer_backward``)
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

Launches. ``plan_forward`` and ``plan_backward`` describe every launch as a ``KernelLaunch``
(``launch``) that passes each kernel parameter by keyword, under its name in the kernel's
signature; ``activation`` is phi's integer id (``activations``). Tensors come in
one order from the public op down to the kernels' parameters: hidden, down_weight, up_weight,
down_bias, up_bias, residual for the forward; grad_out, out, z, down_weight, up_weight, up_bias
for the backward.

Layouts. ``hidden``, ``residual`` and ``grad_out`` may be 2-D [N, d] or 3-D [B, T, d] with any
strides (row r lives at (r // T) * stride_0 + (r % T) * stride_1); weights may have any strides.
``out``, ``z`` and the gradients are allocated contiguous. Row offsets are int64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .activations import apply_activation
from .launch import (
    KernelLaunch,
    LaunchPlan,
    down_strides,
    padded_rank,
    row_strides,
    steer_kwargs,
    up_strides,
)

# The backward's launcher and planning, so that this module is the op's one entry point.
from .post_block_steer_backward import (  # noqa: F401
    BackwardConfig,
    SteerBackward,
    default_backward_config,
    plan_backward,
    post_block_steer_backward,
)
from .tiles import (
    dot,
    down_projection_pass,
    load_hidden_tile,
    load_weight_tile,
    row_offsets,
    steer_output_pass,
    steer_output_tile,
)


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
    hidden_rows = row_offsets(rows, rows_per_outer, stride_hidden_outer, stride_hidden_inner)
    residual_rows = row_offsets(rows, rows_per_outer, stride_residual_outer, stride_residual_inner)
    ranks = tl.arange(0, R_PAD)
    rank_mask = ranks < rank
    z = tl.zeros((BLOCK_M, R_PAD), tl.float32)

    if SINGLE_PASS:
        cols = tl.arange(0, BLOCK_D)
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
        down_t = load_weight_tile(
            down_weight_ptr, cols, ranks, stride_down_col, stride_down_rank, col_mask, rank_mask
        )
        z = dot(h, down_t, z, OPERAND_DTYPE, INPUT_PRECISION)
    else:
        z = down_projection_pass(
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
            1,
            scale,
            HAS_UP_BIAS,
            OPERAND_DTYPE,
            INPUT_PRECISION,
        )
    else:
        steer_output_pass(
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


@dataclass(frozen=True)
class ForwardConfig:
    """Block shape of the forward kernel. ``single_pass`` iff one column chunk covers d."""

    block_m: int
    block_d: int
    num_warps: int = 8
    num_stages: int = 2


# Launch heuristics, keyed on (d, padded rank, dtype), never on the token count. They were
# chosen by compiling candidate shapes for sm_90 (bench/dev/compile_check.py reports registers
# and spills) and keeping the largest tiles that compile without register spills:
#   two-pass  32 x 128, 8 warps: 80 registers (bf16, r <= 64), 128 (fp32, r <= 16);
#             fp32 at r_pad >= 32 needs 16 rows; r_pad >= 128 needs 64-column chunks.
#   one-pass  16 x d_pad (d_pad <= 256), 8 warps: 100-204 registers.
# Throughput on a GPU is still to be tuned against these (the L2 reuse of the second pass
# depends on the row-block height).
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


class SteerForward(NamedTuple):
    out: torch.Tensor  # [..., d], same shape and dtype as hidden, contiguous
    z: torch.Tensor  # [..., r] fp32: the pre-activation, saved for the backward


def plan_forward(
    hidden: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: int,
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
        **steer_kwargs(hidden, hidden.dtype, rank, activation, scale),
        **row_strides("hidden", hidden),
        **row_strides("residual", residual if residual is not None else hidden),
        **down_strides(down_weight),
        **up_strides(up_weight),
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


def post_block_steer_forward(
    hidden: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: int,
    scale: float,
    config: ForwardConfig | None = None,
) -> SteerForward:
    """Run the fused forward. Inputs are assumed validated (``steer_fast.ops`` does that)."""
    plan = plan_forward(
        hidden, down_weight, up_weight, down_bias, up_bias, residual, activation, scale, config
    )
    for launch in plan.launches:
        launch()
    return plan.result
