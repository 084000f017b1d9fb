"""Joint adaptation: PEFT LoRA and post-block steering on one model, kept apart by a constraint.

``get_joint_model(model, steer_config, lora_config, orthogonality)`` puts two adapters on one
transformers model, in this order:

1. LoRA, by PEFT itself (``peft.get_peft_model``), on the modules ``lora_config`` names: a
   weight update W x -> W x + (alpha / r) B A x;
2. a post-block adapter after each chosen decoder layer, by steer_fast: an activation update
   h -> h + s * (U phi(D h + b_d) + b_u).

Both train; the base model stays frozen. ``steer_fast.orthogonality`` defines the constraint
that keeps them from writing the same directions into the residual stream,

    P = sum_l || hat(U_l)^T hat(B_l) ||_F^2

(U_l: layer l's steering up-projection; B_l: the LoRA B matrices of layer l's modules that write
into the residual stream, side by side; hat: columns scaled to unit length), applied as a
penalty in the loss (mode "penalty"), as a projection of U_l onto the orthogonal complement of
span(B_l) after each optimizer step (mode "project"), or not at all (mode "none").

``JointTrainer`` is a transformers Trainer that adds the penalty, logs it, projects, and gives
the LoRA part and the steering part their own learning rates. ``JointModel.save_pretrained``
writes PEFT's adapter files (loadable by ``peft.PeftModel.from_pretrained`` alone), steer_fast's
steering files and a joint config into one folder.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils import (
    INCLUDE_LINEAR_LAYERS_SHORTHAND,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
)
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import CONFIG_NAME, WEIGHTS_NAME, SteerConfig
from .model import (
    ADAPTER_NAME,
    TRAINER_WEIGHTS_NAME,
    SteeredBlock,
    SteeringPlan,
    SteerModel,
    _read_saved,
    apply_steering_plan,
    plan_steering,
    remove_steering,
    steered_blocks,
)
from .orthogonality import OrthogonalityConfig, layer_penalty, project_out, residual_writer_paths
from .saving import save_directory_atomically
from .validation import check_learning_rate
from .wrapper import SteeringWrapper

JOINT_CONFIG_NAME = "joint_config.json"
JOINT_TYPE = "lora+post_block"
JOINT_FORMAT_VERSION = 1
# PEFT's file names (written by PeftConfig.save_pretrained and PeftModel.save_pretrained).
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
# Every file JointModel.save_pretrained writes.
_JOINT_FILES = (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, CONFIG_NAME, WEIGHTS_NAME, JOINT_CONFIG_NAME)
# The one LoRA adapter of a JointModel.
LORA_ADAPTER_NAME = "default"
# PeftModel's state_dict prefix for the model it wraps.
_PEFT_MODEL_PREFIX = "base_model.model."
# SteeredBlock keeps the layer it wraps as ``base_layer``: every module path inside a steered
# layer has this extra segment while steering is in place.
_BLOCK_SEGMENT = "base_layer."
_EXTRA_STATE_KEY = "_extra_state"
# The LoRA settings a state_dict must agree on to be loaded into a JointModel.
_LORA_STRUCTURE = (
    "r",
    "lora_alpha",
    "target_modules",
    "target_parameters",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "bias",
    "modules_to_save",
)


# ----------------------------------------------------------------------------------------------
# Validation (nothing here touches the model)
# ----------------------------------------------------------------------------------------------


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
    if isinstance(model, (JointModel, SteerModel, PeftModel)):
        raise ValueError(
            f"model is a {type(model).__name__}; pass the transformers model itself (unload() "
            "the adapters first)"
        )
    if any(isinstance(module, (BaseTunerLayer, SteeredBlock)) for module in model.modules()):
        raise ValueError("model already holds PEFT or steering adapters; unload() them first")
    return model


def lora_target_names(model: nn.Module, lora_config: LoraConfig) -> list[str]:
    """The names of the modules (and parameters, for ``target_parameters``) of ``model`` that
    ``lora_config`` selects, by PEFT's own matching (``check_target_module_exists``), with
    PEFT's default targets for the model type when ``target_modules`` is None."""
    config = copy.deepcopy(lora_config)
    if config.target_modules is None and not config.target_parameters:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        config.target_modules = None if default is None else set(default)
    names = []
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
        get_output = getattr(model, "get_output_embeddings", None)
        output = get_output() if callable(get_output) else None
        names = [
            name
            for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and module is not output
        ]
    elif targets is not None:
        names = [
            name
            for name, _ in model.named_modules()
            if name and check_target_module_exists(config, name)
        ]
    for target in config.target_parameters or ():
        names += [
            name
            for name, _ in model.named_parameters()
            if name == target or name.endswith("." + target)
        ]
    return names


