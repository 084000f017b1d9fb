"""What the multi-adapter forward and backward kernels share: per-slot activations, the sorted
slot-block table, launch configurations and stride arguments.

The slot-block table ("grouped" layout). Tokens are sorted by slot on the device (a stable
argsort of the index, so the order is deterministic), and the sorted list is cut into blocks of
BLOCK_M positions that never straddle two slots:

    order[p]            token of sorted position p                    [N]   int64
    bounds[a]           first sorted position of slot a (bounds[A] = N)    [A + 1]
    blocks[a]           cdiv(bounds[a + 1] - bounds[a], BLOCK_M)      [A]
    first_block[a]      sum of blocks[:a]                             [A]
    block_slot[j], block_start[j], block_end[j]                       [G]

Block j covers sorted positions [block_start[j], block_end[j]) of slot block_slot[j]. The grid
size G = cdiv(N, BLOCK_M) + min(A, N) bounds the number of blocks from the shapes alone, so that
nothing is read back to the host (CUDA-graph capturable); the blocks past the real count are
empty (slot 0, start = end = 0) and do nothing. All of it is a handful of small torch ops.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .activations import activation_derivative, apply_activation
from .launch import interpreted, padded_rank

# ----------------------------------------------------------------------------------------------
# Per-slot activations
# ----------------------------------------------------------------------------------------------


@triton.jit
def activate_slot(z, act, ACTIVATION: tl.constexpr, ACTIVATION_SET: tl.constexpr):
    """phi(z) in fp32. ACTIVATION >= 0: every steering slot uses that phi (``act`` unused).
    ACTIVATION = -1: ``act`` holds the id per row (or one id), and a tl.where chain evaluates
    only the ids present in the bitmask ACTIVATION_SET."""
    if ACTIVATION >= 0:
        a = apply_activation(z, ACTIVATION)
    else:
        a = tl.zeros_like(z)
        for i in tl.static_range(6):
            if (ACTIVATION_SET >> i) & 1:
                a = tl.where(act == i, apply_activation(z, i), a)
    return a


@triton.jit
def activation_derivative_slot(z, act, ACTIVATION: tl.constexpr, ACTIVATION_SET: tl.constexpr):
    """phi'(z) in fp32, with the conventions of ``activate_slot``."""
    if ACTIVATION >= 0:
        da = activation_derivative(z, ACTIVATION)
    else:
        da = tl.zeros_like(z)
        for i in tl.static_range(6):
            if (ACTIVATION_SET >> i) & 1:
                da = tl.where(act == i, activation_derivative(z, i), da)
    return da


@triton.jit
def slot_activation(activation_ids_ptr, slot, ACTIVATION: tl.constexpr):
    """The activation id of one slot, read from the [A] table when the slots mix phis
    (ACTIVATION = -1); else 0, unused."""
    if ACTIVATION >= 0:
        act = 0
    else:
        act = tl.load(activation_ids_ptr + slot)
    return act


def activation_constants(activation_ids: Sequence[int]) -> dict[str, int]:
    """ACTIVATION (one id, or -1 when the steering slots mix phis) and ACTIVATION_SET (the
    bitmask of the ids of slots 1..A-1; slot 0's activation is ignored)."""
    ids = {int(i) for i in activation_ids[1:]} or {0}
    return dict(
        ACTIVATION=next(iter(ids)) if len(ids) == 1 else -1,
        ACTIVATION_SET=sum(1 << i for i in ids),
    )


