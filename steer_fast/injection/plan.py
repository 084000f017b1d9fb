"""Finding a model's decoder layers, planning their steering, and putting it in and out.

``plan_steering(model, config)`` validates a SteerConfig against a model and decides each
layer's path without touching the model; ``apply_steering_plan`` then puts a SteeredBlock in
place of each planned layer, building every block first so that a failure leaves the model as it
was. ``inject_steering`` / ``remove_steering`` do both steps and undo them without a wrapper
(and without freezing anything), for code that combines steering with other adapters;
SteerModel and JointModel are built on the same two steps.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..config import SteerConfig
from ..constants import BASE_MODEL_FIELDS, PATH_FUSED, PATH_PLAIN
from ..modules import make_steering
from ..ops import TORCH_DTYPES, resolve_backend
from ..shims import layer_forward_function
from .families import branch_end_paths, check_fused_layer, family_for
from .layers import (
    base_model_reference,
    find_decoder_layers,
    first_floating,
    layer_device,
    model_hidden_size,
)
from .steered_block import LayerPlan, SteeredBlock


@dataclass(frozen=True)
class SteeringPlan:
    """Everything ``inject_steering`` will do, decided (and validated) before it does it.

    Attributes:
        config: the config, hidden_size, num_layers and the base model filled in.
        layers_name: the name of the decoder-layer ModuleList in the model.
        layers: the plan of each steered layer, by index.
        dtype: the adapters' dtype.
    """

    config: SteerConfig
    layers_name: str
    layers: tuple[LayerPlan, ...]
    dtype: torch.dtype


def _filled(
    config: SteerConfig, model: nn.Module, hidden_size: int, num_layers: int
) -> SteerConfig:
    """``config`` with the model's hidden size and layer count, and, where it names no base
    model, the model's name (and revision, unless the config names one): see
    ``base_model_reference``."""
    base = {}
    if config.base_model_name_or_path is None:
        name, revision = base_model_reference(model)
        base = dict(zip(BASE_MODEL_FIELDS, (name, config.revision or revision), strict=True))
    return dataclasses.replace(config, hidden_size=hidden_size, num_layers=num_layers, **base)


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
    # A SteerModel or JointModel holds the model it steers, and so its SteeredBlocks.
    if any(isinstance(m, SteeredBlock) for m in model.modules()):
        raise ValueError("model is already steered; unload() it before steering it again")
    layers_name, layers = find_decoder_layers(model)
    hidden_size = model_hidden_size(model)
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
        reference = first_floating(layers)
        dtype = reference.dtype if reference is not None else torch.get_default_dtype()
        if dtype not in TORCH_DTYPES:
            raise ValueError(
                f"the model's dtype {dtype} is not supported by the steering kernels; set "
                f"SteerConfig.dtype to one of {[str(d) for d in TORCH_DTYPES]}"
            )
    for device in {layer_device(layers[index]) for index in indices}:
        resolve_backend(torch.empty(0, dtype=dtype, device=device), config.backend)

    plans = [_plan_layer(index, layers[index], config) for index in indices]
    filled = _filled(config, model, hidden_size, len(layers))
    return SteeringPlan(filled, layers_name, tuple(plans), dtype)


def _plan_layer(index: int, layer: nn.Module, config: SteerConfig) -> LayerPlan:
    """The path of one layer: fused where its family's layout allows and fusing saves a residual
    add (the block site, or a rank-0 vector at a branch site), plain otherwise."""
    name = type(layer).__name__
    branch_sites = [site for site in config.site if site != "block"]
    if not config.fuse_residual:
        spec, reason = None, "fuse_residual=False"
    elif "block" not in config.site and config.rank > 0:
        spec, reason = (
            None,
            (
                f"sites {branch_sites} steer branch outputs with a low-rank adapter, which reads "
                "the branch alone: there is no residual add to fuse"
            ),
        )
    else:
        spec, reason = check_fused_layer(layer, layer_forward_function(layer))
        row = family_for(layer)
        if spec is None and row is not None and row.spec is not None:
            warnings.warn(
                f"steer_fast: layer {index} ({name}) has a fused layout in the family table but "
                f"takes the plain path: {reason}",
                RuntimeWarning,
                stacklevel=4,
            )
    if spec is not None:
        return LayerPlan(index, name, PATH_FUSED, reason, spec)
    branch_ends = {}
    if branch_sites:
        ends = branch_end_paths(layer)
        if ends is None:
            raise ValueError(
                f"site {list(config.site)}: layer {index} ({name}) is not in the family table "
                "(steer_fast.families), so its attention and MLP branch outputs are unknown; "
                "only site='block' can steer it"
            )
        for site in branch_sites:
            try:
                layer.get_submodule(ends[site])
            except AttributeError:
                raise ValueError(
                    f"site {site!r}: layer {index} ({name}) has no module {ends[site]!r}, the "
                    "branch output its family's row names"
                ) from None
            branch_ends[site] = ends[site]
        reason = f"{reason}; sites {branch_sites} steered by hooks on {list(branch_ends.values())}"
    return LayerPlan(index, name, PATH_PLAIN, reason, branch_ends=branch_ends)


@dataclass(frozen=True)
class NamedAdapterPlan:
    """Everything ``apply_named_adapter`` will do for one more named adapter on a steered model.

    Attributes:
        config: the adapter's config, hidden_size, num_layers and the base model filled in.
        dtype: the adapter's dtype.
        new_layers: plans of the layers the adapter steers that have no SteeredBlock yet.
        branch_ends: layer index -> site -> branch module path, for the plain-path blocks whose
            hooks must now steer a branch site they did not.
    """

    config: SteerConfig
    dtype: torch.dtype
    new_layers: tuple[LayerPlan, ...]
    branch_ends: dict[int, dict[str, str]]


def plan_named_adapter(model: nn.Module, layers_name: str, config: SteerConfig) -> NamedAdapterPlan:
    """Validate ``config`` for one more adapter on the steered ``model`` and plan it; changes
    nothing. It may steer other layers and sites than the model's other adapters, and differ in
    rank, activation and scale; it must fit the same base model.

    Raises:
        ValueError: as ``plan_steering`` does for a bad config or another base model, and for a
            branch site on a layer whose branch outputs are unknown.
    """
    config = _check_config(config)
    layers = model.get_submodule(layers_name)
    hidden_size = model_hidden_size(model)
    bases = [layer.base_layer if isinstance(layer, SteeredBlock) else layer for layer in layers]
    for name, value, actual in (
        ("hidden_size", config.hidden_size, hidden_size),
        ("num_layers", config.num_layers, len(layers)),
    ):
        if value is not None and value != actual:
            raise ValueError(
                f"config: the adapter is for {name}={value}, but the model's is {actual} (an "
                "adapter of another base model)"
            )
    indices = range(len(layers)) if config.layers is None else config.layers
    out_of_range = [index for index in indices if index >= len(layers)]
    if out_of_range:
        raise ValueError(
            f"config: layers {out_of_range} out of range: the model has {len(layers)} decoder "
            "layers"
        )
    reference = first_floating(bases[indices[0]])
    dtype = config.dtype or (
        reference.dtype if reference is not None else torch.get_default_dtype()
    )
    for device in {layer_device(bases[index]) for index in indices}:
        resolve_backend(torch.empty(0, dtype=dtype, device=device), config.backend)
    new_layers, branch_ends = [], {}
    for index in indices:
        block = layers[index]
        if not isinstance(block, SteeredBlock):
            new_layers.append(_plan_layer(index, block, config))
            continue
        missing = [
            site
            for site in config.site
            if site != "block" and block.path == PATH_PLAIN and site not in block._branch_ends
        ]
        if missing:
            ends = branch_end_paths(block.base_layer) or {}
            unknown = [site for site in missing if site not in ends]
            if unknown:
                raise ValueError(
                    f"config: site {unknown}: layer {index} ({type(block.base_layer).__name__}) "
                    "is not in the family table, so its branch outputs are unknown"
                )
            branch_ends[index] = {site: ends[site] for site in missing}
    filled = _filled(config, model, hidden_size, len(layers))
    return NamedAdapterPlan(filled, dtype, tuple(new_layers), branch_ends)


def apply_named_adapter(
    model: nn.Module, layers_name: str, adapter_name: str, plan: NamedAdapterPlan
) -> None:
    """Add the planned adapter as ``adapter_name`` to every layer it steers (new SteeredBlocks,
    holding no default adapter, for layers that had none). Every module is built first, so a
    failure leaves ``model`` as it was. New blocks start with the default adapter active: the
    caller sets every block's ``active_adapter``."""
    layers = model.get_submodule(layers_name)
    config = plan.config
    new_blocks = {
        layer_plan.index: SteeredBlock(layers[layer_plan.index], {}, layer_plan)
        for layer_plan in plan.new_layers
    }
    indices = range(len(layers)) if config.layers is None else config.layers
    modules = {}
    for index in indices:
        base = new_blocks[index].base_layer if index in new_blocks else layers[index].base_layer
        device = layer_device(base)
        modules[index] = {site: make_steering(config, device, plan.dtype) for site in config.site}
    for index, block in new_blocks.items():
        layers[index] = block
        block.attach()
    for index in indices:
        layers[index].add_adapter(adapter_name, modules[index], plan.branch_ends.get(index, {}))


