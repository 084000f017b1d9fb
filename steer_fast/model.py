"""Post-block steering on a Hugging Face model: steered blocks, SteerModel, save and load.

``get_steer_model(model, config)`` replaces each chosen decoder layer of ``model`` with a
``SteeredBlock`` holding the original layer and a ``PostBlockAdapter``:

    out = h + s * (U phi(D h + b_d) + b_u)       h: the layer's output (after its skip add)

A block takes one of two paths, fixed when it is made and reported by
``SteerModel.steering_paths()``:

- "fused": the layer's family is in ``steer_fast.families``; the block runs the layer's own
  submodules and hands the MLP branch and the residual to post_block_steer, which does the final
  residual add and the steering in one kernel.
- "plain": the layer runs as it is and its output (a tensor, or the first element of a tuple) is
  steered.

The lower-level ``inject_steering`` / ``remove_steering`` put blocks into a model and take them
out again without the SteerModel wrapper, for code that combines steering with other adapters.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapter import PostBlockAdapter
from .config import CONFIG_NAME, WEIGHTS_NAME, SteerConfig
from .families import FusedBlockSpec, check_fused_layer, family_for, run_fused_block
from .ops import post_block_steer, resolve_backend
from .saving import save_directory_atomically
from .validation import TORCH_DTYPES
from .wrapper import SteeringWrapper

PATH_FUSED = "fused"
PATH_PLAIN = "plain"

# Every steering parameter's name contains this, so that they are easy to select.
ADAPTER_NAME = "steer_adapter"
_EXTRA_STATE_KEY = "_extra_state"  # nn.Module's key for get_extra_state()
TRAINER_WEIGHTS_NAME = "model.safetensors"  # what transformers.Trainer saves a state_dict as

# Where decoder layers live when ``_no_split_modules`` does not say (and to break ties).
KNOWN_LAYER_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.decoder.layers",
    "decoder.layers",
    "transformer.h",
    "transformer.layers",
    "transformer.blocks",
    "gpt_neox.layers",
    "layers",
    "h",
    "blocks",
)

# nn.Module's forward-hook registries, which a SteeredBlock shares with the layer it wraps.
_FORWARD_HOOK_DICTS: tuple[str, ...] = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


# ----------------------------------------------------------------------------------------------
# The steered block
# ----------------------------------------------------------------------------------------------


def steer_hidden_states(
    adapter: PostBlockAdapter, hidden: torch.Tensor, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """post_block_steer with ``adapter``'s weights, in the dtype the unsteered block returns.

    The op takes one dtype for all tensors. A block returns ``residual + hidden`` in the promoted
    dtype of the two (under torch.autocast the residual stream can be fp32 while a branch output
    is bf16), so that dtype is used: residual, hidden and the adapter weights are cast to it
    (a no-op when they already match; the weight cast is differentiable, so fp32 adapter weights
    in a bf16 model train as fp32 master weights).
    """
    dtype = hidden.dtype if residual is None else torch.promote_types(hidden.dtype, residual.dtype)
    hidden = hidden.to(dtype)
    if residual is not None:
        residual = residual.to(dtype)
    down, up = adapter.down, adapter.up
    return post_block_steer(
        hidden,
        down.weight.to(dtype),
        up.weight.to(dtype),
        None if down.bias is None else down.bias.to(dtype),
        None if up.bias is None else up.bias.to(dtype),
        activation=adapter.activation,
        scale=adapter.scale,
        residual=residual,
        backend=adapter.backend,
    )


def layer_forward_function(layer: nn.Module) -> Callable[..., Any]:
    """``layer``'s forward as a function of (layer, *args, **kwargs), outside any checkpointing.

    A SteeredBlock does the gradient checkpointing of the layer it wraps, so it calls the layer's
    forward without transformers' checkpointing wrapper (which newer transformers puts around
    ``GradientCheckpointingLayer.forward``; older versions checkpoint in ``__call__`` instead).
    A forward set on the instance (accelerate hooks) is used as it is.
    """
    if "forward" in vars(layer):
        return _call_instance_forward
    forward = type(layer).forward
    code = getattr(forward, "__code__", None)
    if code is not None and code.co_name == "forward_with_checkpointing":
        forward = forward.__wrapped__
    return forward


def _call_instance_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return module.forward(*args, **kwargs)


@dataclass(frozen=True)
class CallConvention:
    """How a layer's forward takes its arguments, for the fused path to pass them on.

    Attributes:
        positional: names of the parameters after hidden_states that can be given by position.
        defaults: the default of every parameter besides hidden_states that has one.
    """

    positional: tuple[str, ...]
    defaults: dict[str, Any]

    @classmethod
    def of(cls, forward: Callable[..., Any]) -> CallConvention:
        parameters = list(inspect.signature(forward).parameters.values())[2:]  # self, hidden
        by_position = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        return cls(
            positional=tuple(p.name for p in parameters if p.kind in by_position),
            defaults={
                p.name: p.default
                for p in parameters
                if p.kind not in variadic and p.default is not inspect.Parameter.empty
            },
        )

    def split(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """(hidden_states, every other argument by name, defaults filled in)."""
        if args:
            hidden_states, extra = args[0], args[1:]
        elif "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            hidden_states, extra = kwargs.pop("hidden_states"), ()
        else:
            raise TypeError("the decoder layer was called without hidden_states")
        if len(extra) > len(self.positional):
            raise TypeError(
                f"the decoder layer takes at most {len(self.positional) + 1} positional "
                f"arguments, got {len(args)}"
            )
        call = dict(self.defaults)
        for name, value in zip(self.positional, extra, strict=False):
            if name in kwargs:
                raise TypeError(f"the decoder layer got multiple values for argument {name!r}")
            call[name] = value
        call.update(kwargs)
        return hidden_states, call


@dataclass(frozen=True)
class LayerPlan:
    """How one decoder layer is steered.

    Attributes:
        index: the layer's index in the model's decoder-layer list.
        layer_class: the layer's class name.
        path: "fused" or "plain".
        reason: why the layer takes that path, in words.
        spec: the fused-block layout (fused path only).
    """

    index: int
    layer_class: str
    path: str
    reason: str
    spec: FusedBlockSpec | None = None


class SteeredBlock(nn.Module):
    """A decoder layer followed by its post-block adapter; stands in for the layer.

    ``base_layer`` is the original layer, ``steer_adapter`` its PostBlockAdapter. The block is
    called exactly as the layer is and returns what the layer returns, with the hidden states
    steered. The block shares its forward hooks and pre-hooks with the wrapped layer: hooks
    registered on either (such as those transformers installs for ``output_hidden_states``) fire
    once per call, around the steered block, so they see the steered output, and they stay on
    the layer when the block is removed. Gradient checkpointing follows the wrapped layer's own
    setting (``gradient_checkpointing_enable()`` sets it) and covers the adapter.
    """

    def __init__(self, base_layer: nn.Module, adapter: PostBlockAdapter, plan: LayerPlan) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.steer_adapter = adapter
        self.layer_index = plan.index
        self.path = plan.path
        self.path_reason = plan.reason
        self.steering_enabled = True
        self._spec = plan.spec
        self._layer_forward = layer_forward_function(base_layer)
        self._call = CallConvention.of(self._layer_forward) if plan.spec else None
        for name in _FORWARD_HOOK_DICTS:
            if hasattr(base_layer, name):
                object.__setattr__(self, name, getattr(base_layer, name))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        layer = self.base_layer
        if getattr(layer, "gradient_checkpointing", False) and self.training:
            # What transformers' GradientCheckpointingLayer does for the layer itself: the cache
            # is not written twice (forward and recompute).
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            if not getattr(layer, "_can_checkpoint_with_cache", False):
                for name in ("past_key_values", "layer_past"):
                    if kwargs.get(name) is not None:
                        kwargs[name] = None
            return layer._gradient_checkpointing_func(
                functools.partial(self._steered_forward, **kwargs), *args
            )
        return self._steered_forward(*args, **kwargs)

    def _steered_forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.steering_enabled:
            return self._layer_forward(self.base_layer, *args, **kwargs)
        if self._spec is not None:
            hidden_states, call_kwargs = self._call.split(args, kwargs)
            branch, residual = run_fused_block(
                self.base_layer, self._spec, hidden_states, call_kwargs
            )
            return steer_hidden_states(self.steer_adapter, branch, residual)
        output = self._layer_forward(self.base_layer, *args, **kwargs)
        if isinstance(output, torch.Tensor):
            return steer_hidden_states(self.steer_adapter, output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (steer_hidden_states(self.steer_adapter, output[0]), *output[1:])
        raise TypeError(
            f"{type(self.base_layer).__name__} returned {type(output).__name__}; a steered "
            "layer must return its hidden states as a tensor or as the first element of a tuple"
        )

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}, path={self.path!r}"


# ----------------------------------------------------------------------------------------------
# Finding the decoder layers and planning
# ----------------------------------------------------------------------------------------------


def _path_rank(name: str) -> int | None:
    """Position in KNOWN_LAYER_PATHS of the first usual place ``name`` is (or ends with)."""
    for rank, path in enumerate(KNOWN_LAYER_PATHS):
        if name == path or name.endswith("." + path):
            return rank
    return None


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of ``model``'s decoder layers.

    The list is the ModuleList whose layers are all of a class named in the ``_no_split_modules``
    of the model (or of a transformers model inside it); failing that, a ModuleList at a usual
    place (``model.layers``, ``transformer.h``, ``gpt_neox.layers``, ...). Among several
    candidates, the one at the most specific usual place wins (``model.language_model.layers``
    over a vision tower's ``encoder.layers``).

    Raises:
        ValueError: if no such list exists, or if several remain.
    """
    no_split: set[str] = set()
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if isinstance(names, (list, tuple, set)):
            no_split.update(name for name in names if isinstance(name, str))
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    candidates = [
        (name, module)
        for name, module in lists
        if all(type(layer).__name__ in no_split for layer in module)
    ]
    if not candidates:
        candidates = [(name, module) for name, module in lists if _path_rank(name) is not None]
    ranks = [_path_rank(name) for name, _ in candidates]
    if len(candidates) > 1 and any(rank is not None for rank in ranks):
        best = min(rank for rank in ranks if rank is not None)
        candidates = [c for c, rank in zip(candidates, ranks, strict=True) if rank == best]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(
            f"model ({type(model).__name__}) has no recognisable decoder layers: expected a "
            f"ModuleList of layers named in _no_split_modules ({sorted(no_split)}) or one at "
            f"{list(KNOWN_LAYER_PATHS)}"
        )
    raise ValueError(
        f"model ({type(model).__name__}) has several candidate decoder-layer lists "
        f"{[name for name, _ in candidates]}; steer one language model at a time"
    )


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        size = getattr(text_config, "hidden_size", None)
        if isinstance(size, int) and size > 0:
            return size
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.embedding_dim
    raise ValueError(
        f"cannot tell the hidden size of {type(model).__name__}: it has neither "
        "config.hidden_size nor input embeddings"
    )


