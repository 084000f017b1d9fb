"""Training a steered model on several processes: what DDP, FSDP and the Trainer need to know.

SteerModel and JointModel train under ``torch.distributed`` with the tools as they are: DDP,
FSDP2 (``torch.distributed.fsdp.fully_shard``), FSDP1 (``FullyShardedDataParallel``), and the
transformers Trainer, accelerate and TRL with their ``fsdp`` settings. What those tools cannot
know about a steered model is here:

- which modules to shard. FSDP2 shards each parameter on its own, so frozen base weights and
  trainable adapters may share a unit: ``fsdp2_modules(model)`` lists the decoder layers (each
  steered one a ``SteeredBlock``, its adapters inside) to ``fully_shard`` before the model.
  FSDP1 flattens the parameters of each unit into one flat parameter, which with
  ``use_orig_params=False`` must be all frozen or all trainable, and with ``True`` holds a
  gradient for every frozen weight flattened with a trainable one. ``fsdp_auto_wrap_policy``
  gives FSDP1 units that never mix them: the parameter-holding children of each steered layer
  (its attention, MLP, norms) are units, so that the SteeredBlock's own unit holds its adapters
  alone; LoRA's trainable modules are units of their own (as PEFT's policy makes them); a layer
  left unsteered is one unit. ``fsdp_unit_parameters`` says which parameters each unit holds.
- ``shard_batch``: this process's rows of a global batch (a world size that does not divide the
  batch is an error: the processes would average losses over unequal shares).
- ``is_main_process``: whether this process writes files (rank 0, or no process group);
  ``SteerModel.save_pretrained`` writes on it only. ``save_state_dict`` writes a model's
  adapters and configs, gathered from every process, as a Trainer checkpoint's
  model.safetensors (which ``SteerModel.from_pretrained`` and ``JointModel.from_pretrained``
  read): the way to save a JointModel that FSDP2 shards, whose ``save_pretrained`` needs whole
  tensors.

The Trainer (and TRL's trainers, which are Trainers) shard a steered model per SteeredBlock with
FSDP2 by themselves: accelerate's transformer-based wrap reads the model's
``_no_split_modules``, which a steer_fast model gives as its steered blocks' class (see
``SteeringWrapper._no_split_modules``). See docs/distributed.md for the commands.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .constants import TRAINER_WEIGHTS_NAME
from .injection.steered_block import SteeredBlock
from .saving.atomic import save_directory_atomically
from .saving.state import write_tensors
from .wrapper import SteeringWrapper


def is_main_process() -> bool:
    """Whether this process writes files: rank 0 of the default process group, or the only
    process when there is no group."""
    distributed = torch.distributed
    if not distributed.is_available() or not distributed.is_initialized():
        return True
    return distributed.get_rank() == 0


# The same, for the functions whose ``is_main_process`` argument takes the name.
_default_main_process = is_main_process


def save_state_dict(
    model: SteeringWrapper,
    save_directory: str | os.PathLike,
    is_main_process: bool | None = None,
) -> None:
    """Write ``model.state_dict()`` (its adapters and configs) to
    ``save_directory/model.safetensors``, the file of a Trainer checkpoint, which
    ``SteerModel.from_pretrained`` and ``JointModel.from_pretrained`` load.

    Every process calls it: a model FSDP2 shards is gathered whole with
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict(full_state_dict=True,
    cpu_offload=True)`` (a collective; the Trainer saves an FSDP2 model the same way). Only the
    main process (``is_main_process``, by default rank 0) writes, atomically as
    ``save_pretrained`` does.

    Raises:
        ValueError: if ``model`` is not a steered SteerModel or JointModel.
    """
    wrapper = _steered_wrapper(model)
    if _is_sharded(wrapper):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(wrapper, options=options)
    else:
        state = wrapper.state_dict()
    if not (_default_main_process() if is_main_process is None else is_main_process):
        return
    tensors = {key: tensor.detach().to("cpu").contiguous() for key, tensor in state.items()}
    save_directory_atomically(
        save_directory,
        lambda staging: write_tensors(tensors, Path(staging) / TRAINER_WEIGHTS_NAME),
        (TRAINER_WEIGHTS_NAME,),
    )


def _is_sharded(model: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


def shard_batch(
    batch: torch.Tensor | Mapping[str, torch.Tensor],
    rank: int | None = None,
    world_size: int | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """This process's share of a global batch: rows ``[rank * n, (rank + 1) * n)`` of the
    tensor (or of every tensor of a mapping), n = rows / world_size.

    With equal shares, the mean of the processes' mean losses (what DDP and FSDP average
    gradients over) is the mean loss of the global batch, so a run on several processes takes
    the steps one process takes on the whole batch. ``rank`` and ``world_size`` default to the
    default process group's (0 and 1 without one).

    Raises:
        ValueError: if ``world_size`` does not divide the batch's rows, ``rank`` is not in
            ``[0, world_size)``, or the tensors of ``batch`` have different numbers of rows.
    """
    distributed = torch.distributed
    grouped = distributed.is_available() and distributed.is_initialized()
    if world_size is None:
        world_size = distributed.get_world_size() if grouped else 1
    if rank is None:
        rank = distributed.get_rank() if grouped else 0
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    tensors = {"batch": batch} if isinstance(batch, torch.Tensor) else dict(batch)
    batched = all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in tensors.values())
    if not tensors or not batched:
        raise ValueError("batch must be a tensor or a mapping of tensors with a batch dimension")
    rows = {len(t) for t in tensors.values()}
    if len(rows) != 1:
        raise ValueError(f"batch: every tensor must have the same number of rows, got {rows}")
    (total,) = rows
    if total % world_size != 0:
        raise ValueError(
            f"world_size ({world_size}) must divide the global batch ({total} rows), so that "
            "every process gets the same number of rows and the average of their losses is the "
            "loss of the whole batch"
        )
    share = total // world_size
    shards = {k: t[rank * share : (rank + 1) * share] for k, t in tensors.items()}
    return shards["batch"] if isinstance(batch, torch.Tensor) else shards


# ----------------------------------------------------------------------------------------------
# Which modules to shard
# ----------------------------------------------------------------------------------------------


def _steered_wrapper(model: object) -> SteeringWrapper:
    if not isinstance(model, SteeringWrapper):
        raise ValueError(
            "model must be a steer_fast SteerModel or JointModel (before DDP or FSDP wraps it), "
            f"got {type(model).__name__}; steer it with get_steer_model or get_joint_model first"
        )
    try:
        blocks = model._steered_blocks()
    except AttributeError as error:  # unloaded: the wrapper holds no model
        raise ValueError(f"model: {error}") from None
    if not blocks:
        raise ValueError(f"model ({type(model).__name__}) has no steered layers")
    return model


def _decoder_layers(wrapper: SteeringWrapper) -> nn.ModuleList:
    return wrapper.get_base_model().get_submodule(wrapper.layers_name)


def fsdp2_modules(model: SteeringWrapper) -> list[nn.Module]:
    """The modules to give ``fully_shard`` before the model itself, in order: the model's
    decoder layers (a SteeredBlock for each steered one, its adapters inside)::

        for module in fsdp2_modules(model):
            fully_shard(module)
        fully_shard(model)

    Raises:
        ValueError: if ``model`` is not a steered SteerModel or JointModel.
    """
    return list(_decoder_layers(_steered_wrapper(model)))


def fsdp_wrap_modules(model: SteeringWrapper) -> list[nn.Module]:
    """The modules FSDP1 wraps as units under ``fsdp_auto_wrap_policy(model)`` (besides the
    model itself, the root unit): for each steered layer its SteeredBlock and the children of
    its original layer that hold parameters; each decoder layer left unsteered; and every other
    module with trainable parameters of its own (LoRA's A and B of a JointModel).

    Raises:
        ValueError: if ``model`` is not a steered SteerModel or JointModel.
    """
    wrapper = _steered_wrapper(model)
    units: list[nn.Module] = []
    steering: set[int] = set()
    for layer in _decoder_layers(wrapper):
        if isinstance(layer, SteeredBlock):
            units.extend(c for c in layer.base_layer.children() if _holds_parameters(c))
            steering.update(
                id(module)
                for name in layer.adapter_names()
                for adapter in layer.adapters(name).values()
                for module in adapter.modules()
            )
        units.append(layer)
    chosen = {id(unit) for unit in units}
    for module in wrapper.modules():
        if id(module) in steering or id(module) in chosen:
            continue
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            units.append(module)
            chosen.add(id(module))
    return units


def _holds_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def fsdp_unit_parameters(model: SteeringWrapper) -> dict[str, list[str]]:
    """Unit name ("" for the root unit, the model itself) -> the names of the parameters FSDP1
    flattens into that unit's flat parameter under ``fsdp_auto_wrap_policy(model)``: those of
    the unit's modules that no unit below it holds. A parameter two modules share (tied
    weights) goes to the unit that reaches it first.

    Raises:
        ValueError: if ``model`` is not a steered SteerModel or JointModel.
    """
    return {unit: [name for name, _ in named] for unit, named in _unit_groups(model).items()}


def _unit_groups(model: SteeringWrapper) -> dict[str, list[tuple[str, nn.Parameter]]]:
    units = {id(module) for module in fsdp_wrap_modules(model)}
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"": []}
    seen: set[int] = set()

    def visit(module: nn.Module, prefix: str, unit: str) -> None:
        if id(module) in units:
            unit = prefix
            groups.setdefault(unit, [])
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) not in seen:
                seen.add(id(parameter))
                groups[unit].append((f"{prefix}.{name}" if prefix else name, parameter))
        for name, child in module.named_children():
            visit(child, f"{prefix}.{name}" if prefix else name, unit)

    visit(model, "", "")
    return {unit: named for unit, named in groups.items() if named}


def fsdp_auto_wrap_policy(model: SteeringWrapper) -> Any:
    """FSDP1's ``auto_wrap_policy`` for a steered model: a
    ``torch.distributed.fsdp.wrap.CustomPolicy`` wrapping the modules of
    ``fsdp_wrap_modules(model)``, so that no flat parameter holds both frozen and trainable
    parameters. Build it after the model is steered (and LoRA put on), before FSDP wraps it::

        FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), ...)
        # the Trainer / accelerate with fsdp_config={"version": 1}:
        trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)

    Raises:
        ValueError: if ``model`` is not a steered SteerModel or JointModel, or if some module
            holds frozen and trainable parameters of its own (no set of units separates them).
    """
    from torch.distributed.fsdp.wrap import CustomPolicy

    for unit, named in _unit_groups(model).items():
        if len({parameter.requires_grad for _, parameter in named}) > 1:
            raise ValueError(
                f"model: FSDP unit {unit or '(root)'!r} would flatten frozen and trainable "
                f"parameters together ({[name for name, _ in named]}); no wrap policy can "
                "separate a module's own parameters"
            )
    chosen = {id(unit) for unit in fsdp_wrap_modules(model)}
    return CustomPolicy(lambda module: id(module) in chosen)
