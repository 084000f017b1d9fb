"""post_block_steer: the differentiable op, registered with torch.library.

Two custom ops carry the work, so that torch.compile(fullgraph=True) traces through them without
a graph break and autograd sees one node per steered block:

    steer_fast::post_block_steer_forward(hidden, down_weight, up_weight, down_bias?, up_bias?,
        residual?, activation, scale, backend) -> (out, z)
    steer_fast::post_block_steer_backward(grad_out, out, z, down_weight, up_weight, up_bias?,
        activation, scale, backend) -> (grad_h, grad_down_weight, grad_up_weight,
        grad_down_bias, grad_up_bias)

``backend`` inside the ops is already resolved to "triton" (``steer_fast.kernels.post_block_steer``,
which takes phi by id) or "torch" (``post_block_steer_torch``). The autograd formula
saves ``out`` and z (N x r) and nothing of size N x d beyond ``out``; the gradient of ``hidden``
and of ``residual`` is the same tensor dh.

Tensors keep one order from ``post_block_steer`` through both ops and both backends down to the
kernels' parameters: hidden, down_weight, up_weight, down_bias, up_bias, residual forward, and
grad_out, out, z, down_weight, up_weight, up_bias backward (gradients come back in the forward
order, grad_h standing for hidden and residual).
"""

import torch

from . import post_block_steer_torch
from .backend import check_backend, checked_backend, kernel_module, needs_registered_op
from .checks import check_activation, check_inputs, check_scale
from .phi import activation_id


def _forward_impl(
    hidden: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, z) from the resolved backend: the body of the forward custom op."""
    if backend == "triton":
        forward = kernel_module("post_block_steer").post_block_steer_forward
        activation = activation_id(activation)
    else:
        forward = post_block_steer_torch.forward
    out, z = forward(
        hidden=hidden,
        down_weight=down_weight,
        up_weight=up_weight,
        down_bias=down_bias,
        up_bias=up_bias,
        residual=residual,
        activation=activation,
        scale=scale,
    )
    return out, z


_forward_op = torch.library.custom_op(
    "steer_fast::post_block_steer_forward", _forward_impl, mutates_args=()
)


@_forward_op.register_fake
def _forward_fake(
    hidden, down_weight, up_weight, down_bias, up_bias, residual, activation, scale, backend
):
    out = hidden.new_empty(hidden.shape)
    z = hidden.new_empty(
        (*hidden.shape[:-1], down_weight.shape[0]),
        dtype=post_block_steer_torch.z_dtype(hidden.dtype),
    )
    return out, z


@torch.library.custom_op("steer_fast::post_block_steer_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    z: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    activation: str,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        backward = kernel_module("post_block_steer").post_block_steer_backward
        activation = activation_id(activation)
    else:
        backward = post_block_steer_torch.backward
    return tuple(
        backward(
            grad_out=grad_out,
            out=out,
            z=z,
            down_weight=down_weight,
            up_weight=up_weight,
            up_bias=up_bias,
            activation=activation,
            scale=scale,
        )
    )


@_backward_op.register_fake
def _backward_fake(grad_out, out, z, down_weight, up_weight, up_bias, activation, scale, backend):
    rank, hidden_size = down_weight.shape
    return (
        out.new_empty(out.shape),
        down_weight.new_empty((rank, hidden_size)),
        down_weight.new_empty((hidden_size, rank)),
        down_weight.new_empty((rank,)),
        down_weight.new_empty((hidden_size,)),
    )


def _setup_context(ctx, inputs, output):
    _, down_weight, up_weight, down_bias, up_bias, residual, activation, scale, backend = inputs
    out, z = output
    ctx.save_for_backward(out, z, down_weight, up_weight, up_bias)
    ctx.activation = activation
    ctx.scale = scale
    ctx.backend = backend
    ctx.has_residual = residual is not None
    ctx.has_down_bias = down_bias is not None
    ctx.has_up_bias = up_bias is not None
    ctx.mark_non_differentiable(z)


def _backward(ctx, grad_out, grad_z):
    out, z, down_weight, up_weight, up_bias = ctx.saved_tensors
    grad_h, grad_down_weight, grad_up_weight, grad_down_bias, grad_up_bias = _backward_op(
        grad_out, out, z, down_weight, up_weight, up_bias, ctx.activation, ctx.scale, ctx.backend
    )
    return (
        grad_h,
        grad_down_weight,
        grad_up_weight,
        grad_down_bias if ctx.has_down_bias else None,
        grad_up_bias if ctx.has_up_bias else None,
        grad_h if ctx.has_residual else None,
        None,  # activation
        None,  # scale
        None,  # backend
    )


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def post_block_steer(
    hidden: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    *,
    activation: str = "identity",
    scale: float = 1.0,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Apply a post-block steering adapter, fused with the block's residual add.

        h   = hidden if residual is None else residual + hidden
        out = h + scale * (phi(h @ down_weight.T + down_bias) @ up_weight.T + up_bias)

    Args:
        hidden: [N, d] or [B, T, d], any strides. fp32, bf16, fp16 (fp64 on the torch path).
        down_weight: [r, d] (the ``nn.Linear(d, r)`` layout), r >= 1.
        up_weight: [d, r] (the ``nn.Linear(r, d)`` layout).
        down_bias: [r] or None. up_bias: [d] or None.
        activation: phi, one of "identity", "relu", "silu", "gelu", "gelu_tanh", "tanh".
        scale: the steering strength s (any finite real, negative included).
        residual: the block's skip-connection input, shaped like ``hidden``, or None.
        backend: "auto", "triton" or "torch"; see ``steer_fast.resolve_backend``.

    Returns:
        out, shaped like ``hidden`` (contiguous), in its dtype. Differentiable in every tensor
        argument; matrix products accumulate in fp32 on the Triton path.

    Raises:
        ValueError: before any kernel launches, for mismatched shapes, dtypes or devices, rank 0,
            integer dtypes, an unknown activation or backend, or a backend that cannot run here.
    """
    check_activation(activation)
    scale = check_scale(scale)
    check_backend(backend)
    check_inputs(hidden, down_weight, up_weight, down_bias, up_bias, residual)
    backend = checked_backend(hidden, backend)
    arguments = (
        hidden,
        down_weight,
        up_weight,
        down_bias,
        up_bias,
        residual,
        activation,
        scale,
        backend,
    )
    if needs_registered_op(arguments):
        out, _ = _forward_op(*arguments)
    else:
        # Nothing to differentiate and nothing tracing: the registered op would only add its
        # dispatch cost (tens of microseconds a call, paid per layer per decoded token).
        out, _ = _forward_impl(*arguments)
    return out
