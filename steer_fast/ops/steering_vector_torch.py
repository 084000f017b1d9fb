"""The plain PyTorch path of steering_vector: the same maths as the kernels.

It runs where Triton does not (CPU tensors, fp64): h is rounded to the storage dtype (as the
unfused block stores it), out = h + s b is formed in fp32 (fp64 for fp64) and rounded once, and
grad_bias is an fp32 sum (fp64 for fp64) cast to the tensors' dtype, as in
``steer_fast.kernels.steering_vector``.
"""

from __future__ import annotations

import torch


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(
    hidden: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """out = h + s b, h = residual + hidden rounded to the dtype; out contiguous.

    s b is formed once as a [d] vector in fp32 (fp64 for fp64), and the add runs in that dtype
    and rounds once into ``out``, as the kernel does. (``torch.add(h, b, alpha=s)`` would round
    s to bf16 or fp16 first.)
    """
    h = hidden if residual is None else residual + hidden
    delta = bias.to(_accumulate_dtype(bias.dtype)) * scale
    out = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    return torch.add(h, delta, out=out)


def backward(grad_out: torch.Tensor, scale: float) -> torch.Tensor:
    """grad_bias = s sum_rows(grad_out): fp32 sums (fp64 for fp64), cast to grad_out's dtype."""
    rows = tuple(range(grad_out.dim() - 1))
    total = grad_out.sum(dim=rows, dtype=_accumulate_dtype(grad_out.dtype))
    return (total * scale).to(grad_out.dtype)
