"""steering_vector: a trained vector added to every token, registered with torch.library.

    h   = hidden if residual is None else residual + hidden
    out = h + scale * bias

The rank-0 case of post_block_steer (the fixed-vector ablation, and classic activation steering).
Two custom ops carry the work, so that torch.compile(fullgraph=True) traces through them without
a graph break and autograd sees one node per steered block:

    steer_fast::steering_vector_forward(hidden, bias, residual?, scale, backend) -> out
    steer_fast::steering_vector_backward(grad_out, scale, backend) -> grad_bias

``backend`` inside the ops is already resolved to "triton" (``steer_fast.kernels.steering_vector``)
or "torch" (``steering_vector_torch``). The autograd formula saves no tensor: the gradient of
``hidden`` and of ``residual`` is grad_out itself (no kernel, no copy), and grad_bias = scale *
grad_out summed over tokens needs only grad_out. The backward op runs only when ``bias`` requires
a gradient.

Both backends compute the same maths: h is rounded to the storage dtype (as the unfused block
stores it), out = h + s b is formed in fp32 and rounded once, and grad_bias is an fp32 sum
(fp64 for fp64 inputs) cast to the tensors' dtype. The Triton kernels and their traffic are
specified in ``steer_fast.kernels.steering_vector``.
"""

import torch

from . import steering_vector_torch
from .backend import check_backend, checked_backend, kernel_module, needs_registered_op
from .checks import check_scale, check_vector_inputs


def _forward_impl(
    hidden: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """``out`` from the resolved backend: the body of the forward custom op."""
    forward = (
        kernel_module("steering_vector").steering_vector_forward
        if backend == "triton"
        else steering_vector_torch.forward
    )
    return forward(hidden=hidden, bias=bias, residual=residual, scale=scale)


_forward_op = torch.library.custom_op(
    "steer_fast::steering_vector_forward", _forward_impl, mutates_args=()
)


@_forward_op.register_fake
def _forward_fake(hidden, bias, residual, scale, backend):
    return hidden.new_empty(hidden.shape)


@torch.library.custom_op("steer_fast::steering_vector_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    backward = (
        kernel_module("steering_vector").steering_vector_backward
        if backend == "triton"
        else steering_vector_torch.backward
    )
    return backward(grad_out=grad_out, scale=scale)


@_backward_op.register_fake
def _backward_fake(grad_out, scale, backend):
    return grad_out.new_empty((grad_out.shape[-1],))


def _setup_context(ctx, inputs, output):
    # Nothing is saved: neither gradient needs a forward tensor.
    _, _, residual, scale, backend = inputs
    ctx.scale = scale
    ctx.backend = backend
    ctx.has_residual = residual is not None


def _backward(ctx, grad_out):
    grad_bias = None
    if ctx.needs_input_grad[1]:
        grad_bias = _backward_op(grad_out, ctx.scale, ctx.backend)
    return (
        grad_out,  # hidden
        grad_bias,
        grad_out if ctx.has_residual else None,
        None,  # scale
        None,  # backend
    )


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def steering_vector(
    hidden: torch.Tensor,
    bias: torch.Tensor,
    *,
    scale: float = 1.0,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Add a steering vector to every token, fused with the block's residual add.

        h   = hidden if residual is None else residual + hidden
        out = h + scale * bias

    Gradients: d hidden = d residual = grad_out; d bias = scale * grad_out summed over every
    token (all leading dimensions). Autograd saves no tensor for this op.

    Args:
        hidden: [N, d] or [B, T, d], any strides. fp32, bf16, fp16 (fp64 on the torch path).
        bias: the steering vector b, [d], any stride; hidden's dtype and device.
        scale: the steering strength s (any finite real, negative and zero included).
        residual: the block's skip-connection input, shaped like ``hidden``, or None.
        backend: "auto", "triton" or "torch"; see ``steer_fast.resolve_backend``.

    Returns:
        out, shaped like ``hidden`` (contiguous), in its dtype. Differentiable in ``hidden``,
        ``bias`` and ``residual``; sums and products are fp32 on both paths (fp64 for fp64).

    Raises:
        ValueError: before any kernel launches, for mismatched shapes, dtypes or devices, integer
            dtypes, a non-finite scale, an unknown backend, or a backend that cannot run here.
    """
    scale = check_scale(scale)
    check_backend(backend)
    check_vector_inputs(hidden, bias, residual)
    backend = checked_backend(hidden, backend)
    arguments = (hidden, bias, residual, scale, backend)
    if needs_registered_op(arguments):
        return _forward_op(*arguments)
    # Nothing to differentiate and nothing tracing: the registered op would only add its
    # dispatch cost (tens of microseconds a call, paid per layer per decoded token).
    return _forward_impl(*arguments)