def _first_floating(module: nn.Module) -> torch.Tensor | None:
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            return tensor
    return None


@dataclass(frozen=True)
class SteeringPlan:
    """Everything ``inject_steering`` will do, decided (and validated) before it does it.

    Attributes:
        config: the config, hidden_size and num_layers filled in.
        layers_name: the name of the decoder-layer ModuleList in the model.
        layers: the plan of each steered layer, by index.
        dtype: the adapters' dtype.
    """

    config: SteerConfig
    layers_name: str
    layers: tuple[LayerPlan, ...]
    dtype: torch.dtype


def _check_config(config: object) -> SteerConfig:
    if not isinstance(config, SteerConfig):
        raise ValueError(f"config must be a steer_fast.SteerConfig, got {type(config).__name__}")
    # A copy, validated again: fields may have been changed after construction.
    return dataclasses.replace(config)


def plan_steering(model: nn.Module, config: SteerConfig) -> SteeringPlan:
    """Validate ``config`` against ``model`` and decide each layer's path; changes nothing.

    Raises:
        ValueError: for a bad config, a model that is already steered or has no recognisable
            decoder layers, a layer index out of range, a hidden size or layer count other than
            the config's (an adapter saved for another model), or a dtype or backend the
            kernels cannot run here.
    """
    config = _check_config(config)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, SteerModel) or any(isinstance(m, SteeredBlock) for m in model.modules()):
        raise ValueError("model is already steered; unload() it before steering it again")
    layers_name, layers = find_decoder_layers(model)
    hidden_size = _hidden_size(model)
    if config.hidden_size is not None and config.hidden_size != hidden_size:
        raise ValueError(
            f"the steer config is for hidden_size={config.hidden_size}, but the model's hidden "
            f"size is {hidden_size}"
        )
    if config.num_layers is not None and config.num_layers != len(layers):
        raise ValueError(
            f"the steer config is for num_layers={config.num_layers}, but the model has "
            f"{len(layers)} decoder layers ({layers_name})"
        )
    indices = range(len(layers)) if config.layers is None else config.layers
    out_of_range = [index for index in indices if index >= len(layers)]
    if out_of_range:
        raise ValueError(
            f"layers {out_of_range} out of range: the model has {len(layers)} decoder layers "
            f"(valid indices 0..{len(layers) - 1})"
        )
    dtype = config.dtype
    if dtype is None:
        reference = _first_floating(layers)
        dtype = reference.dtype if reference is not None else torch.get_default_dtype()
        if dtype not in TORCH_DTYPES:
            raise ValueError(
                f"the model's dtype {dtype} is not supported by the steering kernels; set "
                f"SteerConfig.dtype to one of {[str(d) for d in TORCH_DTYPES]}"
            )
    for device in {_layer_device(layers[index]) for index in indices}:
        resolve_backend(torch.empty(0, dtype=dtype, device=device), config.backend)

    plans = []
    for index in indices:
        layer = layers[index]
        name = type(layer).__name__
        if not config.fuse_residual:
            plans.append(LayerPlan(index, name, PATH_PLAIN, "fuse_residual=False"))
            continue
        spec, reason = check_fused_layer(layer, layer_forward_function(layer))
        if spec is None and family_for(layer) is not None:
            warnings.warn(
                f"steer_fast: layer {index} ({name}) is in the fused-block table but takes the "
                f"plain path: {reason}",
                RuntimeWarning,
                stacklevel=3,
            )
        path = PATH_PLAIN if spec is None else PATH_FUSED
        plans.append(LayerPlan(index, name, path, reason, spec))
    filled = dataclasses.replace(config, hidden_size=hidden_size, num_layers=len(layers))
    return SteeringPlan(filled, layers_name, tuple(plans), dtype)


