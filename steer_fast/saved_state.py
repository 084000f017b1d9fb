"""Saved state of SteerModel and JointModel: files, state_dict extra state, Trainer checkpoints.

A model's adapters reach the disk in one of two forms, and both models read both:

- ``save_pretrained`` directories: a JSON config per part and its tensors in safetensors.
  The steering part is steer_config.json (``SteerConfig.to_json_string``) and
  steer_model.safetensors with keys "layers.{index}.{down,up}.{weight,bias}".
- transformers Trainer checkpoints: model.safetensors holding the wrapper's ``state_dict()``,
  which keeps only adapter tensors plus the configs as "_extra_state", a 1-D uint8 tensor of
  JSON (nn.Module's ``get_extra_state`` mechanism).

This module owns what those forms have in common: the state tensor's encoding, reading JSON and
safetensors files, the checks that saved tensors fit their config, the structural fields a
loaded state must agree on, and the steering part's reading. The LoRA part's PEFT files are read
by ``steer_fast.joint.files`` with these functions.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .block import ADAPTER_NAME
from .config import CONFIG_NAME, WEIGHTS_NAME, SteerConfig
from .mixed_batch import DEFAULT_ADAPTER_NAME

EXTRA_STATE_KEY = "_extra_state"  # nn.Module's key for get_extra_state()
TRAINER_WEIGHTS_NAME = "model.safetensors"  # what transformers.Trainer saves a state_dict as
# The SteerConfig fields a loaded state must agree on (the scale may differ: it is taken over).
STEER_STRUCTURE = ("rank", "activation", "bias", "site", "layers", "hidden_size", "num_layers")

# In a SteerModel's extra state: its adapters other than "default", as [name, config] pairs in
# the order they were loaded (the state's JSON sorts object keys); absent when it has none, so
# that a one-adapter state is what it always was.
NAMED_ADAPTERS_KEY = "named_adapters"

# A steering parameter in a wrapper's state_dict: the default adapter's
# "...{index}.steer_adapter[_attn|_mlp].{down.weight, up.bias, vector, ...}", another adapter's
# "...{index}.steer_adapters.{name}.steer_adapter[_attn|_mlp].{...}".
_STATE_DICT_KEY = re.compile(
    rf"(?:^|\.)(\d+)\.(?:steer_adapters\.([A-Za-z0-9_-]+)\.)?{ADAPTER_NAME}(?:_(attn|mlp))?\."
    r"((?:down|up)\.(?:weight|bias)|vector)$"
)


def steering_file_key(index: int, site: str, name: str) -> str:
    """The steer_model.safetensors key of tensor ``name`` ("down.weight", "vector", ...) of
    layer ``index``'s steering at ``site``: "layers.{index}.{name}" at "block" (the original
    layout), "layers.{index}.{site}.{name}" at "attn" and "mlp"."""
    return f"layers.{index}.{name}" if site == "block" else f"layers.{index}.{site}.{name}"


# ----------------------------------------------------------------------------------------------
# Encodings and files
# ----------------------------------------------------------------------------------------------


def encode_state(values: dict[str, Any]) -> torch.Tensor:
    """``values`` as the uint8 tensor of JSON (sorted keys) that ``get_extra_state`` returns."""
    text = json.dumps(values, sort_keys=True).encode("utf-8")
    return torch.tensor(list(text), dtype=torch.uint8)


def decode_state(state: object, what: str) -> dict[str, Any]:
    """The JSON object in an extra-state tensor; ValueError naming ``what`` if it is not one."""
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
        raise ValueError(f"the saved {what} state must be a 1-D uint8 tensor of JSON")
    try:
        values = json.loads(bytes(state.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"the saved {what} state is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"the saved {what} state must hold a JSON object")
    return values


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ValueError if the file is not valid JSON or not an object."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return values


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, by key."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` (CPU, contiguous) as a safetensors file with PyTorch's metadata."""
    save_file(tensors, str(path), metadata={"format": "pt"})


