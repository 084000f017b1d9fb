"""The plain PyTorch path of post_block_steer: the same maths and saved tensors as the kernels.

It runs where Triton does not (CPU tensors, fp64) and is the baseline the kernels are checked
against. Like the kernels it saves only ``out`` and z and rebuilds h in the backward, so switching
backend changes speed, never what autograd keeps. Matrix products run in the input dtype (as an
unfused model would run them); z, phi'(z) and gz are fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .phi import activate, activation_derivative


def z_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the saved pre-activation z for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(
    hidden: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, z): out = h + s (phi(h D^T + b_d) U^T + b_u), z = h D^T + b_d in fp32/fp64."""
    h = hidden if residual is None else residual + hidden
    z = F.linear(h, down_weight, down_bias).to(z_dtype(h.dtype))
    delta = F.linear(activate(z, activation).to(h.dtype), up_weight, up_bias)
    out = torch.add(h, delta, alpha=scale).contiguous()
    return out, z


def backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    z: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    activation: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_h, grad_down_weight, grad_up_weight, grad_down_bias, grad_up_bias): the formulas
    of ``steer_fast.kernels.post_block_steer``."""
    rank, hidden_size = down_weight.shape
    dtype = out.dtype
    g = grad_out.reshape(-1, hidden_size)
    z = z.reshape(-1, rank)
    grad_z = scale * activation_derivative(z, activation) * (g @ up_weight).to(z.dtype)
    grad_z_lowp = grad_z.to(dtype)
    grad_h = torch.addmm(g, grad_z_lowp, down_weight)
    a = activate(z, activation).to(dtype)
    # h is rebuilt from the output instead of having been saved by the forward.
    h = torch.add(out.reshape(-1, hidden_size), F.linear(a, up_weight, up_bias), alpha=-scale)
    grad_down_weight = grad_z_lowp.T @ h
    grad_up_weight = (g.T @ a) * scale
    grad_down_bias = grad_z.sum(0).to(dtype)
    grad_up_bias = g.sum(0) * scale
    return grad_h.reshape(out.shape), grad_down_weight, grad_up_weight, grad_down_bias, grad_up_bias
