"""The orthogonality constraint of a JointModel, layer by layer.

``orthogonality`` defines the constraints and their maths; this module finds, in a
joint model, what enters them. For each steered layer l:

- its adapter's down-projection D_l and the LoRA B matrices of the modules ``JointPlan.down_paths``
  names that LoRA adapts (the down-projection constraint, D_l <- D_l (I - V_l V_l^T), and the
  overlap O = sum_l ||D_l V_l||_F^2);
- its adapter's up-projection U_l and the LoRA B matrices of the residual-writing modules
  ``JointPlan.residual_paths`` names that LoRA adapts (the up-projection constraint and
  P = sum_l ||hat(U_l)^T hat(B_l)||_F^2).

Both measures are available whatever the constraint; the config's ``constraint`` picks which one
acts on training.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..injection import SteeredBlock, steered_blocks
from ..shims import lora_b_weight
from .orthogonality import (
    OrthogonalityConfig,
    column_space_bases,
    down_projection_overlaps,
    layer_penalty,
    project_down,
    project_out,
)
from .plan import JointPlan

# The one LoRA adapter of a JointModel.
LORA_ADAPTER_NAME = "default"


def constrained_adapter(block: SteeredBlock) -> nn.Module | None:
    """The steering module the constraints act on: the block site's, else the MLP site's (the
    paper's code constrains the MLP adapter in its submodule variant); None without either."""
    adapters = block.adapters()
    for site in ("block", "mlp"):
        if site in adapters:
            return adapters[site]
    return None


def _projection_weight(block: SteeredBlock, name: str) -> torch.Tensor | None:
    """The weight of the constrained module's "down" or "up" linear layer; None for a steering
    module without one (a rank-0 steering vector)."""
    linear = getattr(constrained_adapter(block), name, None)
    return None if linear is None else linear.weight


@dataclass(frozen=True)
class LayerConstraint:
    """One steered layer's part of the constraints: its block, the LoRA-adapted modules whose B
    spans V_l (``down_*``) and the LoRA-adapted modules that write into its residual stream
    (``residual_*``), with their paths in the model without steering."""

    block: SteeredBlock
    down_modules: tuple[nn.Module, ...]
    down_names: tuple[str, ...]
    residual_modules: tuple[nn.Module, ...]
    residual_names: tuple[str, ...]

    def down_weight(self) -> torch.Tensor | None:
        """D_l [r_s, d]."""
        return _projection_weight(self.block, "down")

    def up_weight(self) -> torch.Tensor | None:
        """U_l [d, r_s]."""
        return _projection_weight(self.block, "up")

    def down_bs(self) -> list[torch.Tensor]:
        return [lora_b_weight(module, LORA_ADAPTER_NAME) for module in self.down_modules]

    def residual_bs(self) -> list[torch.Tensor]:
        return [lora_b_weight(module, LORA_ADAPTER_NAME) for module in self.residual_modules]

    @property
    def projects_down(self) -> bool:
        return bool(self.down_modules) and self.down_weight() is not None

    @property
    def penalises_up(self) -> bool:
        return bool(self.residual_modules) and self.up_weight() is not None


def _adapted(block: SteeredBlock, paths: tuple[str, ...]) -> list[str]:
    """The paths of ``paths`` whose module in ``block``'s layer LoRA adapts."""
    return [
        path
        for path in paths
        if lora_b_weight(block.base_layer.get_submodule(path), LORA_ADAPTER_NAME) is not None
    ]


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(str(size) for size in tensor.shape)


class OrthogonalityConstraint:
    """The constraints over every steered layer of a joint model.

    Args:
        model: the transformers model, LoRA layers and steered blocks in place.
        plan: the plan the joint model was built from.

    Raises:
        ValueError: if ``plan.orthogonality.modules`` names a module LoRA adapts in no steered
            layer (raised while the caller can still undo the change to the model).
    """

    def __init__(self, model: nn.Module, plan: JointPlan) -> None:
        self.config: OrthogonalityConfig = plan.orthogonality
        blocks = steered_blocks(model)
        self.layers: dict[int, LayerConstraint] = {}
        adapted_down_paths: set[str] = set()
        for index in sorted(plan.residual_paths):
            block = blocks[index]
            prefix = f"{plan.steering.layers_name}.{index}"
            down = _adapted(block, plan.down_paths[index])
            residual = _adapted(block, plan.residual_paths[index])
            adapted_down_paths.update(down)
            self.layers[index] = LayerConstraint(
                block,
                down_modules=tuple(block.base_layer.get_submodule(path) for path in down),
                down_names=tuple(f"{prefix}.{path}" for path in down),
                residual_modules=tuple(block.base_layer.get_submodule(path) for path in residual),
                residual_names=tuple(f"{prefix}.{path}" for path in residual),
            )
        missing = [path for path in self.config.modules or () if path not in adapted_down_paths]
        if missing:
            raise ValueError(
                f"orthogonality.modules names {missing}, which LoRA adapts in no steered layer; "
                "add them to lora_config.target_modules or leave them out of modules"
            )

    # --- what the constraint covers ----------------------------------------------------------

    def warn_if_vacuous(self, hidden_size: int) -> None:
        """Warn about layers where the active constraint does nothing, or would remove all
        steering."""
        if not self.config.enforced:
            return
        if self.config.constraint == "down_projection":
            vacuous = [index for index, layer in self.layers.items() if not layer.projects_down]
            columns = {
                index: sum(b.shape[1] for b in layer.down_bs())
                for index, layer in self.layers.items()
            }
            what = "LoRA-adapted module among orthogonality.modules (default: the MLP writer)"
            hint = "adapt the MLP down projections with LoRA"
            removed = "the down-projection constraint leaves the steering nothing to read (D = 0)"
        else:
            vacuous = [index for index, layer in self.layers.items() if not layer.penalises_up]
            columns = {
                index: sum(b.shape[1] for b in layer.residual_bs())
                for index, layer in self.layers.items()
            }
            what = "LoRA-adapted module that writes into the residual stream"
            hint = "adapt the attention output / MLP down projections with LoRA"
            removed = "mode 'project' leaves the steering no direction to write (U = 0)"
        if vacuous:
            warnings.warn(
                f"steer_fast: steered layers {vacuous} have no {what}, so the orthogonality "
                f"constraint is vacuous there; {hint} to constrain them (see "
                "orthogonality_report())",
                RuntimeWarning,
                stacklevel=3,
            )
        projecting = self.config.constraint == "down_projection" or self.config.mode == "project"
        full = [index for index, count in columns.items() if count >= hidden_size]
        if projecting and full:
            warnings.warn(
                f"steer_fast: in steered layers {full} the LoRA B matrices have at least as many "
                f"columns as the hidden size: once they span the whole residual stream, {removed}",
                RuntimeWarning,
                stacklevel=3,
            )

    def modules(self) -> dict[int, list[str]]:
        """Steered-layer index -> the LoRA modules whose B enters the active constraint (paths
        in the model without steering); empty lists for constraint "none"."""
        if self.config.constraint == "down_projection":
            return {index: list(layer.down_names) for index, layer in self.layers.items()}
        if self.config.constraint == "up_projection":
            return {index: list(layer.residual_names) for index, layer in self.layers.items()}
        return {index: [] for index in self.layers}

    def report(self) -> str:
        """A header with the settings, then one line per steered layer: the shapes that enter the
        active constraint, or why nothing does."""
        config = self.config
        if config.constraint == "none":
            return (
                "orthogonality: constraint='none' (both parts train freely; "
                "down_projection_overlap and orthogonality_penalty are still measured)"
            )
        if config.constraint == "down_projection":
            lines = [f"orthogonality: constraint='down_projection', frequency={config.frequency!r}"]
            for index, layer in self.layers.items():
                lines.append(self._down_line(index, layer))
            return "\n".join(lines)
        lines = [
            f"orthogonality: constraint='up_projection', mode={config.mode!r}, "
            f"weight={config.weight}"
        ]
        for index, layer in self.layers.items():
            lines.append(self._up_line(index, layer))
        return "\n".join(lines)

    @staticmethod
    def _down_line(index: int, layer: LayerConstraint) -> str:
        down = layer.down_weight()
        if down is None:
            return f"layer {index}: a steering vector has no down-projection; nothing to project"
        if not layer.down_modules:
            return (
                f"layer {index}: D {_shape(down)}; no LoRA-adapted module to project against, "
                "the constraint is vacuous (D_l unchanged)"
            )
        parts = ", ".join(
            f"{name} (B {_shape(b)})"
            for name, b in zip(layer.down_names, layer.down_bs(), strict=True)
        )
        return f"layer {index}: D {_shape(down)} projected off span(B) of {parts}"

    @staticmethod
    def _up_line(index: int, layer: LayerConstraint) -> str:
        up = layer.up_weight()
        if up is None:
            return f"layer {index}: a steering vector has no up-projection; nothing to constrain"
        if not layer.residual_modules:
            return (
                f"layer {index}: U {_shape(up)}; no LoRA-adapted residual-writing module, the "
                "constraint is vacuous (P_l = 0)"
            )
        parts = ", ".join(
            f"{name} (B {_shape(b)})"
            for name, b in zip(layer.residual_names, layer.residual_bs(), strict=True)
        )
        return f"layer {index}: U {_shape(up)} against {parts}"

    # --- the up-projection constraint --------------------------------------------------------

    def penalty(self, device: torch.device) -> torch.Tensor:
        """P = sum_l || hat(U_l)^T hat(B_l) ||_F^2, unweighted, fp32, on ``device``."""
        terms = [
            layer_penalty(layer.up_weight(), layer.residual_bs(), self.config.eps).to(device)
            for layer in self.layers.values()
            if layer.penalises_up
        ]
        if not terms:
            return torch.zeros((), dtype=torch.float32, device=device)
        return torch.stack(terms).sum()

    @torch.no_grad()
    def project_up(self) -> None:
        """U_l <- U_l - Q Q^T U_l in place for every steered layer (Q: an orthonormal basis of
        span(B_l))."""
        for layer in self.layers.values():
            if layer.penalises_up:
                project_out(layer.up_weight(), layer.residual_bs(), self.config.rank_tolerance)

    # --- the down-projection constraint ------------------------------------------------------

    def _down_terms(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(D_l, V_l) for every layer with something to project against (one batched SVD per
        shape of B_l)."""
        layers = [layer for layer in self.layers.values() if layer.projects_down]
        updates = [torch.cat([b.detach() for b in layer.down_bs()], 1) for layer in layers]
        bases = column_space_bases(updates, self.config.rank_tolerance)
        return [layer.down_weight() for layer in layers], bases

    @torch.no_grad()
    def down_overlap(self, device: torch.device) -> torch.Tensor:
        """O = sum_l || D_l V_l ||_F^2, fp32, on ``device`` (no gradient)."""
        downs, bases = self._down_terms()
        terms = [term.to(device) for term in down_projection_overlaps(downs, bases)]
        if not terms:
            return torch.zeros((), dtype=torch.float32, device=device)
        return torch.stack(terms).sum()

    @torch.no_grad()
    def project_down(self) -> None:
        """D_l <- D_l (I - V_l V_l^T) in place for every steered layer, in fp32, cast back."""
        downs, bases = self._down_terms()
        project_down(downs, bases)
