"""The orthogonality constraint between post-block steering and LoRA weight updates.

In decoder layer l the post-block adapter computes h -> h + s * (U_l phi(D_l h + b_d) + b_u): it
reads the residual stream through the rows of its down-projection D_l (r_s x d) and writes into
it along the columns of its up-projection U_l (d x r_s). A LoRA update of a module adds
(alpha / r) B A x to the module's output, so it writes along the columns of its B (d x r_w) when
that output has the hidden size. ``OrthogonalityConfig.constraint`` picks how the two are kept
apart.

"down_projection" (the default: the paper's constraint). With B_l the LoRA B matrices of layer
l's chosen modules side by side (by default the MLP down projection, the family table's
``mlp_writer``) and V_l an orthonormal basis of span(B_l),

    D_l <- D_l (I - V_l V_l^T)

at the start of an optimizer step, at a frequency: every step, every N steps, at each epoch's
start, or once when training starts. Afterwards D_l V_l = 0: the adapter reads nothing from the
directions the layer's weight update writes, so the two parts respond to different parts of the
residual stream. The projection changes D_l only along span(V_l) (D_l (I - V_l V_l^T) is kept as
it was). It is measured by

    O = sum_l || D_l V_l ||_F^2       (``down_projection_overlap``, 0 right after a projection)

V_l comes from an SVD of B_l: its left singular vectors whose singular value exceeds
``rank_tolerance`` times the largest. A B_l of zeros (LoRA's initialisation) has span {0}: V_l is
empty and the projection changes nothing. (Taking all r_w singular vectors of a zero B_l would
instead remove r_w arbitrary directions; both agree whenever B_l has full column rank.)

"up_projection" (steer_fast's own alternative). With B_l the LoRA B matrices of layer l's
residual-writing modules (attention output and MLP down projections) and hat scaling every
column to unit length,

    P = sum_l || hat(U_l)^T hat(B_l) ||_F^2 = sum_l sum_ij cos^2(angle(u_i, b_j))

zero exactly when every steering direction is orthogonal to everything the weight update of its
layer can write, at most r_s * sum r_w per layer. Mode "penalty" adds ``weight * P`` to the
loss; mode "project" projects after every optimizer step, U_l <- U_l - Q Q^T U_l with Q an
orthonormal basis of span(B_l) (cut at ``rank_tolerance`` like V_l); mode "none" leaves both
parts free. Normalising makes P a sum of squared cosines: it constrains directions, not sizes,
so it cannot be lowered by shrinking either part. A column shorter than ``eps`` is divided by
``eps`` instead of its norm, so the zero initialisations of LoRA's B and the adapter's U give
P = 0 with finite gradients.

"none": both parts train freely.

Both measures, O and P, are reported whatever the constraint (each on its own modules). Which
modules of a layer write into the residual stream is a property of its family: the family table
(``steer_fast.families.FAMILIES``) names the attention and MLP writers by decoder-layer class;
``modules`` and ``residual_modules`` name them for any other layer, or override the table. Only
the ones LoRA adapts enter B_l; a layer where LoRA adapts none of them has a vacuous constraint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

CONSTRAINTS: tuple[str, ...] = ("down_projection", "up_projection", "none")
ORTHOGONALITY_MODES: tuple[str, ...] = ("penalty", "project", "none")
FREQUENCIES: tuple[str, ...] = ("step", "epoch", "init")
# The fields that configure the up-projection constraint: a config that sets one of them without
# naming a constraint is an up-projection config (what it meant before ``constraint`` existed).
UP_PROJECTION_FIELDS: tuple[str, ...] = ("mode", "weight", "eps", "residual_modules")
_UP_PROJECTION_DEFAULTS = {"mode": "penalty", "weight": 0.1, "eps": 1e-3}
# The fields that only one constraint reads.
_FIELD_OWNERS = {"mode": "up_projection", "weight": "up_projection", "frequency": "down_projection"}


def _check_module_paths(name: str, paths: object) -> tuple[str, ...] | None:
    if paths is None:
        return None
    if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
        raise ValueError(
            f"{name} must be None (the family table's modules) or a list of module paths inside "
            f"a decoder layer such as ['self_attn.o_proj', 'mlp.down_proj'], got {paths!r}"
        )
    checked = []
    for path in paths:
        if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
            raise ValueError(
                f"each entry of {name} must be a dotted module path inside a decoder layer such "
                f"as 'mlp.down_proj', got {path!r}"
            )
        checked.append(path)
    if not checked:
        raise ValueError(f"{name} must be None or a non-empty list of module paths")
    if len(set(checked)) != len(checked):
        raise ValueError(f"{name} must not repeat a path, got {list(paths)!r}")
    return tuple(checked)


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return float(value)


# The paper's code projects every 100 optimizer steps unless told otherwise.
DEFAULT_FREQUENCY = 100


def _check_frequency(frequency: object) -> str | int:
    if isinstance(frequency, str) and frequency in FREQUENCIES:
        return frequency
    if isinstance(frequency, numbers.Integral) and not isinstance(frequency, bool):
        if frequency > 0:
            return int(frequency)
    raise ValueError(
        "frequency must be 'step' (every optimizer step), a positive integer N (global steps 0, "
        f"N, 2N, ...), 'epoch' (each epoch's start) or 'init' (once), got {frequency!r}"
    )


@dataclass
class OrthogonalityConfig:
    """How post-block adapters and LoRA updates are kept apart during joint training (the maths:
    this module's docstring).

    Args:
        constraint: "down_projection" (the paper's: D_l <- D_l (I - V_l V_l^T)),
            "up_projection" (steer_fast's own: U_l against the B of the residual writers, as a
            penalty or a projection) or "none". None (the default) means "up_projection" when
            any of ``mode``, ``weight``, ``eps``, ``residual_modules`` is given (so that configs
            written before this field existed keep their meaning), "down_projection" otherwise.
        frequency: down_projection: when to project, at the start of an optimizer step: "step"
            (every step), a positive int N (global steps 0, N, 2N, ...; the default is 100, the
            paper's code's default), "epoch" (at each epoch's start) or "init" (once, when
            training starts).
        modules: the modules whose LoRA B spans V_l, as paths inside a decoder layer
            (``["mlp.down_proj"]``); None takes the family table's ``mlp_writer``. Used by the
            down-projection constraint and by the overlap O in every constraint.
        mode: up_projection: "penalty" (default) adds ``weight * P`` to the training loss;
            "project" projects each U_l onto the orthogonal complement of span(B_l) after every
            optimizer step; "none" trains both parts freely.
        weight: up_projection: the penalty's coefficient (default 0.1), >= 0.
        eps: the column norm below which a column of P is divided by ``eps`` instead (default
            1e-3); P is measured in every constraint.
        rank_tolerance: relative singular-value cut-off of the bases V_l and Q (both
            projections and O).
        residual_modules: the modules of a decoder layer that write into the residual stream,
            as paths inside the layer (``["self_attn.o_proj", "mlp.down_proj"]``); None takes
            them from the family table. Used by the up-projection constraint and by P.

    Raises:
        ValueError: for a bad value, naming the field, or a field of one constraint given with
            another (``mode`` with constraint "down_projection", say).
    """

    constraint: str | None = None
    frequency: str | int | None = None
    modules: Sequence[str] | None = None
    mode: str | None = None
    weight: float | None = None
    eps: float | None = None
    rank_tolerance: float = 1e-6
    residual_modules: Sequence[str] | None = None

    def __post_init__(self) -> None:
        inferred_from = None
        if self.constraint is None:
            given = [name for name in UP_PROJECTION_FIELDS if getattr(self, name) is not None]
            self.constraint = "up_projection" if given else "down_projection"
            inferred_from = given
        if not isinstance(self.constraint, str) or self.constraint not in CONSTRAINTS:
            raise ValueError(
                f"constraint must be one of {CONSTRAINTS} or None, got {self.constraint!r}"
            )
        self._reject_foreign_fields(inferred_from)
        if self.constraint == "up_projection":
            for name, default in _UP_PROJECTION_DEFAULTS.items():
                if getattr(self, name) is None:
                    setattr(self, name, default)
            if not isinstance(self.mode, str) or self.mode not in ORTHOGONALITY_MODES:
                raise ValueError(f"mode must be one of {ORTHOGONALITY_MODES}, got {self.mode!r}")
            self.weight = _check_number("weight", self.weight)
        if self.constraint == "down_projection":
            frequency = DEFAULT_FREQUENCY if self.frequency is None else self.frequency
            self.frequency = _check_frequency(frequency)
        if self.eps is None:
            self.eps = _UP_PROJECTION_DEFAULTS["eps"]
        self.eps = _check_number("eps", self.eps)
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")
        self.rank_tolerance = _check_number("rank_tolerance", self.rank_tolerance)
        self.modules = _check_module_paths("modules", self.modules)
        self.residual_modules = _check_module_paths("residual_modules", self.residual_modules)

    def _reject_foreign_fields(self, inferred_from: list[str] | None) -> None:
        """A field that configures another constraint than the chosen one is an error: it would
        be silently ignored."""
        chosen = f"constraint={self.constraint!r}"
        if inferred_from:
            chosen = f"the {self.constraint} constraint ({', '.join(inferred_from)} given)"
        for name, owner in _FIELD_OWNERS.items():
            if getattr(self, name) is not None and self.constraint != owner:
                raise ValueError(
                    f"{name} configures the {owner} constraint, not {chosen}: write "
                    f"OrthogonalityConfig(constraint={owner!r}, {name}=...) or leave {name} out"
                )

    @property
    def enforced(self) -> bool:
        """Whether the constraint acts on training at all."""
        if self.constraint == "up_projection":
            return self.mode != "none"
        return self.constraint != "none"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (the constraint resolved)."""
        values = dataclasses.asdict(self)
        for name in ("modules", "residual_modules"):
            if values[name] is not None:
                values[name] = list(values[name])
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OrthogonalityConfig:
        """The config ``to_dict`` described; ValueError for unknown keys or bad values. A dict
        without "constraint" is read as it was written before that field existed (see
        ``constraint``)."""
        if not isinstance(values, dict):
            raise ValueError(f"an orthogonality config must be a dict, got {type(values).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown orthogonality config keys {unknown}; known keys: {sorted(known)}"
            )
        return cls(**values)


# ----------------------------------------------------------------------------------------------
# The maths, on plain tensors
# ----------------------------------------------------------------------------------------------


def _autocast_off(device: torch.device):
    """A context without autocast on ``device``: the measures and projections stay in fp32
    inside a bf16 or fp16 autocast region (the Trainer computes the loss in one)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def normalize_columns(matrix: torch.Tensor, eps: float) -> torch.Tensor:
    """matrix [d, k] with each column divided by max(its norm, eps), in fp32."""
    matrix = matrix.float()
    return matrix / matrix.norm(dim=0, keepdim=True).clamp_min(eps)


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


@torch.no_grad()
def column_space_bases(
    matrices: Sequence[torch.Tensor], rank_tolerance: float
) -> list[torch.Tensor]:
    """For each B [d, k]: V [d, k], fp32, whose nonzero columns are an orthonormal basis of
    span(B) and whose other columns are zero: B's left singular vectors, each kept if its
    singular value exceeds ``rank_tolerance`` times the largest (none for B = 0).

    Keeping the shape (rather than dropping columns) lets one batched SVD serve every matrix of
    the same shape and device, with no device-to-host synchronisation; a zero column of V
    projects nothing, so V V^T is the orthogonal projector onto span(B) either way.
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, matrix in enumerate(matrices):
        groups.setdefault((tuple(matrix.shape), matrix.device), []).append(index)
    bases: list[torch.Tensor | None] = [None] * len(matrices)
    for (_, device), indices in groups.items():
        with _autocast_off(device):
            stacked = torch.stack([matrices[i].detach().float() for i in indices])
            left, singular_values, _ = torch.linalg.svd(stacked, full_matrices=False)
            keep = singular_values > rank_tolerance * singular_values[..., :1]
            masked = left * keep.unsqueeze(-2).to(left.dtype)
        for position, index in enumerate(indices):
            bases[index] = masked[position]
    return bases


@torch.no_grad()
def down_projection_overlaps(
    down_weights: Sequence[torch.Tensor], bases: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """|| D V ||_F^2 for each pair of a down-projection D [r_s, d] and a basis V [d, k] (fp32
    scalars on D's device)."""
    overlaps = []
    for down, basis in zip(down_weights, bases, strict=True):
        with _autocast_off(down.device):
            overlaps.append((down.float() @ basis.to(down.device)).pow(2).sum())
    return overlaps


@torch.no_grad()
def project_down(down_weights: Sequence[torch.Tensor], bases: Sequence[torch.Tensor]) -> None:
    """In place, for each pair: D <- D (I - V V^T) = D - (D V) V^T, computed in fp32 and cast
    back to D's dtype. Only the component of each row along span(V) changes, and D keeps its
    storage (an optimizer's state for it stays valid)."""
    for down, basis in zip(down_weights, bases, strict=True):
        with _autocast_off(down.device):
            basis = basis.to(down.device)
            weight = down.float()
            down.copy_((weight - (weight @ basis) @ basis.T).to(down.dtype))
