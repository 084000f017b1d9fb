"""Argument checks of the ops (post_block_steer, steering_vector, multi_adapter_steer), run
before any kernel launches.

Every failure is a ValueError that names the argument and says what was expected. The single-
adapter ops take [r, d] / [d, r] / [r] / [d] weights; multi_adapter_steer stacks them over A
slots ([A, R, d] / [A, d, R] / [A, R] / [A, d]) and adds a per-token ``adapter_index`` and
``scales`` and one activation per slot.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .backend import TORCH_DTYPES
from .phi import ACTIVATIONS

INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)
PATHS: tuple[str, ...] = ("auto", "gather", "grouped")


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


def check_tensor(name: str, value: object, ndim: int | tuple[int, ...]) -> torch.Tensor:
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
    check_tensor("hidden", hidden, (2, 3))
    check_tensor("down_weight", down_weight, 2)
    check_tensor("up_weight", up_weight, 2)
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
        check_tensor("down_bias", down_bias, 1)
        if tuple(down_bias.shape) != (rank,):
            raise ValueError(f"down_bias must be [{rank}], got {tuple(down_bias.shape)}")
        tensors["down_bias"] = down_bias
    if up_bias is not None:
        check_tensor("up_bias", up_bias, 1)
        if tuple(up_bias.shape) != (hidden_size,):
            raise ValueError(f"up_bias must be [{hidden_size}], got {tuple(up_bias.shape)}")
        tensors["up_bias"] = up_bias
    check_residual_and_agreement(hidden, residual, tensors)


def check_residual_and_agreement(
    hidden: torch.Tensor, residual: torch.Tensor | None, tensors: dict[str, torch.Tensor]
) -> None:
    """residual shaped like hidden; every tensor (``tensors`` and residual) in hidden's dtype
    and on its device."""
    if residual is not None:
        check_tensor("residual", residual, (2, 3))
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


def check_vector_inputs(
    hidden: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None
) -> None:
    """Shapes, dtypes and devices of steering_vector's tensors.

    hidden [..., d] (2-D or 3-D, d >= 1); bias [d]; residual hidden.shape or None. One dtype and
    one device for all of them.
    """
    check_tensor("hidden", hidden, (2, 3))
    check_tensor("bias", bias, 1)
    hidden_size = hidden.shape[-1]
    if hidden_size < 1:
        raise ValueError(f"hidden must have a last dimension >= 1, got shape {tuple(hidden.shape)}")
    if tuple(bias.shape) != (hidden_size,):
        raise ValueError(
            f"bias must be [{hidden_size}] to match hidden's last dimension, "
            f"got {tuple(bias.shape)}"
        )
    tensors = {"bias": bias}
    check_residual_and_agreement(hidden, residual, tensors)


# ---------------------------------------------------------------------------------------------
# multi_adapter_steer
# ---------------------------------------------------------------------------------------------


def check_path(path: object) -> str:
    if not isinstance(path, str) or path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return path


def check_activations(activations: object, n_slots: int) -> tuple[str, ...]:
    """One activation name per slot: a single name is repeated ``n_slots`` times.

    Slot 0 (no steering) must still be given a valid name in a sequence; it is ignored.
    """
    if isinstance(activations, str):
        return (check_activation(activations, "activations"),) * n_slots
    if not isinstance(activations, Sequence):
        raise ValueError(
            f"activations must be a name or a sequence of {n_slots} names (one per slot), "
            f"got {type(activations).__name__}"
        )
    names = tuple(activations)
    if len(names) != n_slots:
        raise ValueError(
            f"activations must name one activation per slot: {n_slots} names for "
            f"down_weights of shape [{n_slots}, R, d], got {len(names)}"
        )
    for slot, name in enumerate(names):
        check_activation(name, f"activations[{slot}]")
    return names


def check_multi_inputs(
    hidden: torch.Tensor,
    down_weights: torch.Tensor,
    up_weights: torch.Tensor,
    down_biases: torch.Tensor | None,
    up_biases: torch.Tensor | None,
    residual: torch.Tensor | None,
    adapter_index: torch.Tensor,
    scales: torch.Tensor,
) -> tuple[int, int]:
    """Shapes, dtypes and devices of the op's tensors; returns (A, R).

    hidden [..., d] (2-D or 3-D, d >= 1); down_weights [A, R, d]; up_weights [A, d, R];
    down_biases [A, R]; up_biases [A, d]; residual hidden.shape; A >= 1, R >= 1. The floating
    tensors share hidden's dtype and device. adapter_index: int32/int64, hidden.shape[:-1].
    scales: floating, hidden.shape[:-1], not requiring grad. Index values are not checked here
    (that needs a host sync): see ``check_index_values``.
    """
    check_tensor("hidden", hidden, (2, 3))
    check_tensor("down_weights", down_weights, 3)
    check_tensor("up_weights", up_weights, 3)
    hidden_size = hidden.shape[-1]
    n_slots, rank = down_weights.shape[0], down_weights.shape[1]
    if hidden_size < 1:
        raise ValueError(f"hidden must have a last dimension >= 1, got shape {tuple(hidden.shape)}")
    if n_slots < 1 or rank < 1:
        raise ValueError(
            f"down_weights must be [A, R, d] with A >= 1 slots and R >= 1, "
            f"got {tuple(down_weights.shape)}"
        )
    if down_weights.shape[2] != hidden_size:
        raise ValueError(
            f"down_weights must be [A, R, {hidden_size}] to match hidden's last dimension, "
            f"got {tuple(down_weights.shape)}"
        )
    if tuple(up_weights.shape) != (n_slots, hidden_size, rank):
        raise ValueError(
            f"up_weights must be [{n_slots}, {hidden_size}, {rank}] (slots, hidden size, rank "
            f"of down_weights), got {tuple(up_weights.shape)}"
        )
    tensors = {"hidden": hidden, "down_weights": down_weights, "up_weights": up_weights}
    for name, bias, shape in [
        ("down_biases", down_biases, (n_slots, rank)),
        ("up_biases", up_biases, (n_slots, hidden_size)),
    ]:
        if bias is not None:
            check_tensor(name, bias, 2)
            if tuple(bias.shape) != shape:
                raise ValueError(f"{name} must be {list(shape)}, got {tuple(bias.shape)}")
            tensors[name] = bias
    check_residual_and_agreement(hidden, residual, tensors)
    _check_per_token(hidden, adapter_index, scales)
    return n_slots, rank


def _check_per_token(
    hidden: torch.Tensor, adapter_index: torch.Tensor, scales: torch.Tensor
) -> None:
    tokens = tuple(hidden.shape[:-1])
    for name, value in [("adapter_index", adapter_index), ("scales", scales)]:
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if tuple(value.shape) != tokens:
            raise ValueError(
                f"{name} must have shape {list(tokens)} (hidden.shape[:-1], one entry per "
                f"token), got {tuple(value.shape)}"
            )
        if value.device != hidden.device:
            raise ValueError(
                f"{name} is on {value.device} but hidden is on {hidden.device}: "
                "all tensors must be on one device"
            )
    if adapter_index.dtype not in INDEX_DTYPES:
        raise ValueError(
            f"adapter_index must have an integer dtype in {[str(d) for d in INDEX_DTYPES]}, "
            f"got {adapter_index.dtype}"
        )
    if not scales.dtype.is_floating_point:
        raise ValueError(f"scales must have a floating dtype, got {scales.dtype}")
    if scales.requires_grad:
        raise ValueError(
            "scales requires grad, but scales are not differentiated: pass scales.detach()"
        )


def check_index_values(adapter_index: torch.Tensor, n_slots: int) -> None:
    """Every slot in [0, n_slots). Reads two scalars back to the host (a device sync)."""
    if adapter_index.numel() == 0:
        return
    low, high = int(adapter_index.min()), int(adapter_index.max())
    if low < 0 or high >= n_slots:
        raise ValueError(
            f"adapter_index values must lie in [0, {n_slots}) (slot 0 = no steering, "
            f"{n_slots} slots in down_weights), got values in [{low}, {high}]"
        )
