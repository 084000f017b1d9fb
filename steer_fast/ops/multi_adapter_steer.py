"""multi_adapter_steer: many steering adapters in one batch, registered with torch.library.

Every token row picks one of A stacked adapters (slot 0 = no steering) and has its own strength:

    h_n   = hidden_n if residual is None else residual_n + hidden_n
    out_n = h_n                                              if a_n = index_n = 0 (bit-exact)
    out_n = h_n + s_n (U_a phi_a(D_a h_n + bd_a) + bu_a)     otherwise

Two custom ops carry the work, so that torch.compile(fullgraph=True) traces through them without
a graph break and autograd sees one node per steered site:

    steer_fast::multi_adapter_steer_forward(hidden, down_weights, up_weights, down_biases?,
        up_biases?, residual?, adapter_index, scales, activation_ids, backend, path) -> (out, z)
    steer_fast::multi_adapter_steer_backward(grad_out, out, z, down_weights, up_weights,
        up_biases?, adapter_index, scales, activation_ids, backend) -> (grad_h,
        grad_down_weights, grad_up_weights, grad_down_biases, grad_up_biases)

``adapter_index`` [N] and ``scales`` [N] (fp32) are ordinary tensor arguments, never Python
values or constexprs: a captured CUDA graph or a compiled graph stays valid when the routing or
the strengths change between calls. ``activation_ids`` are indices into ``ACTIVATIONS`` (the
schema has no list-of-str type). ``backend`` inside the ops is already resolved to "triton" or
"torch"; ``path`` ("auto", "gather", "grouped") is resolved from shapes alone by the Triton
launcher (``steer_fast.kernels.multi_adapter_steer``) or the torch path
(``multi_adapter_steer_torch``), each with its own switch point.

Saved for the backward: ``out``, z [N, R] (fp32, fp64 for fp64), the index and the scales, and
the weights; nothing else of size N x d. The gradient of ``hidden`` and of ``residual`` is the
same tensor dh; slot 0 and unused slots get zero weight gradients, and scales are never
differentiated. The maths of every gradient is in ``multi_adapter_steer_torch``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import multi_adapter_steer_torch
from .backend import check_backend, checked_backend, kernel_module, needs_registered_op
from .checks import check_activations, check_index_values, check_multi_inputs, check_path
from .phi import activation_id
from .post_block_steer_torch import z_dtype


def _forward_impl(
    hidden: torch.Tensor,
    down_weights: torch.Tensor,
    up_weights: torch.Tensor,
    down_biases: torch.Tensor | None,
    up_biases: torch.Tensor | None,
    residual: torch.Tensor | None,
    adapter_index: torch.Tensor,
    scales: torch.Tensor,
    activation_ids: Sequence[int],
    backend: str,
    path: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, z) from the resolved backend: the body of the forward custom op."""
    tensors = (hidden, down_weights, up_weights, down_biases, up_biases, residual)
    if backend == "triton":
        out, z = kernel_module("multi_adapter_steer").multi_adapter_steer_forward(
            *tensors, adapter_index, scales, activation_ids, path=path
        )
    else:
        out, z = multi_adapter_steer_torch.forward(
            *tensors, adapter_index, scales, activation_ids, path=path
        )
    return out, z


_forward_op = torch.library.custom_op(
    "steer_fast::multi_adapter_steer_forward", _forward_impl, mutates_args=()
)


@_forward_op.register_fake
def _forward_fake(
    hidden,
    down_weights,
    up_weights,
    down_biases,
    up_biases,
    residual,
    adapter_index,
    scales,
    activation_ids,
    backend,
    path,
):
    out = hidden.new_empty(hidden.shape)
    z = hidden.new_empty((*hidden.shape[:-1], down_weights.shape[1]), dtype=z_dtype(hidden.dtype))
    return out, z


