"""The plain PyTorch path of multi_adapter_steer: the same maths and saved tensors as the kernels.

For token n with slot a = index[n] (slot 0 = no steering) and strength s_n:

    h_n   = residual_n + hidden_n
    z_n   = D_a h_n + bd_a                           [R]   (0 for slot-0 tokens)
    out_n = h_n + s_n (U_a phi_a(z_n) + bu_a)        [d]   (out_n = h_n exactly for slot 0)

and with g = dL/dout, for the tokens of slot a:

    gz_n  = s_n phi_a'(z_n) * (g_n U_a)              [R]
    dh_n  = g_n + gz_n D_a                           [d]   (dh_n = g_n for slot 0)
    dU_a  = sum_n s_n g_n^T phi_a(z_n),   dbu_a = sum_n s_n g_n
    dD_a  = sum_n gz_n^T h_n,             dbd_a = sum_n gz_n

Two forward paths, as the kernels have (same results up to summation order):

    grouped  the tokens are grouped by slot with one stable sort and a per-slot count (one host
             sync for the counts: this path is the fallback, not the one to capture in a CUDA
             graph). Each slot's rows are gathered with ``index_select``, run through two dense
             matmuls against that slot's [R, d] and [d, R] weights, and written back with
             ``index_copy_``: the largest temporary is [n_a, d] for the n_a rows of one slot.
             About ten small ops per slot present: it pays when slots have many rows (prefill).
    gather   each row's weights are gathered (``down_weights[index]``, [N, R, d], and the same
             of U) and applied with two batched matmuls: a fixed dozen ops whatever the number
             of adapters, no host sync, and a transient [N, R, d] pair (decode: a few rows per
             adapter).

``path="auto"`` takes "gather" when the gathered weights, N R d elements, stay within
``TORCH_GATHER_ELEMENTS_PER_SLOT`` x (A - 1) (and ``GATHER_MAX_ELEMENTS``), else "grouped":
shapes only, as the kernels' choice. On a CPU that is one row per adapter at small d. The
backward is always grouped. Like the kernels, only ``out`` and z [N, R] (fp32, fp64 for fp64)
are saved; h is rebuilt in the backward as h = out - s (phi(z) U^T + b_u).

Dtypes. Matrix products run in the input dtype (as an unfused model would run them); z, phi'(z),
gz and the per-row scaling are fp32 (fp64 for fp64 inputs), and out = h + s delta is formed in
that precision and rounded once. Slot-0 rows are copied (or selected), so they are bit-identical
to h (and their gradient to g). Everything is deterministic: each slot is reduced by one matmul
or sum, slots in increasing order, and ``index_copy_`` targets distinct rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from .phi import ACTIVATIONS, activate, activation_derivative
from .post_block_steer_torch import z_dtype

# "auto" gathers while the gathered weights cost less than the slot loop they replace: the
# gather copies N x R x d elements of D (and as many of U), the loop costs a fixed dozen small ops
# per steering slot. Measured on a 2-core Xeon, 1 thread, fp32, r = 16
# (bench/results/multi-torch-path-cpu-2026-12-03/): gathering is 1.5-2.5x faster at one row per
# adapter and d = 512 and 1.2-1.5x at two, while at d = 2048 it is 0.90-1.00x at one row and
# slower beyond: it wins up to about 16k gathered elements per slot, the bound below. Never a
# gathered pair over GATHER_MAX_ELEMENTS elements each (64 MiB in fp32).
TORCH_GATHER_ELEMENTS_PER_SLOT = 16384
GATHER_MAX_ELEMENTS = 1 << 24


def choose_path(n_rows: int, n_slots: int, rank: int, hidden_size: int) -> str:
    """The torch forward path "auto" takes for N = ``n_rows`` tokens over A = ``n_slots`` slots
    (slot 0 included) at rank R = ``rank`` and d = ``hidden_size``: shapes only."""
    gathered = n_rows * rank * hidden_size
    cheap = gathered <= TORCH_GATHER_ELEMENTS_PER_SLOT * max(n_slots - 1, 1)
    return "gather" if cheap and gathered <= GATHER_MAX_ELEMENTS else "grouped"


def slot_rows(adapter_index: torch.Tensor, n_slots: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(slot, rows) for every steering slot (>= 1) that owns at least one token, slots in
    increasing order and rows in increasing order (a stable sort). ``rows`` is int64 [n_a]."""
    index = adapter_index.reshape(-1)
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=n_slots).tolist()  # the one host sync
    start = counts[0]
    for slot in range(1, n_slots):
        count = counts[slot]
        if count:
            yield slot, order[start : start + count]
        start += count