def apply_steering_plan(model: nn.Module, plan: SteeringPlan) -> dict[int, SteeredBlock]:
    """Put a SteeredBlock in place of each planned layer; returns the new blocks by index.

    Every block is built before the first layer is replaced, so a failure leaves ``model`` as
    it was. Steering modules start as the identity on their layer's device.
    """
    layers = model.get_submodule(plan.layers_name)
    config = plan.config
    blocks = {}
    for layer_plan in plan.layers:
        layer = layers[layer_plan.index]
        device = layer_device(layer)
        adapters = {site: make_steering(config, device, plan.dtype) for site in config.site}
        blocks[layer_plan.index] = SteeredBlock(layer, adapters, layer_plan)
    for index, block in blocks.items():
        layers[index] = block
        block.attach()
    return blocks


def inject_steering(model: nn.Module, config: SteerConfig) -> dict[int, SteeredBlock]:
    """Steer ``model`` in place: validate, then replace the chosen decoder layers by
    SteeredBlocks. Returns the new blocks by layer index (``block.adapters()`` gives their
    steering modules by site). Parameters' requires_grad are left as they are (SteerModel
    freezes the base model)."""
    return apply_steering_plan(model, plan_steering(model, config))


def steered_blocks(model: nn.Module) -> dict[int, SteeredBlock]:
    """The SteeredBlocks in ``model``, by decoder-layer index."""
    return {
        module.layer_index: module for module in model.modules() if isinstance(module, SteeredBlock)
    }


def remove_steering(model: nn.Module) -> dict[int, SteeredBlock]:
    """Put every steered layer's original module back (and take the branch hooks off); returns
    the removed blocks by index."""
    removed = {}
    for module in list(model.modules()):
        if not isinstance(module, nn.ModuleList):
            continue
        for position, block in enumerate(module):
            if isinstance(block, SteeredBlock):
                block.detach()
                module[position] = block.base_layer
                removed[block.layer_index] = block
    return removed
