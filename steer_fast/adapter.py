"""PostBlockAdapter: the nn.Module form of post_block_steer."""

from __future__ import annotations

import math

import torch
from torch import nn

from .ops import post_block_steer
from .validation import check_activation, check_backend, check_scale


class PostBlockAdapter(nn.Module):
    """A low-rank bottleneck added to a decoder block's output.

        out = h + scale * (up(phi(down(h))))      h = residual + hidden, or hidden

    ``down = nn.Linear(hidden_size, rank, bias)`` is initialised like a LoRA A matrix (Kaiming
    uniform, zero bias); ``up = nn.Linear(rank, hidden_size, bias)`` starts at zero, weight and
    bias, so a new adapter returns h exactly. Trainable parameters: rank * (2 * hidden_size + 1)
    + hidden_size with biases, 2 * rank * hidden_size without.

    Args:
        hidden_size: d, the width of the residual stream.
        rank: r >= 1, the bottleneck width.
        activation: phi (see ``steer_fast.ACTIVATIONS``).
        bias: whether ``down`` and ``up`` carry biases.
        scale: steering strength; mutable through ``.scale``.
        backend: passed to post_block_steer ("auto", "triton" or "torch").
    """

    def __init__(
        self,
        hidden_size: int,
        rank: int,
        activation: str = "identity",
        bias: bool = True,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.hidden_size = hidden_size
        self.rank = rank
        self.activation = check_activation(activation)
        self.scale = check_scale(scale)
        self.backend = check_backend(backend)
        self.down = nn.Linear(hidden_size, rank, bias=bias, device=device, dtype=dtype)
        self.up = nn.Linear(rank, hidden_size, bias=bias, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Down like LoRA's A (Kaiming uniform, a = sqrt(5)), up and both biases zero."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        for linear in (self.down, self.up):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """hidden, residual: [N, d] or [B, T, d]. Returns the steered h, shaped like hidden."""
        return post_block_steer(
            hidden,
            self.down.weight,
            self.up.weight,
            self.down.bias,
            self.up.bias,
            activation=self.activation,
            scale=self.scale,
            residual=residual,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, rank={self.rank}, activation={self.activation!r}, "
            f"scale={self.scale}, backend={self.backend!r}"
        )
