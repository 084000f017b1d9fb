"""The steering part of a saved adapter: steer_config.json and steer_model.safetensors, and the
steering tensors inside a Trainer checkpoint.

steer_model.safetensors holds one adapter, its tensors keyed by layer and site
(``steering_file_key``: "layers.{index}.{down,up}.{weight,bias}" or "layers.{index}.vector" at
"block", "layers.{index}.{site}.{...}" at "attn" and "mlp"). A Trainer checkpoint's
model.safetensors holds the wrapper's state_dict, where every adapter's tensors are named by
``steer_fast.constants``' rule (older formats: ``legacy``); the extra state lists the adapters'
configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import SteerConfig
from ..constants import (
    CONFIG_NAME,
    DEFAULT_ADAPTER_NAME,
    NAMED_ADAPTERS_KEY,
    TRAINER_WEIGHTS_NAME,
    WEIGHTS_NAME,
    parse_steering_key,
    steering_file_key,
)
from .legacy import is_legacy_format, parse_legacy_steering_key
from .state import check_directory, read_tensors, read_trainer_checkpoint, write_tensors


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
    state_dict: dict[str, torch.Tensor],
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    format_version: int | None = None,
) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s steering tensors in a wrapper's state_dict, keyed as in
    steer_model.safetensors. ``format_version`` is the saved config's (``legacy`` reads the key
    names of formats before ``NAMED_KEYS_FORMAT_VERSION``)."""
    parse = parse_legacy_steering_key if is_legacy_format(format_version) else parse_steering_key
    tensors = {}
    for key, tensor in state_dict.items():
        parsed = parse(key)
        if parsed is not None and parsed.adapter == adapter_name:
            tensors[steering_file_key(parsed.index, parsed.site, parsed.tensor)] = tensor
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
    saved_format = state.get("format_version")
    adapters = {}
    for name, config in {DEFAULT_ADAPTER_NAME: default, **named}.items():
        tensors = steering_file_tensors(state_dict, name, saved_format)
        check_steering_tensors(config, tensors, directory / TRAINER_WEIGHTS_NAME)
        adapters[name] = (config, tensors)
    return adapters
