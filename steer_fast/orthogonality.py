"""The orthogonality constraint between steering directions and LoRA weight updates.

In decoder layer l, the post-block adapter writes into the residual stream along the columns of
its up-projection U_l (d x r_s): its output is U_l a + b_u. A LoRA update of a module that
writes into the residual stream (the attention output projection, the MLP down projection)
adds B A x to that module's output, so it writes along the columns of its B (d x r_w). Let B_l
be those B matrices of layer l side by side (d x sum r_w). With columns normalised to unit
length (hat), the penalty is

    P = sum_l || hat(U_l)^T hat(B_l) ||_F^2 = sum_l sum_ij cos^2(angle(u_i, b_j))

zero exactly when every steering direction is orthogonal to everything the weight update of its
layer can write, and at most r_s * sum r_w per layer. Why: the two parts then move the residual
stream along different directions, so neither can spend its capacity re-learning what the
other already writes; the activation update is left with the directions the weight update does
not reach. Normalising makes P a sum of squared cosines: it constrains directions, not
magnitudes, so it cannot be lowered by shrinking either part. A column shorter than ``eps`` is
divided by ``eps`` instead of its norm, so the zero initialisations of both parts (LoRA's B and
the adapter's U) give P = 0 with finite gradients.

The hard form projects U_l's columns onto the orthogonal complement of span(B_l):
U_l <- U_l - Q Q^T U_l, with Q an orthonormal basis of span(B_l) (from an SVD, dropping
directions whose singular value is below ``rank_tolerance`` times the largest).

Which modules of a layer write into the residual stream is a property of its family: the
modules whose output goes straight into the layer's residual adds. The family table
(``steer_fast.families.FAMILIES``) names them by decoder-layer class;
``OrthogonalityConfig.residual_modules`` names them for any other layer (or overrides the
table). Only the ones LoRA adapts enter B_l; a layer where LoRA adapts
none of them (LoRA on q and v only, say) has P_l = 0: the constraint is vacuous there.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

ORTHOGONALITY_MODES: tuple[str, ...] = ("penalty", "project", "none")

def _check_module_paths(paths: object) -> tuple[str, ...] | None:
    if paths is None:
        return None
    if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
        raise ValueError(
            "residual_modules must be None (the table for the layer's family) or a list of module "
            f"paths inside a decoder layer such as ['self_attn.o_proj', 'mlp.down_proj'], got "
            f"{paths!r}"
        )
    checked = []
    for path in paths:
        if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
            raise ValueError(
                "each entry of residual_modules must be a dotted module path inside a decoder "
                f"layer such as 'self_attn.o_proj', got {path!r}"
            )
        checked.append(path)
    if not checked:
        raise ValueError("residual_modules must be None or a non-empty list of module paths")
    if len(set(checked)) != len(checked):
        raise ValueError(f"residual_modules must not repeat a path, got {list(paths)!r}")
    return tuple(checked)


@dataclass
class OrthogonalityConfig:
    """How post-block adapters and LoRA updates are kept apart during joint training.

    Args:
        weight: the penalty's coefficient in the loss (mode "penalty"); >= 0.
        mode: "penalty" adds ``weight * P`` to the training loss; "project" projects each U_l
            onto the orthogonal complement of span(B_l) after every optimizer step (a hard
            constraint); "none" trains both parts freely (P is still reported).
        eps: the column norm below which a column is divided by ``eps`` instead.
        rank_tolerance: relative singular-value cut-off for span(B_l) in mode "project".
        residual_modules: the modules of a decoder layer that write into the residual stream,
            as paths inside the layer (``["self_attn.o_proj", "mlp.down_proj"]``); None takes
            them from the family table (``steer_fast.families``) by the layer's class.
    """

    weight: float = 0.1
    mode: str = "penalty"
    eps: float = 1e-3
    rank_tolerance: float = 1e-6
    residual_modules: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str) or self.mode not in ORTHOGONALITY_MODES:
            raise ValueError(f"mode must be one of {ORTHOGONALITY_MODES}, got {self.mode!r}")
        for name in ("weight", "eps", "rank_tolerance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
            setattr(self, name, float(value))
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")
        self.residual_modules = _check_module_paths(self.residual_modules)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        values = dataclasses.asdict(self)
        if self.residual_modules is not None:
            values["residual_modules"] = list(self.residual_modules)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OrthogonalityConfig:
        """The config ``to_dict`` described; ValueError for unknown keys or bad values."""
        if not isinstance(values, dict):
            raise ValueError(f"an orthogonality config must be a dict, got {type(values).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown orthogonality config keys {unknown}; known keys: {sorted(known)}"
            )
        return cls(**values)


def normalize_columns(matrix: torch.Tensor, eps: float) -> torch.Tensor:
    """matrix [d, k] with each column divided by max(its norm, eps), in fp32."""
    matrix = matrix.float()
    return matrix / matrix.norm(dim=0, keepdim=True).clamp_min(eps)


def _autocast_off(device: torch.device):
    """A context without autocast on ``device``: the penalty stays in fp32 inside a bf16 or fp16
    autocast region (the Trainer computes the loss in one)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def layer_penalty(up_weight: torch.Tensor, lora_bs: list[torch.Tensor], eps: float) -> torch.Tensor:
    """|| hat(U)^T hat(B) ||_F^2 for one layer: U [d, r_s], each B [d, r_w] (fp32 scalar on U's
    device; differentiable with respect to U and every B)."""
    if not lora_bs:
        return up_weight.new_zeros((), dtype=torch.float32)
    with _autocast_off(up_weight.device):
        steering = normalize_columns(up_weight, eps)
        weight_update = normalize_columns(
            torch.cat([b.to(up_weight.device) for b in lora_bs], 1), eps
        )
        return (steering.T @ weight_update).pow(2).sum()


@torch.no_grad()
def project_out(
    up_weight: torch.Tensor, lora_bs: list[torch.Tensor], rank_tolerance: float
) -> None:
    """In place: U <- U - Q Q^T U, Q an orthonormal basis of span(B_1 ... B_k)."""
    if not lora_bs:
        return
    with _autocast_off(up_weight.device):
        weight_update = torch.cat([b.to(up_weight.device) for b in lora_bs], 1).float()
        basis, singular_values, _ = torch.linalg.svd(weight_update, full_matrices=False)
        if singular_values.numel() == 0 or singular_values[0] == 0:
            return
        basis = basis[:, singular_values > rank_tolerance * singular_values[0]]
        steering = up_weight.float()
        up_weight.copy_((steering - basis @ (basis.T @ steering)).to(up_weight.dtype))