def _output_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, Conv1D):
        return module.nf
    return None


@dataclass(frozen=True)
class JointPlan:
    """Everything a JointModel will do, decided (and validated) before the model is touched.

    Attributes:
        steering: the steering plan (``steer_fast.model.plan_steering``).
        lora_config: the LoRA config PEFT gets (a copy of the caller's).
        orthogonality: the orthogonality settings.
        residual_paths: for each steered layer, the paths (inside the layer) of its modules that
            write into the residual stream; LoRA may adapt any of them or none.
    """

    steering: SteeringPlan
    lora_config: LoraConfig
    orthogonality: OrthogonalityConfig
    residual_paths: dict[int, tuple[str, ...]]


def plan_joint(
    model: nn.Module,
    steer_config: SteerConfig,
    lora_config: LoraConfig,
    orthogonality: OrthogonalityConfig | None = None,
) -> JointPlan:
    """Validate everything get_joint_model needs against ``model``; changes nothing.

    Raises:
        ValueError: for a bad steer config (see ``plan_steering``), a ``lora_config`` that is
            not a ``peft.LoraConfig`` or selects no module of the model, a bad orthogonality
            config (negative weight, unknown mode, ...), a model that already holds adapters,
            residual-writing modules that do not exist or do not write a hidden-size output,
            or a layer family without known residual writers in mode "penalty" or "project".
    """
    orthogonality = _check_orthogonality(orthogonality)
    lora_config = _check_lora_config(lora_config)
    model = _check_unadapted(model)
    steering = plan_steering(model, steer_config)
    if not lora_target_names(model, lora_config):
        raise ValueError(
            f"lora_config selects no module of {type(model).__name__}: "
            f"target_modules={lora_config.target_modules!r}, "
            f"target_parameters={lora_config.target_parameters!r}, "
            f"layers_to_transform={lora_config.layers_to_transform!r}, "
            f"exclude_modules={lora_config.exclude_modules!r}"
        )

    layers = model.get_submodule(steering.layers_name)
    hidden_size = steering.config.hidden_size
    residual_paths: dict[int, tuple[str, ...]] = {}
    unknown: list[str] = []
    for layer_plan in steering.layers:
        layer = layers[layer_plan.index]
        paths = residual_writer_paths(layer, orthogonality.residual_modules)
        if paths is None:
            unknown.append(f"{layer_plan.index} ({type(layer).__name__})")
            residual_paths[layer_plan.index] = ()
            continue
        present = []
        for path in paths:
            try:
                module = layer.get_submodule(path)
            except AttributeError:
                continue
            features = _output_features(module)
            if features is None:
                raise ValueError(
                    f"residual-writing module {path!r} of layer {layer_plan.index} is a "
                    f"{type(module).__name__}; expected an nn.Linear or a transformers Conv1D"
                )
            if features != hidden_size:
                raise ValueError(
                    f"residual-writing module {path!r} of layer {layer_plan.index} writes "
                    f"{features} features, but the residual stream has {hidden_size}; "
                    "orthogonality.residual_modules must name modules whose output is added to "
                    "the residual stream"
                )
            present.append(path)
        residual_paths[layer_plan.index] = tuple(present)
    if orthogonality.residual_modules is not None and not any(residual_paths.values()):
        raise ValueError(
            f"orthogonality.residual_modules {list(orthogonality.residual_modules)} names no "
            f"module of the steered layers ({type(layers[steering.layers[0].index]).__name__})"
        )
    if unknown:
        message = (
            f"the residual-writing modules of steered layers {unknown} are unknown: their class is "
            "not in steer_fast.orthogonality.RESIDUAL_WRITERS; name them with "
            "OrthogonalityConfig(residual_modules=[...]) (paths inside a decoder layer, such as "
            "'self_attn.o_proj')"
        )
        if orthogonality.mode != "none":
            raise ValueError(message)
        warnings.warn(f"steer_fast: {message}; their penalty is reported as 0", stacklevel=3)
    return JointPlan(steering, lora_config, orthogonality, residual_paths)


