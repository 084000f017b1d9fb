"""The orthogonality constraint of a JointModel, layer by layer.

``steer_fast.orthogonality`` defines the constraint and its maths; this module finds, in a joint
model, what enters it: for each steered layer, its adapter's up-projection U_l and the LoRA B
matrices of the layer's residual-writing modules that LoRA adapts (``JointPlan.residual_paths``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..block import SteeredBlock
from ..injection import steered_blocks
from ..orthogonality import OrthogonalityConfig, layer_penalty, project_out
from ..shims import lora_b_weight
from .plan import JointPlan

# The one LoRA adapter of a JointModel.
LORA_ADAPTER_NAME = "default"


@dataclass(frozen=True)
class LayerConstraint:
    """One steered layer's part of the constraint: its block and the LoRA-adapted modules that
    write into its residual stream (with their paths in the model without steering)."""

    block: SteeredBlock
    lora_modules: tuple[nn.Module, ...]
    names: tuple[str, ...]

    def up_weight(self) -> torch.Tensor:
        return self.block.steer_adapter.up.weight

    def lora_bs(self) -> list[torch.Tensor]:
        return [lora_b_weight(module, LORA_ADAPTER_NAME) for module in self.lora_modules]


class OrthogonalityConstraint:
    """The constraint over every steered layer of a joint model.

    Args:
        model: the transformers model, LoRA layers and steered blocks in place.
        plan: the plan the joint model was built from.
    """

    def __init__(self, model: nn.Module, plan: JointPlan) -> None:
        self.config: OrthogonalityConfig = plan.orthogonality
        blocks = steered_blocks(model)
        self.layers: dict[int, LayerConstraint] = {}
        for index, paths in sorted(plan.residual_paths.items()):
            block = blocks[index]
            modules, names = [], []
            for path in paths:
                module = block.base_layer.get_submodule(path)
                if lora_b_weight(module, LORA_ADAPTER_NAME) is not None:
                    modules.append(module)
                    names.append(f"{plan.steering.layers_name}.{index}.{path}")
            self.layers[index] = LayerConstraint(block, tuple(modules), tuple(names))

    def warn_if_vacuous(self, hidden_size: int) -> None:
        """Warn about layers where the constraint does nothing, or would remove all steering."""
        if self.config.mode == "none":
            return
        vacuous = [index for index, layer in self.layers.items() if not layer.lora_modules]
        if vacuous:
            warnings.warn(
                f"steer_fast: steered layers {vacuous} have no LoRA-adapted module that writes "
                "into the residual stream, so the orthogonality constraint is vacuous there "
                "(P_l = 0); adapt the attention output / MLP down projections with LoRA to "
                "constrain them (see orthogonality_report())",
                RuntimeWarning,
                stacklevel=3,
            )
        if self.config.mode == "project":
            full = [
                index
                for index, layer in self.layers.items()
                if sum(b.shape[1] for b in layer.lora_bs()) >= hidden_size
            ]
            if full:
                warnings.warn(
                    f"steer_fast: in steered layers {full} the LoRA B matrices have at least as "
                    "many columns as the hidden size: once they span the whole residual stream, "
                    "mode 'project' leaves the steering no direction (U = 0)",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def modules(self) -> dict[int, list[str]]:
        """Steered-layer index -> the constrained LoRA modules' paths (model without steering)."""
        return {index: list(layer.names) for index, layer in self.layers.items()}

    def report(self) -> str:
        """One line per steered layer: the shapes that enter its penalty term, or why none."""
        lines = [f"orthogonality: mode={self.config.mode!r}, weight={self.config.weight}"]
        for index, layer in self.layers.items():
            up = tuple(layer.up_weight().shape)
            if not layer.lora_modules:
                lines.append(
                    f"layer {index}: U {up[0]}x{up[1]}; no LoRA-adapted residual-writing module, "
                    "the constraint is vacuous (P_l = 0)"
                )
                continue
            parts = ", ".join(
                f"{name} (B {b.shape[0]}x{b.shape[1]})"
                for name, b in zip(layer.names, layer.lora_bs(), strict=True)
            )
            lines.append(f"layer {index}: U {up[0]}x{up[1]} against {parts}")
        return "\n".join(lines)

    def penalty(self, device: torch.device) -> torch.Tensor:
        """P = sum_l || hat(U_l)^T hat(B_l) ||_F^2, unweighted, fp32, on ``device``."""
        terms = [
            layer_penalty(layer.up_weight(), layer.lora_bs(), self.config.eps).to(device)
            for layer in self.layers.values()
            if layer.lora_modules
        ]
        if not terms:
            return torch.zeros((), dtype=torch.float32, device=device)
        return torch.stack(terms).sum()

    @torch.no_grad()
    def project(self) -> None:
        """U_l <- U_l - Q Q^T U_l in place for every steered layer (Q: an orthonormal basis of
        span(B_l))."""
        for layer in self.layers.values():
            project_out(layer.up_weight(), layer.lora_bs(), self.config.rank_tolerance)
