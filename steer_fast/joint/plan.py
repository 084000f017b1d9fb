"""Planning a JointModel: every check before the model is touched, and undoing a failed change.

``plan_joint`` validates the configs and the model and plans the steering; PEFT then checks the
LoRA config itself while ``get_peft_model`` applies it (its own errors, such as a
``target_modules`` that matches no module, are ValueErrors), inside a ``ModelSnapshot`` that
puts the model back as it was if anything fails halfway.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass

from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import SteerConfig
from ..injection import SteeredBlock, SteeringPlan, plan_steering
from ..injection.families import family_for, residual_writer_paths
from ..wrapper import SteeringWrapper
from .orthogonality import OrthogonalityConfig


def check_learning_rate(name: str, value: object) -> float:
    """A learning rate: a finite number >= 0; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class JointPlan:
    """Everything a JointModel will do, decided (and validated) before the model is touched.

    Attributes:
        steering: the steering plan (``steer_fast.injection.plan_steering``).
        lora_config: the LoRA config PEFT gets (a copy of the caller's).
        orthogonality: the orthogonality settings.
        residual_paths: for each steered layer, the paths (inside the layer) of its modules that
            write into the residual stream (the up-projection constraint and P); LoRA may adapt
            any of them or none.
        down_paths: for each steered layer, the paths of the modules whose LoRA B spans V_l
            (the down-projection constraint and its overlap); which of them LoRA adapts is
            checked once PEFT has applied the LoRA config.
    """

    steering: SteeringPlan
    lora_config: LoraConfig
    orthogonality: OrthogonalityConfig
    residual_paths: dict[int, tuple[str, ...]]
    down_paths: dict[int, tuple[str, ...]]


def _check_orthogonality(orthogonality: object) -> OrthogonalityConfig:
    if orthogonality is None:
        return OrthogonalityConfig()
    if not isinstance(orthogonality, OrthogonalityConfig):
        raise ValueError(
            "orthogonality must be a steer_fast.OrthogonalityConfig or None, got "
            f"{type(orthogonality).__name__}"
        )
    # A copy, validated again: fields may have been changed after construction.
    return dataclasses.replace(orthogonality)


def _check_lora_config(lora_config: object) -> LoraConfig:
    if not isinstance(lora_config, LoraConfig):
        raise ValueError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    if lora_config.inference_mode:
        raise ValueError(
            "lora_config.inference_mode is True, which freezes the LoRA weights; get_joint_model "
            "builds a model to train (load a trained one with JointModel.from_pretrained)"
        )
    # PEFT fills in and rewrites fields of the config it is given; the caller's stays as it was.
    return copy.deepcopy(lora_config)


def _check_unadapted(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (SteeringWrapper, PeftModel)):
        raise ValueError(
            f"model is a {type(model).__name__}; pass the transformers model itself (unload() "
            "the adapters first)"
        )
    if any(isinstance(module, (BaseTunerLayer, SteeredBlock)) for module in model.modules()):
        raise ValueError("model already holds PEFT or steering adapters; unload() them first")
    return model


def _output_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, Conv1D):
        return module.nf
    return None


def _present_writers(
    layer: nn.Module, index: int, paths: tuple[str, ...], hidden_size: int, argument: str
) -> tuple[str, ...]:
    """The paths of ``paths`` that exist in ``layer``, each checked to write hidden-size
    outputs (``argument``: the config field that named them, for the error)."""
    present = []
    for path in paths:
        try:
            module = layer.get_submodule(path)
        except AttributeError:
            continue
        features = _output_features(module)
        if features is None:
            raise ValueError(
                f"module {path!r} of layer {index} ({argument}) is a {type(module).__name__}; "
                "expected an nn.Linear or a transformers Conv1D"
            )
        if features != hidden_size:
            raise ValueError(
                f"module {path!r} of layer {index} writes {features} features, but the residual "
                f"stream has {hidden_size}; {argument} must name modules whose output is added to "
                "the residual stream"
            )
        present.append(path)
    return tuple(present)


def _down_projection_paths(
    layer: nn.Module, modules: tuple[str, ...] | None
) -> tuple[str, ...] | None:
    """``modules`` when given, else the layer's family's MLP writer; None when neither says."""
    if modules is not None:
        return modules
    row = family_for(layer)
    return (row.mlp_writer,) if row is not None and row.mlp_writer else None


def _plan_residual_paths(
    layers: nn.Module, steering: SteeringPlan, orthogonality: OrthogonalityConfig
) -> dict[int, tuple[str, ...]]:
    residual_paths: dict[int, tuple[str, ...]] = {}
    unknown: list[str] = []
    for layer_plan in steering.layers:
        index = layer_plan.index
        paths = residual_writer_paths(layers[index], orthogonality.residual_modules)
        if paths is None:
            unknown.append(f"{index} ({type(layers[index]).__name__})")
            paths = ()
        residual_paths[index] = _present_writers(
            layers[index],
            index,
            paths,
            steering.config.hidden_size,
            "orthogonality.residual_modules",
        )
    if orthogonality.residual_modules is not None and not any(residual_paths.values()):
        raise ValueError(
            f"orthogonality.residual_modules {list(orthogonality.residual_modules)} names no "
            f"module of the steered layers ({type(layers[steering.layers[0].index]).__name__})"
        )
    if unknown and orthogonality.constraint == "up_projection":
        message = (
            f"the residual-writing modules of steered layers {unknown} are unknown: their class is "
            "not in the family table (steer_fast.families.FAMILIES); name them with "
            "OrthogonalityConfig(residual_modules=[...]) (paths inside a decoder layer, such as "
            "'self_attn.o_proj')"
        )
        if orthogonality.enforced:
            raise ValueError(message)
        warnings.warn(f"steer_fast: {message}; their penalty is reported as 0", stacklevel=4)
    return residual_paths