# ----------------------------------------------------------------------------------------------
# Undoing a failed change
# ----------------------------------------------------------------------------------------------

_MODULE_STORES = (
    "_modules",
    "_parameters",
    "_buffers",
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
)


class _ModelSnapshot:
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


# ----------------------------------------------------------------------------------------------
# Key names: PEFT's files use the paths of the model without steering
# ----------------------------------------------------------------------------------------------


class _KeyMap:
    """Maps PEFT state-dict keys between the live model (steered layers have an extra
    ``base_layer.`` segment) and PEFT's files (the plain model's paths)."""

    def __init__(self, layers_name: str, steered: set[int]) -> None:
        layers = re.escape(_PEFT_MODEL_PREFIX + layers_name)
        self._live = re.compile(rf"^({layers}\.(\d+)\.){re.escape(_BLOCK_SEGMENT)}(.*)$", re.S)
        self._saved = re.compile(rf"^({layers}\.(\d+)\.)(.*)$", re.S)
        self._steered = steered

    def to_saved(self, key: str) -> str:
        match = self._live.match(key)
        if match and int(match.group(2)) in self._steered:
            return match.group(1) + match.group(3)
        return key

    def to_live(self, key: str) -> str:
        match = self._saved.match(key)
        if match and int(match.group(2)) in self._steered:
            return match.group(1) + _BLOCK_SEGMENT + match.group(3)
        return key