@torch.library.custom_op("steer_fast::multi_adapter_steer_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    z: torch.Tensor,
    down_weights: torch.Tensor,
    up_weights: torch.Tensor,
    up_biases: torch.Tensor | None,
    adapter_index: torch.Tensor,
    scales: torch.Tensor,
    activation_ids: Sequence[int],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    backward = (
        kernel_module("multi_adapter_steer").multi_adapter_steer_backward
        if backend == "triton"
        else multi_adapter_steer_torch.backward
    )
    return tuple(
        backward(
            grad_out,
            out,
            z,
            down_weights,
            up_weights,
            up_biases,
            adapter_index,
            scales,
            activation_ids,
        )
    )


@_backward_op.register_fake
def _backward_fake(
    grad_out,
    out,
    z,
    down_weights,
    up_weights,
    up_biases,
    adapter_index,
    scales,
    activation_ids,
    backend,
):
    n_slots, rank, hidden_size = down_weights.shape
    return (
        out.new_empty(out.shape),
        down_weights.new_empty((n_slots, rank, hidden_size)),
        down_weights.new_empty((n_slots, hidden_size, rank)),
        down_weights.new_empty((n_slots, rank)),
        down_weights.new_empty((n_slots, hidden_size)),
    )


def _setup_context(ctx, inputs, output):
    (
        _,
        down_weights,
        up_weights,
        down_biases,
        up_biases,
        residual,
        adapter_index,
        scales,
        activation_ids,
        backend,
        _,
    ) = inputs
    out, z = output
    ctx.save_for_backward(out, z, down_weights, up_weights, up_biases, adapter_index, scales)
    ctx.activation_ids = activation_ids
    ctx.backend = backend
    ctx.has_residual = residual is not None
    ctx.has_down_biases = down_biases is not None
    ctx.has_up_biases = up_biases is not None
    ctx.mark_non_differentiable(z)


def _backward(ctx, grad_out, grad_z):
    out, z, down_weights, up_weights, up_biases, adapter_index, scales = ctx.saved_tensors
    grad_h, grad_down, grad_up, grad_down_biases, grad_up_biases = _backward_op(
        grad_out,
        out,
        z,
        down_weights,
        up_weights,
        up_biases,
        adapter_index,
        scales,
        ctx.activation_ids,
        ctx.backend,
    )
    return (
        grad_h,
        grad_down,
        grad_up,
        grad_down_biases if ctx.has_down_biases else None,
        grad_up_biases if ctx.has_up_biases else None,
        grad_h if ctx.has_residual else None,
        None,  # adapter_index
        None,  # scales: never differentiated
        None,  # activation_ids
        None,  # backend
        None,  # path
    )


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def multi_adapter_steer(
    hidden: torch.Tensor,
    down_weights: torch.Tensor,
    up_weights: torch.Tensor,
    down_biases: torch.Tensor | None = None,
    up_biases: torch.Tensor | None = None,
    *,
    adapter_index: torch.Tensor,
    scales: torch.Tensor,
    activations: str | Sequence[str],
    residual: torch.Tensor | None = None,
    backend: str = "auto",
    path: str = "auto",
    check_index: bool = True,
) -> torch.Tensor:
    """Steer every token with its own adapter and strength, fused with the residual add.

        h_n   = hidden_n if residual is None else residual_n + hidden_n
        out_n = h_n                                                   (a = index_n = 0)
        out_n = h_n + s_n (phi_a(h_n D_a^T + bd_a) U_a^T + bu_a)      (a >= 1)

    Args:
        hidden: [N, d] or [B, T, d], any strides. fp32, bf16, fp16 (fp64 on the torch path).
        down_weights: [A, R, d], the ``nn.Linear(d, r)`` weights of A >= 1 slots, zero-padded
            to the largest rank R. Slot 0 is "no steering": its weights are never read.
        up_weights: [A, d, R], the ``nn.Linear(r, d)`` weights, zero-padded.
        down_biases: [A, R] or None. up_biases: [A, d] or None (a rank-0 steering vector is
            a slot with zero D and U and bu = the vector).
        adapter_index: int32 or int64, shape hidden.shape[:-1]: the slot of every token.
        scales: floating, shape hidden.shape[:-1]: the strength s of every token, read as
            fp32. Not differentiable (a scales tensor that requires grad is refused).
        activations: phi of every slot (A names), or one name for all; slot 0's is ignored.
        residual: the block's skip-connection input, shaped like ``hidden``, or None.
        backend: "auto", "triton" or "torch", resolved as ``steer_fast.resolve_backend``.
        path: "auto", "gather" (each row loads its own adapter: decode, many adapters) or
            "grouped" (tokens grouped by slot, each slot's weights applied to all its rows at
            once: prefill). "auto" picks from shapes alone, per backend. See
            ``steer_fast.kernels.multi_adapter_steer`` and ``multi_adapter_steer_torch``.
        check_index: check that every index lies in [0, A). That reads two scalars back to
            the host (a device sync); a caller that built the index itself may pass False.
            Under torch.compile the check is a device-side assert instead (RuntimeError), since
            a host sync would break the graph. An out-of-range index with the check off is
            undefined behaviour (the Triton paths and the torch gather path leave such rows
            unsteered).

    Returns:
        out, shaped like ``hidden`` (contiguous), in its dtype. Differentiable in hidden,
        residual, the weights and the biases; slot-0 rows are bit-identical to h.

    Raises:
        ValueError: before any kernel launches, for mismatched shapes, dtypes or devices, a
            non-integer index or non-floating scales, scales that require grad, an index out of
            range (when checked), unknown activations or the wrong number of them, an unknown
            backend or path, or a backend that cannot run here.
    """
    check_backend(backend)
    check_path(path)
    n_slots, _ = check_multi_inputs(
        hidden,
        down_weights,
        up_weights,
        down_biases,
        up_biases,
        residual,
        adapter_index,
        scales,
    )
    names = check_activations(activations, n_slots)
    backend = checked_backend(hidden, backend)
    index = adapter_index.reshape(-1).contiguous()
    if check_index:
        if torch.compiler.is_compiling():
            torch._assert_async(
                ((index >= 0) & (index < n_slots)).all(),
                f"adapter_index values must lie in [0, {n_slots})",
            )
        else:
            check_index_values(index, n_slots)
    arguments = (
        hidden,
        down_weights,
        up_weights,
        down_biases,
        up_biases,
        residual,
        index,
        scales.reshape(-1).to(torch.float32).contiguous(),
        [activation_id(name) for name in names],
        backend,
        path,
    )
    if needs_registered_op(arguments):
        out, _ = _forward_op(*arguments)
    else:
        # Nothing to differentiate and nothing tracing: skip the registered op's dispatch cost.
        out, _ = _forward_impl(*arguments)
    return out