def _layer_device(layer: nn.Module) -> torch.device:
    reference = next(iter([*layer.parameters(), *layer.buffers()]), None)
    return reference.device if reference is not None else torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Injection and removal
# ----------------------------------------------------------------------------------------------


def apply_steering_plan(model: nn.Module, plan: SteeringPlan) -> dict[int, PostBlockAdapter]:
    """Put a SteeredBlock in place of each planned layer; returns the new adapters by index.

    Every block is built before the first layer is replaced, so a failure leaves ``model`` as
    it was. Adapters start as the identity (``up`` zero) on their layer's device.
    """
    layers = model.get_submodule(plan.layers_name)
    config = plan.config
    blocks = {}
    for layer_plan in plan.layers:
        layer = layers[layer_plan.index]
        adapter = PostBlockAdapter(
            config.hidden_size,
            config.rank,
            activation=config.activation,
            bias=config.bias,
            scale=config.scale,
            device=_layer_device(layer),
            dtype=plan.dtype,
            backend=config.backend,
        )
        blocks[layer_plan.index] = SteeredBlock(layer, adapter, layer_plan)
    for index, block in blocks.items():
        layers[index] = block
    return {index: block.steer_adapter for index, block in blocks.items()}


def inject_steering(model: nn.Module, config: SteerConfig) -> dict[int, PostBlockAdapter]:
    """Steer ``model`` in place: validate, then replace the chosen decoder layers by
    SteeredBlocks. Returns the new adapters by layer index. Parameters' requires_grad are left
    as they are (SteerModel freezes the base model)."""
    return apply_steering_plan(model, plan_steering(model, config))