def _json_ready(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _lora_config_dict(config: LoraConfig) -> dict[str, Any]:
    return json.loads(json.dumps(config.to_dict(), default=_json_ready, sort_keys=True))


def _lora_structure(values: dict[str, Any]) -> dict[str, Any]:
    return {name: values.get(name) for name in _LORA_STRUCTURE}


def _lora_config_from_dict(values: dict[str, Any], source: str) -> LoraConfig:
    try:
        config = PeftConfig.from_peft_type(**values)
    except (TypeError, KeyError) as error:
        raise ValueError(f"{source} does not hold a valid PEFT config: {error}") from error
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{source} holds a {type(config).__name__}, not a LoRA config")
    return config


def _state_from_tensor(state: torch.Tensor) -> dict[str, Any]:
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
        raise ValueError("the saved joint state must be a 1-D uint8 tensor of JSON")
    try:
        values = json.loads(bytes(state.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"the saved joint state is not valid JSON: {error}") from error
    if not isinstance(values, dict) or values.get("joint_type") != JOINT_TYPE:
        raise ValueError(f"the saved state is not a JointModel state (joint_type {JOINT_TYPE!r})")
    version = values.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= JOINT_FORMAT_VERSION:
        raise ValueError(
            f"the saved joint state has format_version {version!r}; this steer_fast reads "
            f"1..{JOINT_FORMAT_VERSION}"
        )
    return values


# ----------------------------------------------------------------------------------------------
# JointModel
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LayerConstraint:
    """One steered layer's part of the constraint: its block and the LoRA-adapted modules that
    write into its residual stream (with their paths in the model without steering)."""

    block: SteeredBlock
    lora_modules: tuple[LoraLayer, ...]
    names: tuple[str, ...]

    def up_weight(self) -> torch.Tensor:
        return self.block.steer_adapter.up.weight

    def lora_bs(self) -> list[torch.Tensor]:
        return [module.lora_B[LORA_ADAPTER_NAME].weight for module in self.lora_modules]


def _keep_adapter_state(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook of JointModel: keep the two adapters and the joint state, drop the
    frozen base weights (they belong to the base model's own checkpoint)."""
    keep = module._adapter_state_keys
    for key in [key for key in state_dict if key.startswith(prefix)]:
        name = key[len(prefix) :]
        if name != _EXTRA_STATE_KEY and name not in keep:
            del state_dict[key]


def _is_adapter_key(key: str, adapter_keys: set[str]) -> bool:
    """Whether ``key`` (a JointModel state-dict key, maybe under a wrapper's prefix) belongs to
    one of the two adapters."""
    parts = key.split(".")
    return any(".".join(parts[start:]) in adapter_keys for start in range(len(parts)))


def _ignore_missing_base_weights(module, incompatible_keys) -> None:
    """load_state_dict post-hook of JointModel: an adapter state_dict has no base weights."""
    keep = module._adapter_state_keys
    incompatible_keys.missing_keys[:] = [
        key for key in incompatible_keys.missing_keys if _is_adapter_key(key, keep)
    ]


class JointModel(SteeringWrapper):
    """A transformers model with PEFT LoRA and post-block steering, trained together.

    Build it with ``get_joint_model``. ``peft_model`` is the PeftModel holding the LoRA part;
    the transformers model inside it (``get_base_model()``) has the LoRA layers and, in place of
    each steered decoder layer, a SteeredBlock. Calls go to ``peft_model`` (``forward`` with
    labels and all, ``generate``, and any attribute JointModel does not have). The trainable
    parameters are those PEFT makes trainable (the LoRA part) and the steering adapters; the
    base model is frozen.

    ``state_dict()`` holds both adapters and the configs (under "_extra_state"), not the base
    weights, so that a transformers Trainer checkpoint of a JointModel is an adapter checkpoint
    that ``resume_from_checkpoint`` and ``JointModel.from_pretrained`` restore.

    Args:
        model: a transformers model without adapters; modified in place (``unload()`` gives it
            back as it was).
        steer_config: the steering to apply.
        lora_config: the LoRA to apply (a ``peft.LoraConfig``; not modified).
        orthogonality: the constraint between the two (default ``OrthogonalityConfig()``).

    Raises:
        ValueError: for bad input (see ``plan_joint``), before the model is touched.
    """

    wrapped_attribute = "peft_model"

    def __init__(
        self,
        model: nn.Module,
        steer_config: SteerConfig,
        lora_config: LoraConfig,
        orthogonality: OrthogonalityConfig | None = None,
    ) -> None:
        super().__init__()
        plan = plan_joint(model, steer_config, lora_config, orthogonality)
        snapshot = _ModelSnapshot(model)
        try:
            peft_model = get_peft_model(model, plan.lora_config, adapter_name=LORA_ADAPTER_NAME)
            lora_parameters = {id(p) for p in model.parameters() if p.requires_grad}
            apply_steering_plan(model, plan.steering)
            constraint = self._find_constraint(model, plan)
        except BaseException:
            snapshot.restore()
            raise
        self._requires_grad_before = snapshot.requires_grad
        self.peft_model = peft_model
        self.steer_config = plan.steering.config
        self.orthogonality = plan.orthogonality
        self.layers_name = plan.steering.layers_name
        self._constraint = constraint
        self._key_map = _KeyMap(self.layers_name, set(constraint))
        # By name, which stays valid when the parameters are moved or converted.
        self._lora_parameter_names = {
            name for name, parameter in self.named_parameters() if id(parameter) in lora_parameters
        }
        self._adapter_state_keys = {
            name for name, _ in self.named_parameters() if f".{ADAPTER_NAME}." in name
        } | self._lora_parameter_names
        self.register_state_dict_post_hook(_keep_adapter_state)
        self.register_load_state_dict_post_hook(_ignore_missing_base_weights)
        self._warn_if_vacuous()

    @staticmethod
    def _find_constraint(model: nn.Module, plan: JointPlan) -> dict[int, _LayerConstraint]:
        blocks = steered_blocks(model)
        constraint = {}
        for index, paths in sorted(plan.residual_paths.items()):
            block = blocks[index]
            modules, names = [], []
            for path in paths:
                module = block.base_layer.get_submodule(path)
                if isinstance(module, LoraLayer) and LORA_ADAPTER_NAME in module.lora_B:
                    modules.append(module)
                    names.append(f"{plan.steering.layers_name}.{index}.{path}")
            constraint[index] = _LayerConstraint(block, tuple(modules), tuple(names))
        return constraint

    def _warn_if_vacuous(self) -> None:
        if self.orthogonality.mode == "none":
            return
        vacuous = [index for index, layer in self._constraint.items() if not layer.lora_modules]
        if vacuous:
            warnings.warn(
                f"steer_fast: steered layers {vacuous} have no LoRA-adapted module that writes "
                "into the residual stream, so the orthogonality constraint is vacuous there "
                "(P_l = 0); adapt the attention output / MLP down projections with LoRA to "
                "constrain them (see orthogonality_report())",
                RuntimeWarning,
                stacklevel=3,
            )
        if self.orthogonality.mode == "project":
            full = [
                index
                for index, layer in self._constraint.items()
                if sum(b.shape[1] for b in layer.lora_bs()) >= self.steer_config.hidden_size
            ]
            if full:
                warnings.warn(
                    f"steer_fast: in steered layers {full} the LoRA B matrices have at least as "
                    "many columns as the hidden size: once they span the whole residual stream, "
                    "mode 'project' leaves the steering no direction (U = 0)",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def get_base_model(self) -> nn.Module:
        """The transformers model, LoRA layers and steered blocks in place."""
        return self.peft_model.get_base_model()

    @property
    def lora_config(self) -> LoraConfig:
        """The LoRA config as PEFT holds it."""
        return self.peft_model.peft_config[LORA_ADAPTER_NAME]

    # --- the two parts ---------------------------------------------------------------------

    def _steered_blocks(self) -> dict[int, SteeredBlock]:
        return {index: layer.block for index, layer in self._constraint.items()}

    def lora_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The LoRA part: the parameters PEFT made trainable (LoRA A and B, and whatever else
        the LoRA config trains), with their names in this model."""
        return [(n, p) for n, p in self.named_parameters() if n in self._lora_parameter_names]

    def steering_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The steering part: every post-block adapter's D, U and biases."""
        return [(n, p) for n, p in self.named_parameters() if f".{ADAPTER_NAME}." in n]

    def parameter_groups(
        self, lora_learning_rate: float, steer_learning_rate: float, weight_decay: float = 0.0
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups, one per part, each with its own learning rate::

            torch.optim.AdamW(model.parameter_groups(2e-4, 1e-3))

        Frozen parameters (``from_pretrained(..., is_trainable=False)``) are left out; each
        group has a "name" ("lora", "steering").
        """
        groups = []
        for name, learning_rate, named in (
            ("lora", lora_learning_rate, self.lora_named_parameters()),
            ("steering", steer_learning_rate, self.steering_named_parameters()),
        ):
            params = [p for _, p in named if p.requires_grad]
            if params:
                groups.append(
                    {
                        "params": params,
                        "lr": check_learning_rate(f"{name} learning rate", learning_rate),
                        "weight_decay": weight_decay,
                        "name": name,
                    }
                )
        return groups

    def print_trainable_parameters(self) -> None:
        """Print the parameter counts, per part."""
        trainable, total = self.get_nb_trainable_parameters()
        lora = sum(p.numel() for _, p in self.lora_named_parameters() if p.requires_grad)
        steering = sum(p.numel() for _, p in self.steering_named_parameters() if p.requires_grad)
        print(
            f"trainable params: {trainable:,d} (lora: {lora:,d}, steering: {steering:,d}) || "
            f"all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the base model: LoRA and steering both off."""
        with self.peft_model.disable_adapter(), self.disable_steering():
            yield

    # --- the constraint --------------------------------------------------------------------

    def constrained_modules(self) -> dict[int, list[str]]:
        """Steered-layer index -> the LoRA-adapted modules whose B matrices enter its penalty
        (paths in the model without steering). An empty list: the constraint is vacuous there."""
        return {index: list(layer.names) for index, layer in self._constraint.items()}

    def orthogonality_report(self) -> str:
        """One line per steered layer: the shapes that enter its penalty term, or why none."""
        lines = [
            f"orthogonality: mode={self.orthogonality.mode!r}, weight={self.orthogonality.weight}"
        ]
        for index, layer in self._constraint.items():
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

    def _device(self) -> torch.device:
        reference = next(self.get_base_model().parameters(), None)
        return reference.device if reference is not None else torch.device("cpu")

    def orthogonality_loss(self) -> torch.Tensor:
        """P = sum_l || hat(U_l)^T hat(B_l) ||_F^2 (``steer_fast.orthogonality``), unweighted, in
        fp32, on the model's device; differentiable with respect to every U_l and B. Computed in
        every mode (mode "none" reports it without using it)."""
        device = self._device()
        eps = self.orthogonality.eps
        terms = [
            layer_penalty(layer.up_weight(), layer.lora_bs(), eps).to(device)
            for layer in self._constraint.values()
            if layer.lora_modules
        ]
        if not terms:
            return torch.zeros((), dtype=torch.float32, device=device)
        return torch.stack(terms).sum()

    def orthogonality_term(self) -> torch.Tensor:
        """What the constraint adds to the training loss: ``weight * orthogonality_loss()`` in
        mode "penalty", a zero scalar (nothing computed) in the other modes."""
        if self.orthogonality.mode != "penalty" or self.orthogonality.weight == 0:
            return torch.zeros((), dtype=torch.float32, device=self._device())
        return self.orthogonality.weight * self.orthogonality_loss()

    @torch.no_grad()
    def apply_orthogonality(self) -> None:
        """The step to take after each optimizer step: in mode "project", U_l <- U_l - Q Q^T U_l
        in place for every steered layer (Q: an orthonormal basis of span(B_l)); nothing in the
        other modes."""
        if self.orthogonality.mode != "project":
            return
        for layer in self._constraint.values():
            project_out(layer.up_weight(), layer.lora_bs(), self.orthogonality.rank_tolerance)

    # --- unload ----------------------------------------------------------------------------

    def unload(self) -> nn.Module:
        """Take both adapters off: the original layers and modules go back in place (no LoRA
        merged) and the parameters get back the requires_grad they had. Returns the model; this
        JointModel is then empty."""
        model = self.get_base_model()
        # Steering first: PEFT's unload takes any module with a ``base_layer`` for one of its own.
        remove_steering(model)
        self.peft_model.unload()
        for parameter, flag in self._requires_grad_before:
            parameter.requires_grad_(flag)
        self._requires_grad_before = []
        self._constraint = {}
        del self.peft_model
        return model

    # --- state -----------------------------------------------------------------------------

    def _joint_state(self) -> dict[str, Any]:
        return {
            "joint_type": JOINT_TYPE,
            "format_version": JOINT_FORMAT_VERSION,
            "steer_config": self.steer_config.to_dict(),
            "lora_config": _lora_config_dict(self.lora_config),
            "orthogonality": self.orthogonality.to_dict(),
        }

    def get_extra_state(self) -> torch.Tensor:
        """The configs as a uint8 tensor of JSON, so that state_dict() carries them."""
        text = json.dumps(self._joint_state(), sort_keys=True).encode("utf-8")
        return torch.tensor(list(text), dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        """Check that a loaded state_dict is for this joint model; take over its scale."""
        saved = _state_from_tensor(state)
        steer = SteerConfig.from_dict(saved["steer_config"])
        structural = ("rank", "activation", "bias", "layers", "hidden_size", "num_layers")
        differing = {
            f"steer {name}": (getattr(steer, name), getattr(self.steer_config, name))
            for name in structural
            if getattr(steer, name) != getattr(self.steer_config, name)
        }
        saved_lora = _lora_structure(saved["lora_config"])
        current_lora = _lora_structure(_lora_config_dict(self.lora_config))
        differing.update(
            {
                f"lora {name}": (saved_lora[name], current_lora[name])
                for name in _LORA_STRUCTURE
                if saved_lora[name] != current_lora[name]
            }
        )
        if differing:
            raise ValueError(
                f"the state_dict was saved for another joint model (saved, current): {differing}"
            )
        self.set_scale(steer.scale)

    def _lora_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT's adapter state dict, with the keys of the model without steering."""
        state = get_peft_model_state_dict(self.peft_model, adapter_name=LORA_ADAPTER_NAME)
        return {
            self._key_map.to_saved(key): tensor.detach().to("cpu").clone().contiguous()
            for key, tensor in state.items()
        }

    def _peft_config_to_save(self) -> tuple[LoraConfig, dict[str, str] | None]:
        """The LoRA config as PeftModel.save_pretrained writes it: inference_mode on, the base
        model's name filled in, and the model class for a config without task_type."""
        config = copy.deepcopy(self.lora_config)
        model = self.get_base_model()
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = model.__dict__.get("name_or_path", None) or None
        config.inference_mode = True
        auto_mapping = None
        if config.task_type is None:
            auto_mapping = {
                "base_model_class": type(model).__name__,
                "parent_library": type(model).__module__,
            }
        return config, auto_mapping

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write both parts to ``save_directory``:

        - adapter_config.json, adapter_model.safetensors: PEFT's files, with the keys of the
          model without steering (``peft.PeftModel.from_pretrained(model, save_directory)``
          loads the LoRA part alone);
        - steer_config.json, steer_model.safetensors: steer_fast's files (``SteerModel``'s);
        - joint_config.json: the orthogonality settings.

        The files are written to a new directory beside it, which then takes its place in one
        rename; other files in an existing ``save_directory`` are carried over. A failed save
        leaves an existing directory as it was.
        """
        lora_tensors = self._lora_tensors()
        steering_tensors = self.steering_tensors()
        peft_config, auto_mapping = self._peft_config_to_save()
        steer_text = self.steer_config.to_json_string()
        joint = {
            "joint_type": JOINT_TYPE,
            "format_version": JOINT_FORMAT_VERSION,
            "orthogonality": self.orthogonality.to_dict(),
        }

        def write(staging: Path) -> None:
            save_file(lora_tensors, str(staging / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
            peft_config.save_pretrained(str(staging), auto_mapping_dict=auto_mapping)
            save_file(steering_tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
            (staging / CONFIG_NAME).write_text(steer_text, encoding="utf-8")
            (staging / JOINT_CONFIG_NAME).write_text(
                json.dumps(joint, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )

        save_directory_atomically(save_directory, write, _JOINT_FILES)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        save_directory: str | os.PathLike,
        is_trainable: bool = False,
        backend: str | None = None,
    ) -> JointModel:
        """Put the LoRA and steering saved in ``save_directory`` on ``model``.

        ``save_directory`` is a ``save_pretrained`` directory or a transformers Trainer
        checkpoint of a JointModel. Everything that can be checked before ``model`` is touched
        is; if loading the weights fails afterwards, ``model`` is put back as it was. With
        ``is_trainable=False`` (PEFT's default) both parts are frozen and the model is put in
        eval mode. ``backend`` overrides the saved steering backend.

        Raises:
            ValueError: if the directory holds no valid joint adapter, or one that does not fit
                ``model``.
        """
        if not isinstance(is_trainable, bool):
            raise ValueError(f"is_trainable must be True or False, got {is_trainable!r}")
        saved = _read_saved_joint(Path(save_directory))
        steer_config = saved.steer_config
        if backend is not None:
            steer_config = dataclasses.replace(steer_config, backend=backend)
        snapshot = _ModelSnapshot(model) if isinstance(model, nn.Module) else None
        joint = cls(model, steer_config, saved.lora_config, saved.orthogonality)
        try:
            saved.load_into(joint)
        except BaseException:
            snapshot.restore()
            raise
        if not is_trainable:
            for _, parameter in joint.lora_named_parameters():
                parameter.requires_grad_(False)
            for _, parameter in joint.steering_named_parameters():
                parameter.requires_grad_(False)
            joint.eval()
        return joint


# ----------------------------------------------------------------------------------------------
# Reading saved joint models
# ----------------------------------------------------------------------------------------------


@dataclass
class _SavedJoint:
    """What a save_pretrained directory or a Trainer checkpoint holds, read and checked."""

    steer_config: SteerConfig
    lora_config: LoraConfig
    orthogonality: OrthogonalityConfig
    source: Path
    steering_tensors: dict[str, torch.Tensor] | None = None  # save_pretrained: file keys
    lora_tensors: dict[str, torch.Tensor] | None = None  # save_pretrained: PEFT's file keys
    state_dict: dict[str, torch.Tensor] | None = None  # Trainer checkpoint: JointModel keys

    def load_into(self, joint: JointModel) -> None:
        if self.state_dict is not None:
            result = joint.load_state_dict(self.state_dict, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ValueError(
                    f"{self.source} does not fit the joint model: missing "
                    f"{result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}"
                )
            return
        live = {joint._key_map.to_live(key): value for key, value in self.lora_tensors.items()}
        try:
            result = set_peft_model_state_dict(joint.peft_model, live, LORA_ADAPTER_NAME)
        except RuntimeError as error:  # shape mismatches
            raise ValueError(f"{self.source / PEFT_WEIGHTS_NAME} does not fit: {error}") from error
        lora_keys = {
            name.removeprefix("peft_model.")
            for name, _ in joint.lora_named_parameters()
        }
        missing = [key for key in result.missing_keys if key in lora_keys]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{self.source / PEFT_WEIGHTS_NAME} does not fit the LoRA config: missing "
                f"{missing[:8]}, unexpected {list(result.unexpected_keys)[:8]}"
            )
        joint.load_steering_tensors(self.steering_tensors)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return values


def _read_saved_joint(directory: Path) -> _SavedJoint:
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    if (directory / JOINT_CONFIG_NAME).is_file():
        missing = [name for name in _JOINT_FILES if not (directory / name).is_file()]
        if missing:
            raise ValueError(f"{directory} is a joint adapter directory without {missing}")
        joint = _read_json(directory / JOINT_CONFIG_NAME)
        if joint.get("joint_type") != JOINT_TYPE:
            raise ValueError(f"{directory / JOINT_CONFIG_NAME} is not a {JOINT_TYPE} joint config")
        version = joint.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= JOINT_FORMAT_VERSION:
            raise ValueError(
                f"{directory / JOINT_CONFIG_NAME} has format_version {version!r}; this "
                f"steer_fast reads 1..{JOINT_FORMAT_VERSION}"
            )
        orthogonality = OrthogonalityConfig.from_dict(joint.get("orthogonality"))
        steer_config, steering_tensors = _read_saved(directory)
        try:
            lora_config = PeftConfig.from_pretrained(str(directory))
        except (TypeError, KeyError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{directory / PEFT_CONFIG_NAME} does not hold a valid PEFT config: {error}"
            ) from error
        if not isinstance(lora_config, LoraConfig):
            raise ValueError(
                f"{directory / PEFT_CONFIG_NAME} holds a {type(lora_config).__name__}, not a "
                "LoRA config"
            )
        lora_config.inference_mode = False
        with safe_open(str(directory / PEFT_WEIGHTS_NAME), framework="pt") as handle:
            lora_tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        if not lora_tensors:
            raise ValueError(f"{directory / PEFT_WEIGHTS_NAME} holds no tensor")
        return _SavedJoint(
            steer_config,
            lora_config,
            orthogonality,
            directory,
            steering_tensors=steering_tensors,
            lora_tensors=lora_tensors,
        )
    trainer_file = directory / TRAINER_WEIGHTS_NAME
    if trainer_file.is_file():
        with safe_open(str(trainer_file), framework="pt") as handle:
            keys = list(handle.keys())
            if _EXTRA_STATE_KEY not in keys:
                raise ValueError(f"{trainer_file} is not a JointModel state_dict (no joint state)")
            state = _state_from_tensor(handle.get_tensor(_EXTRA_STATE_KEY))
            tensors = {key: handle.get_tensor(key) for key in keys}
        lora_config = _lora_config_from_dict(state["lora_config"], str(trainer_file))
        lora_config.inference_mode = False
        return _SavedJoint(
            SteerConfig.from_dict(state["steer_config"]),
            lora_config,
            OrthogonalityConfig.from_dict(state["orthogonality"]),
            directory,
            state_dict=tensors,
        )
    raise ValueError(
        f"{directory} holds neither {JOINT_CONFIG_NAME} and the adapter files "
        f"(JointModel.save_pretrained) nor {TRAINER_WEIGHTS_NAME} (a Trainer checkpoint of a "
        "JointModel)"
    )


def get_joint_model(
    model: nn.Module,
    steer_config: SteerConfig,
    lora_config: LoraConfig,
    orthogonality: OrthogonalityConfig | None = None,
) -> JointModel:
    """Put PEFT LoRA (``lora_config``) and post-block steering (``steer_config``) on ``model``,
    in place, kept apart by ``orthogonality`` (default ``OrthogonalityConfig()``): see
    JointModel. Only the two adapters are trainable."""
    return JointModel(model, steer_config, lora_config, orthogonality)