def read_trainer_checkpoint(
    directory: Path, what: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(decoded extra state, every tensor by state-dict key) of a Trainer checkpoint in
    ``directory``, or None if it holds none. ``what`` names the model for error messages.

    Raises:
        ValueError: if model.safetensors has no extra state (not a ``what`` state_dict).
    """
    path = directory / TRAINER_WEIGHTS_NAME
    if not path.is_file():
        return None
    tensors = read_tensors(path)
    if EXTRA_STATE_KEY not in tensors:
        raise ValueError(f"{path} is not a {what} state_dict (it has no {EXTRA_STATE_KEY})")
    return decode_state(tensors.pop(EXTRA_STATE_KEY), what), tensors


def check_directory(directory: Path) -> Path:
    """``directory`` if it is one; ValueError otherwise."""
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    return directory


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def check_is_trainable(is_trainable: object) -> bool:
    """The ``is_trainable`` argument of ``from_pretrained``, checked."""
    if not isinstance(is_trainable, bool):
        raise ValueError(f"is_trainable must be True or False, got {is_trainable!r}")
    return is_trainable


def with_backend(config: SteerConfig, backend: str | None) -> SteerConfig:
    """``config`` with its backend replaced by ``backend`` (``from_pretrained(backend=...)``),
    or as it is when ``backend`` is None."""
    return config if backend is None else dataclasses.replace(config, backend=backend)


def structural_differences(
    saved: SteerConfig, current: SteerConfig, label: str = ""
) -> dict[str, tuple[Any, Any]]:
    """Field -> (saved, current) for every structural SteerConfig field that differs."""
    return {
        f"{label}{name}": (getattr(saved, name), getattr(current, name))
        for name in STEER_STRUCTURE
        if getattr(saved, name) != getattr(current, name)
    }


def raise_if_different(differing: dict[str, tuple[Any, Any]], what: str) -> None:
    """ValueError listing ``differing`` (from ``structural_differences``), if any."""
    if differing:
        raise ValueError(
            f"the state_dict was saved for another {what} (saved, current): {differing}"
        )


def is_adapter_key(key: str, adapter_keys: set[str]) -> bool:
    """Whether state-dict ``key`` (maybe under an enclosing module's prefix) is one of
    ``adapter_keys`` (keys relative to the wrapper)."""
    parts = key.split(".")
    return any(".".join(parts[start:]) in adapter_keys for start in range(len(parts)))


# ----------------------------------------------------------------------------------------------
# The steering part
# ----------------------------------------------------------------------------------------------


def steering_file_shapes(config: SteerConfig) -> dict[str, tuple[int, ...]]:
    """File key -> shape of every tensor an adapter saved with ``config`` holds."""
    rank, hidden = config.rank, config.hidden_size
    if rank == 0:
        per_site = {"vector": (hidden,)}
    else:
        per_site = {"down.weight": (rank, hidden), "up.weight": (hidden, rank)}
        if config.bias:
            per_site.update({"down.bias": (rank,), "up.bias": (hidden,)})
    return {
        steering_file_key(index, site, name): shape
        for index in (range(config.num_layers) if config.layers is None else config.layers)
        for site in config.site
        for name, shape in per_site.items()
    }


def check_steering_tensors(
    config: SteerConfig, tensors: dict[str, torch.Tensor], source: Path
) -> None:
    """ValueError unless ``tensors`` (by file key) are exactly what ``config`` describes."""
    if config.hidden_size is None or config.num_layers is None:
        raise ValueError(f"{source}: the steer config lacks hidden_size / num_layers")
    expected = steering_file_shapes(config)
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


def has_steering_files(directory: Path) -> bool:
    return (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file()


def write_steering_files(
    directory: Path, config: SteerConfig, tensors: dict[str, torch.Tensor]
) -> None:
    """Write steer_config.json and steer_model.safetensors (``steering_tensors()``) into
    ``directory``."""
    write_tensors(tensors, directory / WEIGHTS_NAME)
    (directory / CONFIG_NAME).write_text(config.to_json_string(), encoding="utf-8")


def read_steering_files(directory: Path) -> tuple[SteerConfig, dict[str, torch.Tensor]]:
    """(config, tensors by file key) from steer_config.json and steer_model.safetensors."""
    config = SteerConfig.from_json_file(directory / CONFIG_NAME)
    tensors = read_tensors(directory / WEIGHTS_NAME)
    check_steering_tensors(config, tensors, directory / WEIGHTS_NAME)
    return config, tensors


def steering_file_tensors(
    state_dict: dict[str, torch.Tensor], adapter_name: str = DEFAULT_ADAPTER_NAME
) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s steering tensors in a wrapper's state_dict, keyed as in
    steer_model.safetensors."""
    tensors = {}
    for key, tensor in state_dict.items():
        match = _STATE_DICT_KEY.search(key)
        if match and (match.group(2) or DEFAULT_ADAPTER_NAME) == adapter_name:
            index, _, site, name = match.groups()
            tensors[steering_file_key(int(index), site or "block", name)] = tensor
    return tensors


def split_named_state(values: dict[str, Any]) -> tuple[SteerConfig, dict[str, SteerConfig]]:
    """A SteerModel's extra state as (the default adapter's config, the others' by name)."""
    values = dict(values)
    named = values.pop(NAMED_ADAPTERS_KEY, [])
    if not isinstance(named, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) for pair in named
    ):
        raise ValueError(f"{NAMED_ADAPTERS_KEY} must be [name, config] pairs, got {named!r}")
    return SteerConfig.from_dict(values), {
        name: SteerConfig.from_dict(config) for name, config in named
    }


def read_steering(directory: Path) -> tuple[SteerConfig, dict[str, torch.Tensor]]:
    """(config, tensors by file key) of the default adapter of a ``SteerModel.save_pretrained``
    directory (the one at its top) or of a transformers Trainer checkpoint of a SteerModel."""
    return read_all_steering(directory)[DEFAULT_ADAPTER_NAME]


def read_all_steering(
    directory: Path,
) -> dict[str, tuple[SteerConfig, dict[str, torch.Tensor]]]:
    """Adapter name -> (config, tensors by file key), "default" first: the top-level adapter of a
    ``SteerModel.save_pretrained`` directory (the others are in subfolders, read one at a time),
    or every adapter of a transformers Trainer checkpoint of a SteerModel (model.safetensors
    holding its state_dict)."""
    check_directory(directory)
    if has_steering_files(directory):
        return {DEFAULT_ADAPTER_NAME: read_steering_files(directory)}
    checkpoint = read_trainer_checkpoint(directory, "SteerModel")
    if checkpoint is None:
        raise ValueError(
            f"{directory} holds neither {CONFIG_NAME} + {WEIGHTS_NAME} "
            f"(SteerModel.save_pretrained) nor {TRAINER_WEIGHTS_NAME} (a Trainer checkpoint of a "
            "SteerModel)"
        )
    state, state_dict = checkpoint
    default, named = split_named_state(state)
    adapters = {}
    for name, config in {DEFAULT_ADAPTER_NAME: default, **named}.items():
        tensors = steering_file_tensors(state_dict, name)
        check_steering_tensors(config, tensors, directory / TRAINER_WEIGHTS_NAME)
        adapters[name] = (config, tensors)
    return adapters