def _names(activation_ids: Sequence[int]) -> tuple[str, ...]:
    """The phi name of every slot: this path evaluates phi by name (``phi.activate``)."""
    return tuple(ACTIVATIONS[int(i)] for i in activation_ids)


def _bias(bias: torch.Tensor | None, slot: int) -> torch.Tensor | None:
    return None if bias is None else bias[slot]


def forward(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, z): out [..., d] contiguous in hidden's dtype, z [..., R] fp32 (fp64 for fp64).

    ``adapter_index`` and ``scales`` hold one entry per token (any shape with N elements);
    ``activation_ids`` one phi id per slot (``ACTIVATIONS``); ``path`` is "auto", "gather" or
    "grouped" (see the module docstring).
    """
    activations = _names(activation_ids)
    n_slots, rank, hidden_size = down_weights.shape
    if path == "auto":
        path = choose_path(adapter_index.numel(), n_slots, rank, hidden_size)
    if path == "gather":
        return _gathered_forward(
            hidden,
            down_weights,
            up_weights,
            down_biases,
            up_biases,
            residual,
            adapter_index,
            scales,
            activations,
        )
    h = hidden if residual is None else residual + hidden
    out = h.reshape(-1, hidden_size).clone(memory_format=torch.contiguous_format)
    accumulate = z_dtype(h.dtype)
    z = torch.zeros((out.shape[0], rank), dtype=accumulate, device=out.device)
    row_scales = scales.reshape(-1).to(accumulate)
    for slot, rows in slot_rows(adapter_index, n_slots):
        h_a = out.index_select(0, rows)  # out still holds h on these rows
        z_a = F.linear(h_a, down_weights[slot], _bias(down_biases, slot)).to(accumulate)
        a = activate(z_a, activations[slot]).to(h.dtype)
        delta = F.linear(a, up_weights[slot], _bias(up_biases, slot))
        s = row_scales.index_select(0, rows)[:, None]
        out.index_copy_(0, rows, (h_a.to(accumulate) + s * delta.to(accumulate)).to(h.dtype))
        z.index_copy_(0, rows, z_a)
    return out.reshape(hidden.shape), z.reshape(*hidden.shape[:-1], rank)


def _activate_rows(z: torch.Tensor, index: torch.Tensor, activations: Sequence[str]):
    """phi_a(z_n) for every row n of slot a = index[n] (slot 0's phi is any: its z is 0)."""
    names = sorted(set(activations[1:])) or ["identity"]
    if len(names) == 1:
        return activate(z, names[0])
    ids = torch.tensor(
        [names.index(name) if name in names else 0 for name in activations], device=z.device
    )[index][:, None]
    a = torch.zeros_like(z)
    for position, name in enumerate(names):
        a = torch.where(ids == position, activate(z, name), a)
    return a


def _batched_linear(
    rows: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor | None, index: torch.Tensor
) -> torch.Tensor:
    """Row n times its own weight [out, in] (``weights[n]``), plus ``biases[index[n]]``.

    As [N, 1, in] @ [N, in, out]: on a CPU 2.3x faster than [N, out, in] @ [N, in, 1] at
    N = 64, 16 x 512 (the batched GEMM's row form)."""
    weights_t = weights.transpose(1, 2)
    if biases is None:
        return torch.bmm(rows[:, None, :], weights_t)[:, 0]
    return torch.baddbmm(biases[index][:, None, :], rows[:, None, :], weights_t)[:, 0]


def _gathered_forward(
    hidden: torch.Tensor,
    down_weights: torch.Tensor,
    up_weights: torch.Tensor,
    down_biases: torch.Tensor | None,
    up_biases: torch.Tensor | None,
    residual: torch.Tensor | None,
    adapter_index: torch.Tensor,
    scales: torch.Tensor,
    activations: Sequence[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gather path: every row's own D and U, gathered, in two batched matmuls."""
    n_slots, rank, hidden_size = down_weights.shape
    h = hidden if residual is None else residual + hidden
    h_rows = h.reshape(-1, hidden_size)
    index = adapter_index.reshape(-1)
    # An out-of-range slot (possible only with the op's index check off) is left unsteered, as
    # on the Triton paths, instead of indexing outside the weights.
    index = torch.where((index >= 0) & (index < n_slots), index, 0)
    steered = (index != 0)[:, None]
    accumulate = z_dtype(h.dtype)
    # Each row's z = D_a h_n + bd_a, the bias added inside the product as F.linear adds it.
    z = _batched_linear(h_rows, down_weights[index], down_biases, index)
    z = torch.where(steered, z.to(accumulate), 0)
    a = _activate_rows(z, index, activations).to(h.dtype)
    delta = _batched_linear(a, up_weights[index], up_biases, index)
    s = scales.reshape(-1).to(accumulate)[:, None]
    steered_rows = (h_rows.to(accumulate) + s * delta.to(accumulate)).to(h.dtype)
    out = torch.where(steered, steered_rows, h_rows)
    return out.reshape(hidden.shape), z.reshape(*hidden.shape[:-1], rank)


def backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    z: torch.Tensor,
    down_weights: torch.Tensor,
    up_weights: torch.Tensor,
    up_biases: torch.Tensor | None,
    adapter_index: torch.Tensor,
    scales: torch.Tensor,
    activation_ids: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_h, grad_down_weights, grad_up_weights, grad_down_biases, grad_up_biases).

    grad_h is shaped like ``out``; the weight gradients are [A, R, d], [A, d, R], [A, R],
    [A, d] in the weights' dtype, zero for slot 0 and for slots no token uses.
    """
    activations = _names(activation_ids)
    n_slots, rank, hidden_size = down_weights.shape
    dtype = out.dtype
    accumulate = z.dtype
    g = grad_out.reshape(-1, hidden_size)
    out_rows = out.reshape(-1, hidden_size)
    z_rows = z.reshape(-1, rank)
    row_scales = scales.reshape(-1).to(accumulate)
    grad_h = g.clone(memory_format=torch.contiguous_format)
    grad_down = torch.zeros_like(down_weights, memory_format=torch.contiguous_format)
    grad_up = torch.zeros_like(up_weights, memory_format=torch.contiguous_format)
    grad_down_bias = down_weights.new_zeros((n_slots, rank))
    grad_up_bias = down_weights.new_zeros((n_slots, hidden_size))
    for slot, rows in slot_rows(adapter_index, n_slots):
        down, up, activation = down_weights[slot], up_weights[slot], activations[slot]
        g_a = g.index_select(0, rows)
        z_a = z_rows.index_select(0, rows)
        s = row_scales.index_select(0, rows)[:, None]
        grad_z = s * activation_derivative(z_a, activation) * (g_a @ up).to(accumulate)
        grad_z_lowp = grad_z.to(dtype)
        grad_h.index_copy_(0, rows, torch.addmm(g_a, grad_z_lowp, down))
        phi = activate(z_a, activation)
        # h is rebuilt from the output instead of having been saved by the forward.
        delta = F.linear(phi.to(dtype), up, _bias(up_biases, slot)).to(accumulate)
        h_a = (out_rows.index_select(0, rows).to(accumulate) - s * delta).to(dtype)
        grad_down[slot] = grad_z_lowp.T @ h_a
        grad_up[slot] = g_a.T @ (s * phi).to(dtype)
        grad_down_bias[slot] = grad_z.sum(0).to(dtype)
        grad_up_bias[slot] = (s.T @ g_a.to(accumulate)).reshape(-1).to(dtype)
    return grad_h.reshape(out.shape), grad_down, grad_up, grad_down_bias, grad_up_bias