def _plan_down_paths(
    layers: nn.Module, steering: SteeringPlan, orthogonality: OrthogonalityConfig
) -> dict[int, tuple[str, ...]]:
    down_paths: dict[int, tuple[str, ...]] = {}
    unknown: list[str] = []
    for layer_plan in steering.layers:
        index = layer_plan.index
        paths = _down_projection_paths(layers[index], orthogonality.modules)
        if paths is None:
            unknown.append(f"{index} ({type(layers[index]).__name__})")
            paths = ()
        down_paths[index] = _present_writers(
            layers[index], index, paths, steering.config.hidden_size, "orthogonality.modules"
        )
    if orthogonality.modules is not None and not any(down_paths.values()):
        raise ValueError(
            f"orthogonality.modules {list(orthogonality.modules)} names no module of the steered "
            f"layers ({type(layers[steering.layers[0].index]).__name__})"
        )
    if unknown and orthogonality.constraint == "down_projection":
        raise ValueError(
            f"steered layers {unknown} have no MLP writer in the family table "
            "(steer_fast.families.FAMILIES: an unknown class, or a family whose MLP output no "
            "module LoRA can adapt writes, such as Mixtral's fused experts), so the "
            "down-projection constraint has no LoRA B to use: name the modules with "
            "OrthogonalityConfig(modules=[...]) (paths inside a decoder layer, such as "
            "'self_attn.o_proj'), or choose constraint='up_projection' or 'none'"
        )
    return down_paths


def _check_constrained_steering(config: SteerConfig, orthogonality: OrthogonalityConfig) -> None:
    """The constraints act on a low-rank adapter's D and U, at site "block" (or "mlp" without
    it, as in the paper's submodule variant): anything else would leave them nothing to act on."""
    if orthogonality.constraint == "none":
        return
    if config.rank == 0:
        raise ValueError(
            f"orthogonality constraint {orthogonality.constraint!r} acts on a low-rank adapter's "
            "D and U, and steer_config.rank=0 (steering vectors) has neither: use rank >= 1 or "
            "OrthogonalityConfig(constraint='none')"
        )
    if not {"block", "mlp"} & set(config.site):
        raise ValueError(
            f"orthogonality constraint {orthogonality.constraint!r} acts on the adapter at site "
            f"'block' (or 'mlp'), and steer_config.site={list(config.site)} has neither: add one "
            "or use OrthogonalityConfig(constraint='none')"
        )


def plan_joint(
    model: nn.Module,
    steer_config: SteerConfig,
    lora_config: LoraConfig,
    orthogonality: OrthogonalityConfig | None = None,
) -> JointPlan:
    """Validate everything get_joint_model needs against ``model``, except what PEFT checks
    itself while applying ``lora_config``; changes nothing.

    Raises:
        ValueError: for a bad steer config (see ``plan_steering``), a ``lora_config`` that is
            not a ``peft.LoraConfig``, a bad orthogonality config (negative weight, unknown
            mode or frequency, ...), a model that already holds adapters, ``modules`` or
            ``residual_modules`` that exist in no steered layer or do not write a hidden-size
            output, a layer family without known residual writers for the up-projection
            constraint in mode "penalty" or "project", or one without an MLP writer for the
            down-projection constraint when ``modules`` is not given.
    """
    orthogonality = _check_orthogonality(orthogonality)
    lora_config = _check_lora_config(lora_config)
    model = _check_unadapted(model)
    steering = plan_steering(model, steer_config)
    _check_constrained_steering(steering.config, orthogonality)
    layers = model.get_submodule(steering.layers_name)
    residual_paths = _plan_residual_paths(layers, steering, orthogonality)
    down_paths = _plan_down_paths(layers, steering, orthogonality)
    return JointPlan(steering, lora_config, orthogonality, residual_paths, down_paths)


# nn.Module's stores of children, parameters, buffers and hooks.
_MODULE_STORES = (
    "_modules",
    "_parameters",
    "_buffers",
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
)


class ModelSnapshot:
    """The structure of a model (every module's children, parameters, buffers and hooks), its
    parameters' requires_grad flags and its root attributes, to put back after a change fails
    halfway (PEFT replaces modules one by one and may raise after the first)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._stores = [
            (store, dict(store))
            for module in model.modules()
            for store in (getattr(module, name, None) for name in _MODULE_STORES)
            if store is not None
        ]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self._attributes = dict(vars(model))

    def restore(self) -> None:
        for store, saved in self._stores:
            store.clear()
            store.update(saved)
        for parameter, flag in self.requires_grad:
            parameter.requires_grad_(flag)
        attributes = vars(self.model)  # PEFT sets peft_config (and more) on the model
        for name in [name for name in attributes if name not in self._attributes]:
            del attributes[name]
        for name, value in self._attributes.items():
            if attributes[name] is not value:
                attributes[name] = value