def steered_blocks(model: nn.Module) -> dict[int, SteeredBlock]:
    """The SteeredBlocks in ``model``, by decoder-layer index."""
    return {
        module.layer_index: module for module in model.modules() if isinstance(module, SteeredBlock)
    }


def remove_steering(model: nn.Module) -> dict[int, PostBlockAdapter]:
    """Put every steered layer's original module back; returns the removed adapters by index."""
    removed = {}
    for module in list(model.modules()):
        if not isinstance(module, nn.ModuleList):
            continue
        for position, block in enumerate(module):
            if isinstance(block, SteeredBlock):
                module[position] = block.base_layer
                removed[block.layer_index] = block.steer_adapter
    return removed


# ----------------------------------------------------------------------------------------------
# Saved adapters
# ----------------------------------------------------------------------------------------------

_TRAINER_KEY = re.compile(rf"(?:^|\.)(\d+)\.{ADAPTER_NAME}\.((?:down|up)\.(?:weight|bias))$")


def _expected_shapes(config: SteerConfig) -> dict[str, tuple[int, ...]]:
    """File key -> shape of every tensor an adapter saved with ``config`` holds."""
    rank, hidden = config.rank, config.hidden_size
    shapes = {}
    for index in range(config.num_layers) if config.layers is None else config.layers:
        shapes[f"layers.{index}.down.weight"] = (rank, hidden)
        shapes[f"layers.{index}.up.weight"] = (hidden, rank)
        if config.bias:
            shapes[f"layers.{index}.down.bias"] = (rank,)
            shapes[f"layers.{index}.up.bias"] = (hidden,)
    return shapes


