"""What every saved form of SteerModel and JointModel has in common: the extra-state tensor, JSON
and safetensors files, Trainer checkpoints, and the checks a loaded state must pass.

A model's adapters reach the disk in one of two forms, and both models read both:

- ``save_pretrained`` directories: a JSON config per part and its tensors in safetensors
  (``steering_files`` for the steering part, ``steer_fast.joint.files`` for PEFT's LoRA part);
- transformers Trainer checkpoints: model.safetensors holding the wrapper's ``state_dict()``,
  which keeps only adapter tensors plus the configs as "_extra_state", a 1-D uint8 tensor of
  JSON (nn.Module's ``get_extra_state`` mechanism).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import SteerConfig
from ..constants import EXTRA_STATE_KEY, TRAINER_WEIGHTS_NAME

# The SteerConfig fields a loaded state must agree on (the scale may differ: it is taken over).
# The base model's name and revision (constants.BASE_MODEL_FIELDS) are a record, not compared: an
# adapter loads onto any base of the right shape, a local copy or a quantized one included.
STEER_STRUCTURE = ("rank", "activation", "bias", "site", "layers", "hidden_size", "num_layers")


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