@functools.lru_cache(maxsize=64)
def activation_table(activation_ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[A] int32 activation ids on ``device``, read by the kernels when the slots mix phis.

    Cached, so that after the first call (a host-to-device copy) no copy is issued: a CUDA graph
    must be captured after one warm-up call, as usual."""
    return torch.tensor(activation_ids, dtype=torch.int32, device=device)


def activation_kwargs(activation_ids: Sequence[int], device: torch.device, any_tensor) -> dict:
    """The activation parameters of every kernel, under their names; ``activation_ids`` holds
    one id (``kernels.activations``) per slot."""
    constants = activation_constants(activation_ids)
    mixed = constants["ACTIVATION"] < 0
    table = activation_table(tuple(int(i) for i in activation_ids), device) if mixed else any_tensor
    return dict(activation_ids_ptr=table, **constants)


# ----------------------------------------------------------------------------------------------
# The grouped layout
# ----------------------------------------------------------------------------------------------


class SlotBlocks(NamedTuple):
    """The slot-block table of the module docstring, as kernel arguments."""

    order: torch.Tensor  # [N] int64: tokens sorted by slot, stable
    block_slot: torch.Tensor  # [G] int64
    block_start: torch.Tensor  # [G] int64: first sorted position of the block
    block_end: torch.Tensor  # [G] int64: one past its last
    first_block: torch.Tensor  # [A] int64
    blocks: torch.Tensor  # [A] int64: blocks of each slot (slot 0's copy blocks included)

    @property
    def grid(self) -> int:
        return self.block_slot.numel()


def grid_blocks(n_rows: int, n_slots: int, block_m: int) -> int:
    """G, the bound on the number of slot blocks (from the shapes only)."""
    return triton.cdiv(n_rows, block_m) + min(n_slots, n_rows)


class SlotSort(NamedTuple):
    """Tokens sorted by slot: what every slot-block table of one index is cut from."""

    order: torch.Tensor  # [N] int64: tokens sorted by slot, stable
    bounds: torch.Tensor  # [A + 1] int64: first sorted position of each slot, then N


def sort_by_slot(adapter_index: torch.Tensor, n_slots: int) -> SlotSort:
    """Stable argsort of the index and each slot's bounds in the sorted list, on the device."""
    index = adapter_index.reshape(-1)
    # An out-of-range slot (possible only with the op's index check off) is left unsteered, as
    # on the gather path, instead of leaving its rows outside every block (never written).
    index = torch.where((index >= 0) & (index < n_slots), index, 0)
    order = torch.argsort(index, stable=True)
    slots = torch.arange(n_slots + 1, device=index.device, dtype=index.dtype)
    return SlotSort(order=order, bounds=torch.searchsorted(index[order], slots))


def cut_slot_blocks(sort: SlotSort, block_m: int) -> SlotBlocks:
    """Cut each slot's run of sorted positions into blocks of at most ``block_m``."""
    order, bounds = sort
    n_slots = bounds.numel() - 1
    blocks = (bounds[1:] - bounds[:-1] + (block_m - 1)) // block_m
    ends = torch.cumsum(blocks, 0)
    first_block = ends - blocks
    block_ids = torch.arange(grid_blocks(order.numel(), n_slots, block_m), device=order.device)
    block_slot = torch.searchsorted(ends, block_ids, right=True)  # A past the last real block
    real = block_slot < n_slots
    slot = block_slot.clamp(max=n_slots - 1)
    start = bounds[slot] + (block_ids - first_block[slot]) * block_m
    end = torch.minimum(start + block_m, bounds[slot + 1])
    zero = torch.zeros_like(start)
    return SlotBlocks(
        order=order,
        block_slot=torch.where(real, slot, zero),
        block_start=torch.where(real, start, zero),
        block_end=torch.where(real, end, zero),
        first_block=first_block,
        blocks=blocks,
    )


def plan_slot_blocks(adapter_index: torch.Tensor, n_slots: int, block_m: int) -> SlotBlocks:
    """Sort tokens by slot and cut the sorted list into per-slot blocks, on the device."""
    return cut_slot_blocks(sort_by_slot(adapter_index, n_slots), block_m)


# ----------------------------------------------------------------------------------------------
# Launch configuration and arguments
# ----------------------------------------------------------------------------------------------

# The gather path multiplies [BLOCK_M, R_PAD, BLOCK_D] tiles elementwise, and addresses them with
# as many 64-bit pointers: keep one tile near this many elements (16 per thread at 8 warps).
# Compiled for sm_90 (bench/dev/compile_check.py), 8 warps: 61-193 registers and no spills from
# rank 1 to 64; the earlier 8192 elements at 4 warps reached 255 registers and spilled 40 bytes
# at d = 200, rank 1.
_GATHER_TILE_ELEMENTS = 4096


@dataclass(frozen=True)
class MultiAdapterConfig:
    """Block shape of one multi-adapter kernel: BLOCK_M token rows, BLOCK_D columns a chunk."""

    block_m: int
    block_d: int
    # 8 warps, as the single-adapter forward: at 4 the sm_90 builds of both forward paths took
    # 1.3-1.9x the registers (the grouped path 254 at d = 200, rank 1).
    num_warps: int = 8
    num_stages: int = 2


def gather_rank(rank: int) -> int:
    """The rank padded for the gather path (no tl.dot, so no minimum of 16)."""
    return max(2, triton.next_power_of_2(rank))


def default_gather_config(hidden_size: int, rank: int) -> MultiAdapterConfig:
    d_pad = max(16, triton.next_power_of_2(hidden_size))
    block_m = 16
    block_d = max(16, _GATHER_TILE_ELEMENTS // (block_m * gather_rank(rank)))
    return MultiAdapterConfig(block_m=block_m, block_d=min(d_pad, block_d))


def default_grouped_config(hidden_size: int, rank: int) -> MultiAdapterConfig:
    """Forward grouped path and backward: 32-row blocks (16 under the interpreter, one pinned
    config), column chunks sized as the single-adapter kernels'. Untuned: no GPU here."""
    d_pad = max(16, triton.next_power_of_2(hidden_size))
    r_pad = padded_rank(rank)
    block_m = 16 if interpreted() else 32
    return MultiAdapterConfig(block_m=block_m, block_d=min(d_pad, 128 if r_pad <= 64 else 64))


def weight_strides(
    down_weights: torch.Tensor, up_weights: torch.Tensor, up_biases: torch.Tensor | None
) -> dict[str, int]:
    """Strides of D [A, R, d], U [A, d, R] and b_u [A, d] under the kernels' parameter names."""
    up_bias_strides = up_biases.stride() if up_biases is not None else (0, 0)
    return dict(
        stride_down_slot=down_weights.stride(0),
        stride_down_rank=down_weights.stride(1),
        stride_down_col=down_weights.stride(2),
        stride_up_slot=up_weights.stride(0),
        stride_up_col=up_weights.stride(1),
        stride_up_rank=up_weights.stride(2),
        stride_up_bias_slot=up_bias_strides[0],
        stride_up_bias_col=up_bias_strides[1],
    )


def rows_per_outer(tensor: torch.Tensor) -> int:
    """T of a [B, T, d] tensor, N of an [N, d] one (whose outer stride is 0)."""
    return max(tensor.shape[-2], 1)