def _check_saved_tensors(config: SteerConfig, tensors: dict[str, torch.Tensor], source: Path):
    if config.hidden_size is None or config.num_layers is None:
        raise ValueError(f"{source}: the steer config lacks hidden_size / num_layers")
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match its steer config: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(tensors[key].shape)}, its config says {shape}"
            )


def _config_from_tensor(state: torch.Tensor) -> SteerConfig:
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
        raise ValueError("the saved steer state must be a 1-D uint8 tensor of JSON")
    try:
        values = json.loads(bytes(state.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"the saved steer state is not valid JSON: {error}") from error
    return SteerConfig.from_dict(values)


def _read_saved(directory: Path) -> tuple[SteerConfig, dict[str, torch.Tensor]]:
    """(config, tensors by file key) from a save_pretrained directory, or from a Trainer
    checkpoint (model.safetensors holding a SteerModel state_dict)."""
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if config_file.is_file() and weights_file.is_file():
        config = SteerConfig.from_json_file(config_file)
        with safe_open(str(weights_file), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        _check_saved_tensors(config, tensors, weights_file)
        return config, tensors
    trainer_file = directory / TRAINER_WEIGHTS_NAME
    if trainer_file.is_file():
        with safe_open(str(trainer_file), framework="pt") as handle:
            keys = list(handle.keys())
            if _EXTRA_STATE_KEY not in keys:
                raise ValueError(f"{trainer_file} is not a SteerModel state_dict (no steer config)")
            config = _config_from_tensor(handle.get_tensor(_EXTRA_STATE_KEY))
            tensors = {}
            for key in keys:
                match = _TRAINER_KEY.search(key)
                if match:
                    tensors[f"layers.{match.group(1)}.{match.group(2)}"] = handle.get_tensor(key)
        _check_saved_tensors(config, tensors, trainer_file)
        return config, tensors
    raise ValueError(
        f"{directory} holds neither {CONFIG_NAME} + {WEIGHTS_NAME} (SteerModel.save_pretrained) "
        f"nor {TRAINER_WEIGHTS_NAME} (a Trainer checkpoint of a SteerModel)"
    )


# ----------------------------------------------------------------------------------------------
# SteerModel
# ----------------------------------------------------------------------------------------------


def _keep_steering_state(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook of SteerModel: keep the adapters and the config, drop the frozen
    base weights (they belong to the base model's own checkpoint)."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        name = key[len(prefix) :]
        if name != _EXTRA_STATE_KEY and f".{ADAPTER_NAME}." not in name:
            del state_dict[key]


def _ignore_missing_base_weights(module, incompatible_keys) -> None:
    """load_state_dict post-hook of SteerModel: a steering state_dict has no base weights."""
    base_keys = {f"base_model.{key}" for key in module.base_model.state_dict(keep_vars=True)}
    base_keys = {key for key in base_keys if f".{ADAPTER_NAME}." not in key}
    incompatible_keys.missing_keys[:] = [
        key
        for key in incompatible_keys.missing_keys
        if not any(key == base or key.endswith("." + base) for base in base_keys)
    ]


class SteerModel(SteeringWrapper):
    """A transformers model with post-block steering adapters, in the manner of a PeftModel.

    Build it with ``get_steer_model(model, config)``. Calls go to the wrapped model (``forward``
    with labels and all, ``generate``, and any attribute SteerModel does not have); only the
    adapters are trainable. ``state_dict()`` holds the adapters and the steer config (under
    "_extra_state"), not the frozen base weights, so that a transformers Trainer checkpoint of a
    SteerModel is an adapter checkpoint; ``base_model.state_dict()`` has everything.

    Args:
        model: a transformers model (any module whose decoder layers ``find_decoder_layers``
            finds). It is modified in place; ``unload()`` gives it back as it was.
        config: the steering to apply.
    """

    wrapped_attribute = "base_model"

    def __init__(self, model: nn.Module, config: SteerConfig) -> None:
        super().__init__()
        plan = plan_steering(model, config)
        self._trainable_before = [p for p in model.parameters() if p.requires_grad]
        apply_steering_plan(model, plan)
        self.base_model = model
        self.steer_config = plan.config
        self.layers_name = plan.layers_name
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(f".{ADAPTER_NAME}." in name)
        self.register_state_dict_post_hook(_keep_steering_state)
        self.register_load_state_dict_post_hook(_ignore_missing_base_weights)

    def get_base_model(self) -> nn.Module:
        """The wrapped model, steered blocks in place."""
        return self.base_model

    # --- adapters --------------------------------------------------------------------------

    def _steered_blocks(self) -> dict[int, SteeredBlock]:
        return dict(sorted(steered_blocks(self.base_model).items()))

    def steering_report(self) -> str:
        """One line per steered layer: index, class, path and why."""
        return "\n".join(
            f"layer {index}: {type(block.base_layer).__name__} -> {block.path} "
            f"({block.path_reason})"
            for index, block in self._steered_blocks().items()
        )

    def print_trainable_parameters(self) -> None:
        """Print the parameter counts and how many layers take each path."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )
        paths = self.steering_paths()
        counts = ", ".join(
            f"{sum(p == path for p in paths.values())} {path}" for path in (PATH_FUSED, PATH_PLAIN)
        )
        print(f"steered layers: {len(paths)} ({counts}); see steering_report()")

    def unload(self) -> nn.Module:
        """Take the steering off: the original layers go back in place and the parameters get
        back the requires_grad they had. Returns the wrapped model; this SteerModel is then
        empty."""
        model = self.base_model
        remove_steering(model)
        trainable = {id(p) for p in self._trainable_before}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in trainable)
        self._trainable_before = []
        del self.base_model
        return model

    # --- state -----------------------------------------------------------------------------

    def get_extra_state(self) -> torch.Tensor:
        """The steer config as a uint8 tensor of JSON, so that state_dict() carries it."""
        text = self.steer_config.to_json_string().encode("utf-8")
        return torch.tensor(list(text), dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        """Check that a loaded state_dict is for this steering; take over its scale."""
        saved = _config_from_tensor(state)
        structural = ("rank", "activation", "bias", "layers", "hidden_size", "num_layers")
        differing = {
            name: (getattr(saved, name), getattr(self.steer_config, name))
            for name in structural
            if getattr(saved, name) != getattr(self.steer_config, name)
        }
        if differing:
            raise ValueError(
                "the state_dict was saved for another steering config (saved, current): "
                f"{differing}"
            )
        self.set_scale(saved.scale)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write steer_config.json and steer_model.safetensors to ``save_directory``.

        The files are written to a new directory beside it, which then takes its place in one
        rename; other files in an existing ``save_directory`` are carried over. A failed save
        leaves an existing directory as it was.
        """
        tensors = self.steering_tensors()
        config_text = self.steer_config.to_json_string()

        def write(staging: Path) -> None:
            save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
            (staging / CONFIG_NAME).write_text(config_text, encoding="utf-8")

        save_directory_atomically(save_directory, write, (WEIGHTS_NAME, CONFIG_NAME))

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        save_directory: str | os.PathLike,
        is_trainable: bool = False,
        backend: str | None = None,
    ) -> SteerModel:
        """Steer ``model`` with the adapters saved in ``save_directory``.

        ``save_directory`` is a ``save_pretrained`` directory or a transformers Trainer
        checkpoint of a SteerModel. Everything is checked before ``model`` is touched. With
        ``is_trainable=False`` the adapters are frozen and the model is put in eval mode.
        ``backend`` overrides the saved config's backend (e.g. "torch" to load on the CPU an
        adapter trained with backend="triton").

        Raises:
            ValueError: if the directory holds no valid adapter, or one saved for another
                hidden size or layer count.
        """
        if not isinstance(is_trainable, bool):
            raise ValueError(f"is_trainable must be True or False, got {is_trainable!r}")
        config, tensors = _read_saved(Path(save_directory))
        if backend is not None:
            config = dataclasses.replace(config, backend=backend)
        steered = cls(model, config)
        steered.load_steering_tensors(tensors)
        if not is_trainable:
            for adapter in steered.get_adapters().values():
                adapter.requires_grad_(False)
            steered.eval()
        return steered


def get_steer_model(model: nn.Module, config: SteerConfig | None = None) -> SteerModel:
    """Steer ``model`` (in place) with ``config`` (default ``SteerConfig()``): see SteerModel."""
    return SteerModel(model, SteerConfig() if config is None else config)
