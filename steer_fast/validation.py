"""Argument checks for post_block_steer and steering_vector, run before any kernel launches.

Every failure is a ValueError that names the argument and says what was expected.
"""

from __future__ import annotations

import math
import numbers

import torch

from .activations import ACTIVATIONS

BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
TORCH_DTYPES: tuple[torch.dtype, ...] = (*TRITON_DTYPES, torch.float64)


def check_activation(activation: object, name: str = "activation") -> str:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"{name} must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def check_scale(scale: object, name: str = "scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"{name} must be finite, got {scale!r}")
    return float(scale)


def check_backend(backend: object) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _check_tensor(name: str, value: object, ndim: int | tuple[int, ...]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if value.dim() not in allowed:
        want = " or ".join(f"{n}-D" for n in allowed)
        raise ValueError(f"{name} must be {want}, got shape {tuple(value.shape)}")
    if value.dtype not in TORCH_DTYPES:
        raise ValueError(
            f"{name} must have a floating dtype in {[str(d) for d in TORCH_DTYPES]}, "
            f"got {value.dtype}"
        )
    return value


def check_inputs(
    hidden: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> None:
    """Shapes, dtypes and devices of the op's tensors.

    hidden [..., d] (2-D or 3-D); down_weight [r, d]; up_weight [d, r]; down_bias [r];
    up_bias [d]; residual hidden.shape. One dtype and one device for all of them; r >= 1.
    """
    _check_tensor("hidden", hidden, (2, 3))
    _check_tensor("down_weight", down_weight, 2)
    _check_tensor("up_weight", up_weight, 2)
    hidden_size = hidden.shape[-1]
    rank = down_weight.shape[0]
    if hidden_size < 1:
        raise ValueError(f"hidden must have a last dimension >= 1, got shape {tuple(hidden.shape)}")
    if rank < 1:
        raise ValueError(
            f"down_weight must have rank >= 1 rows, got shape {tuple(down_weight.shape)}"
        )
    if down_weight.shape[1] != hidden_size:
        raise ValueError(
            f"down_weight must be [rank, {hidden_size}] to match hidden's last dimension, "
            f"got {tuple(down_weight.shape)}"
        )
    if tuple(up_weight.shape) != (hidden_size, rank):
        raise ValueError(
            f"up_weight must be [{hidden_size}, {rank}] (hidden size, rank of down_weight), "
            f"got {tuple(up_weight.shape)}"
        )
    tensors = {"hidden": hidden, "down_weight": down_weight, "up_weight": up_weight}
    if down_bias is not None:
        _check_tensor("down_bias", down_bias, 1)
        if tuple(down_bias.shape) != (rank,):
            raise ValueError(f"down_bias must be [{rank}], got {tuple(down_bias.shape)}")
        tensors["down_bias"] = down_bias
    if up_bias is not None:
        _check_tensor("up_bias", up_bias, 1)
        if tuple(up_bias.shape) != (hidden_size,):
            raise ValueError(f"up_bias must be [{hidden_size}], got {tuple(up_bias.shape)}")
        tensors["up_bias"] = up_bias
    _check_residual_and_agreement(hidden, residual, tensors)


def _check_residual_and_agreement(
    hidden: torch.Tensor, residual: torch.Tensor | None, tensors: dict[str, torch.Tensor]
) -> None:
    """residual shaped like hidden; every tensor (``tensors`` and residual) in hidden's dtype
    and on its device."""
    if residual is not None:
        _check_tensor("residual", residual, (2, 3))
        if residual.shape != hidden.shape:
            raise ValueError(
                f"residual must have hidden's shape {tuple(hidden.shape)}, "
                f"got {tuple(residual.shape)}"
            )
        tensors = {**tensors, "residual": residual}
    for name, tensor in tensors.items():
        if tensor.dtype != hidden.dtype:
            raise ValueError(
                f"{name} has dtype {tensor.dtype} but hidden has {hidden.dtype}: "
                "all tensors must share one dtype"
            )
        if tensor.device != hidden.device:
            raise ValueError(
                f"{name} is on {tensor.device} but hidden is on {hidden.device}: "
                "all tensors must be on one device"
            )


def check_learning_rate(name: str, value: object) -> float:
    """A learning rate: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return float(value)


def check_vector_inputs(
    hidden: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None
) -> None:
    """Shapes, dtypes and devices of steering_vector's tensors.

    hidden [..., d] (2-D or 3-D, d >= 1); bias [d]; residual hidden.shape or None. One dtype and
    one device for all of them.
    """
    _check_tensor("hidden", hidden, (2, 3))
    _check_tensor("bias", bias, 1)
    hidden_size = hidden.shape[-1]
    if hidden_size < 1:
        raise ValueError(f"hidden must have a last dimension >= 1, got shape {tuple(hidden.shape)}")
    if tuple(bias.shape) != (hidden_size,):
        raise ValueError(
            f"bias must be [{hidden_size}] to match hidden's last dimension, "
            f"got {tuple(bias.shape)}"
        )
    tensors = {"bias": bias}
    _check_residual_and_agreement(hidden, residual, tensors)
