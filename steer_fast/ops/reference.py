"""The unfused eager references of post_block_steer and steering_vector, in plain PyTorch.

Tests compare every backend with them (in fp64), and the benchmarks time them as the unfused
baselines (in the model's dtype). They keep h and the intermediate activations for the backward,
as an unfused implementation would (steering_vector's reference keeps nothing: neither does
autograd for an add).
"""

from __future__ import annotations

import torch

from .phi import activate


def reference_post_block_steer(
    hidden: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    *,
    activation: str = "identity",
    scale: float = 1.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """h + scale * (phi(h D^T + b_d) U^T + b_u), h = residual + hidden: one eager op per step."""
    h = hidden if residual is None else residual + hidden
    z = h @ down_weight.T
    if down_bias is not None:
        z = z + down_bias
    delta = activate(z, activation) @ up_weight.T
    if up_bias is not None:
        delta = delta + up_bias
    return h + scale * delta


def reference_steering_vector(
    hidden: torch.Tensor,
    bias: torch.Tensor,
    *,
    scale: float = 1.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """h + scale * bias, h = residual + hidden, with bias [d] broadcast over every token."""
    h = hidden if residual is None else residual + hidden
    return h + scale * bias
