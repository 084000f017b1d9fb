"""The bottleneck nonlinearities phi and their derivatives, in PyTorch.

Every supported phi has phi(0) = 0, which the kernels rely on: rank lanes padded with zeros
stay zero through the activation. The Triton versions live in ``steer_fast.kernels.activations``,
which knows phi by integer id only: the index into ``ACTIVATIONS`` (``activation_id``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS: tuple[str, ...] = ("identity", "relu", "silu", "gelu", "gelu_tanh", "tanh")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_COEF = 0.044715


def activation_id(name: str) -> int:
    """Index of ``name`` in ``ACTIVATIONS`` (the id the kernels take as a constexpr)."""
    return ACTIVATIONS.index(name)


def activate(z: torch.Tensor, name: str) -> torch.Tensor:
    """phi(z), elementwise, in the dtype of ``z``."""
    if name == "identity":
        return z
    if name == "relu":
        return torch.relu(z)
    if name == "silu":
        return F.silu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "tanh":
        return torch.tanh(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_derivative(z: torch.Tensor, name: str) -> torch.Tensor:
    """phi'(z), elementwise, in the dtype of ``z``.

    Closed forms (the same ones the backward kernel evaluates):
      relu: 1[z > 0];  silu: sig(z) (1 + z (1 - sig(z)));  tanh: 1 - tanh(z)^2;
      gelu: Phi(z) + z phi_N(z) with Phi, phi_N the standard normal cdf and pdf;
      gelu_tanh: with t = tanh(k0 (z + k1 z^3)),
                 0.5 (1 + t) + 0.5 z (1 - t^2) k0 (1 + 3 k1 z^2).
    """
    if name == "identity":
        return torch.ones_like(z)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "silu":
        sig = torch.sigmoid(z)
        return sig * (1 + z * (1 - sig))
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2.0))))
        return cdf + z * _INV_SQRT_2PI * torch.exp(-0.5 * z * z)
    if name == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_COEF * z**3))
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _SQRT_2_OVER_PI * (
            1 + 3 * _GELU_TANH_COEF * z * z
        )
    if name == "tanh":
        t = torch.tanh(z)
        return 1 - t * t
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
