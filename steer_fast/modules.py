"""The steering modules: PostBlockAdapter (rank >= 1) and SteeringVector (rank 0).

Both take a hidden state, and optionally the residual it is added to, and return

    PostBlockAdapter:  out = h + scale * (up(phi(down(h))))     h = residual + hidden, or hidden
    SteeringVector:    out = h + scale * vector

through the fused ops ``post_block_steer`` and ``steering_vector``. Both start as the identity.
``steer`` is the form a steered model uses: it first brings every tensor to the dtype the
unsteered block would return.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import INITS, SteerConfig
from .ops.backend import check_backend
from .ops.checks import check_activation, check_scale
from .ops.post_block_steer import post_block_steer
from .ops.steering_vector import steering_vector

# The published init scales the Kaiming-uniform down-projection by this factor.
PUBLISHED_DOWN_SCALE = 1e-3


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def block_dtype(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    """The dtype a block returns for ``residual + hidden``: the promoted dtype of the two (under
    torch.autocast the residual stream can be fp32 while a branch output is bf16)."""
    return hidden.dtype if residual is None else torch.promote_types(hidden.dtype, residual.dtype)


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # A no-op when the dtype matches; differentiable otherwise, so fp32 adapter weights in a
    # bf16 model train as fp32 master weights.
    return None if tensor is None else tensor.to(dtype)


class PostBlockAdapter(nn.Module):
    """A low-rank bottleneck added to a decoder block's output.

        out = h + scale * (up(phi(down(h))))      h = residual + hidden, or hidden

    ``down = nn.Linear(hidden_size, rank, bias)`` starts Kaiming-uniform (a = sqrt 5) scaled by
    1e-3 (``init="published"``, the paper's) or unscaled (``init="lora"``, like LoRA's A);
    ``up = nn.Linear(rank, hidden_size, bias)`` starts at zero, weight and bias, so a new adapter
    returns h exactly. Trainable parameters: 2 * rank * hidden_size without biases (the
    published form), rank * (2 * hidden_size + 1) + hidden_size with them.

    Args:
        hidden_size: d, the width of the residual stream.
        rank: r >= 1, the bottleneck width.
        activation: phi (see ``steer_fast.ACTIVATIONS``); the published default is "silu".
        bias: whether ``down`` and ``up`` carry biases.
        scale: steering strength; mutable through ``.scale``.
        init: "published" or "lora" (see above).
        backend: passed to post_block_steer ("auto", "triton" or "torch").
    """

    def __init__(
        self,
        hidden_size: int,
        rank: int,
        activation: str = "silu",
        bias: bool = False,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
        init: str = "published",
    ) -> None:
        super().__init__()
        self.hidden_size = _check_size("hidden_size", hidden_size)
        self.rank = _check_size("rank", rank)
        self.activation = check_activation(activation)
        self.scale = check_scale(scale)
        self.backend = check_backend(backend)
        if not isinstance(init, str) or init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.init = init
        self.down = nn.Linear(hidden_size, rank, bias=bias, device=device, dtype=dtype)
        self.up = nn.Linear(rank, hidden_size, bias=bias, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Down Kaiming-uniform (a = sqrt 5), times 1e-3 for ``init="published"``; up and both
        biases zero."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        if self.init == "published":
            with torch.no_grad():
                self.down.weight.mul_(PUBLISHED_DOWN_SCALE)
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

    def steer(self, hidden: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` in the dtype the unsteered block returns (hidden, residual and the
        weights cast to it)."""
        dtype = block_dtype(hidden, residual)
        down, up = self.down, self.up
        return post_block_steer(
            hidden.to(dtype),
            down.weight.to(dtype),
            up.weight.to(dtype),
            _cast(down.bias, dtype),
            _cast(up.bias, dtype),
            activation=self.activation,
            scale=self.scale,
            residual=_cast(residual, dtype),
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, rank={self.rank}, activation={self.activation!r}, "
            f"scale={self.scale}, backend={self.backend!r}"
        )


class SteeringVector(nn.Module):
    """One trainable vector added at every token: rank-0 steering.

        out = h + scale * vector      h = residual + hidden, or hidden

    ``vector`` [hidden_size] starts at zero, so a new one returns h exactly.

    Args:
        hidden_size: d, the width of the residual stream.
        scale: steering strength; mutable through ``.scale``.
        backend: passed to steering_vector ("auto", "triton" or "torch").
    """

    rank = 0
    activation = "identity"

    def __init__(
        self,
        hidden_size: int,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.hidden_size = _check_size("hidden_size", hidden_size)
        self.scale = check_scale(scale)
        self.backend = check_backend(backend)
        self.vector = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """The vector back to zero."""
        nn.init.zeros_(self.vector)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """hidden, residual: [N, d] or [B, T, d]. Returns h + scale * vector, shaped like
        hidden."""
        return steering_vector(
            hidden, self.vector, scale=self.scale, residual=residual, backend=self.backend
        )

    def steer(self, hidden: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` in the dtype the unsteered block returns."""
        dtype = block_dtype(hidden, residual)
        return steering_vector(
            hidden.to(dtype),
            self.vector.to(dtype),
            scale=self.scale,
            residual=_cast(residual, dtype),
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, scale={self.scale}, backend={self.backend!r}"


Steering = PostBlockAdapter | SteeringVector


def make_steering(config: SteerConfig, device: torch.device | None, dtype: torch.dtype) -> Steering:
    """A new steering module for one site of one layer, as ``config`` describes (hidden_size
    filled in)."""
    if config.rank == 0:
        return SteeringVector(
            config.hidden_size, config.scale, device=device, dtype=dtype, backend=config.backend
        )
    return PostBlockAdapter(
        config.hidden_size,
        config.rank,
        activation=config.activation,
        bias=config.bias,
        scale=config.scale,
        device=device,
        dtype=dtype,
        backend=config.backend,
        init=config.init,
    )
