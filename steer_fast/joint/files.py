"""A JointModel's saved state: PEFT's files for the LoRA part beside steer_fast's own.

``JointModel.save_pretrained`` writes one folder holding

- adapter_config.json, adapter_model.safetensors: PEFT's files, with the keys of the model
  without steering, so that ``peft.PeftModel.from_pretrained`` loads the LoRA part alone;
- steer_config.json, steer_model.safetensors: the steering part, as ``SteerModel`` writes it;
- joint_config.json: the joint type, its format version and the orthogonality settings.

Format versions of joint_config.json and of the "_extra_state": 1 held an orthogonality config
without "constraint" (steer_fast's up-projection constraint was the only one), read as
``constraint="up_projection"``; 2 holds every field of ``OrthogonalityConfig``, the constraint
included.

A Trainer checkpoint of a JointModel is model.safetensors holding its state_dict, with the three
configs in the "_extra_state" JSON. What both forms share with SteerModel's is read by
``steer_fast.saved_state``.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, set_peft_model_state_dict

from ..config import SteerConfig, check_format_version
from ..constants import (
    BASE_MODEL_FIELDS,
    CONFIG_NAME,
    DEFAULT_ADAPTER_NAME,
    JOINT_CONFIG_NAME,
    JOINT_FORMAT_VERSION,
    JOINT_TYPE,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    TRAINER_WEIGHTS_NAME,
    WEIGHTS_NAME,
)
from ..model_card import CardContents, card_contents
from ..saving.legacy import is_legacy_format, upgrade_state_dict_keys
from ..saving.state import check_directory, read_json_object, read_tensors, read_trainer_checkpoint
from ..saving.steering_files import read_steering_files
from ..shims import PEFT_MODEL_PREFIX
from ..wrapper import SteeringWrapper
from .constraint import LORA_ADAPTER_NAME
from .orthogonality import OrthogonalityConfig

# Every file JointModel.save_pretrained writes.
JOINT_FILES = (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, CONFIG_NAME, WEIGHTS_NAME, JOINT_CONFIG_NAME)
# SteeredBlock keeps the layer it wraps as ``base_layer``: every module path inside a steered
# layer has this extra segment while steering is in place.
_BLOCK_SEGMENT = "base_layer."
# The LoRA settings a state_dict must agree on to be loaded into a JointModel.
LORA_STRUCTURE = (
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


class KeyMap:
    """Maps PEFT state-dict keys between the live model (steered layers have an extra
    ``base_layer.`` segment) and PEFT's files (the plain model's paths)."""

    def __init__(self, layers_name: str, steered: set[int]) -> None:
        layers = re.escape(PEFT_MODEL_PREFIX + layers_name)
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


# ----------------------------------------------------------------------------------------------
# The LoRA config and the joint state
# ----------------------------------------------------------------------------------------------


def _json_ready(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def lora_config_dict(config: LoraConfig) -> dict[str, Any]:
    """``config`` as a JSON-ready dict (sets as sorted lists)."""
    return json.loads(json.dumps(config.to_dict(), default=_json_ready, sort_keys=True))


def lora_differences(saved: dict[str, Any], current: LoraConfig) -> dict[str, tuple[Any, Any]]:
    """Field -> (saved, current) for every LoRA setting in LORA_STRUCTURE that differs."""
    current_values = lora_config_dict(current)
    return {
        f"lora {name}": (saved.get(name), current_values.get(name))
        for name in LORA_STRUCTURE
        if saved.get(name) != current_values.get(name)
    }


def read_lora_config(source: Path | dict[str, Any]) -> LoraConfig:
    """The trainable LoraConfig in a directory holding adapter_config.json (read by PEFT's
    ``PeftConfig.from_pretrained``) or in a dict of its fields; ValueError otherwise."""
    where = str(source / PEFT_CONFIG_NAME) if isinstance(source, Path) else "the saved state"
    try:
        if isinstance(source, Path):
            config = PeftConfig.from_pretrained(str(source))
        else:
            config = PeftConfig.from_peft_type(**source)
    except (TypeError, KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{where} does not hold a valid PEFT config: {error}") from error
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{where} holds a {type(config).__name__}, not a LoRA config")
    config.inference_mode = False
    return config


def check_joint_values(values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` (joint_config.json or the extra state) if they are a joint state of a format
    this steer_fast reads; ValueError otherwise."""
    if values.get("joint_type") != JOINT_TYPE:
        raise ValueError(f"{source} is not a {JOINT_TYPE} joint state")
    check_format_version(values.get("format_version"), JOINT_FORMAT_VERSION, source)
    return values


def read_orthogonality(values: dict[str, Any]) -> OrthogonalityConfig:
    """The orthogonality config of checked joint values, with the meaning of their format
    version: format 1 knew one constraint, the up-projection one."""
    saved = values.get("orthogonality")
    if values["format_version"] == 1 and isinstance(saved, dict):
        saved = {"constraint": "up_projection", **saved}
    return OrthogonalityConfig.from_dict(saved)


def peft_config_to_save(
    lora_config: LoraConfig, model: torch.nn.Module, steer_config: SteerConfig | None = None
) -> tuple[LoraConfig, dict[str, str] | None]:
    """The LoRA config as PeftModel.save_pretrained writes it: inference_mode on, the base
    model's name and revision filled in (where PEFT left them None: from ``steer_config``'s
    record, else the model's name), and the model class for a config without task_type."""
    config = copy.deepcopy(lora_config)
    for name in BASE_MODEL_FIELDS if steer_config is not None else ():
        if getattr(config, name, None) is None:
            setattr(config, name, getattr(steer_config, name))
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


def joint_card_contents(joint: SteeringWrapper) -> CardContents:
    """What the model card of a JointModel's save says: its steering adapter, LoRA part and
    orthogonality settings."""
    lora = joint.lora_config
    settings = {"r": lora.r, "lora_alpha": lora.lora_alpha}
    targets = lora.target_modules
    settings["target_modules"] = sorted(targets) if isinstance(targets, set) else targets
    settings.update({name: True for name in ("use_rslora", "use_dora") if getattr(lora, name)})
    return card_contents(
        joint.get_base_model(),
        {DEFAULT_ADAPTER_NAME: joint.steer_config},
        lora=settings,
        orthogonality=joint.orthogonality.to_dict(),
    )


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


@dataclass
class SavedJoint:
    """What a save_pretrained directory or a Trainer checkpoint holds, read and checked."""

    steer_config: SteerConfig
    lora_config: LoraConfig
    orthogonality: OrthogonalityConfig
    source: Path
    steering_tensors: dict[str, torch.Tensor] | None = None  # save_pretrained: file keys
    lora_tensors: dict[str, torch.Tensor] | None = None  # save_pretrained: PEFT's file keys
    state_dict: dict[str, torch.Tensor] | None = None  # Trainer checkpoint: JointModel keys
    # A Trainer checkpoint of format 2 or earlier: its steering keys lack the adapter segment.
    legacy_keys: bool = False

    def load_into(self, joint: SteeringWrapper) -> None:
        """Copy the saved weights into ``joint`` (a JointModel); ValueError if they do not fit
        it."""
        if self.state_dict is not None:
            state_dict = dict(self.state_dict)
            if self.legacy_keys:
                upgrade_state_dict_keys(state_dict)
            result = joint.load_state_dict(state_dict, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ValueError(
                    f"{self.source} does not fit the joint model: missing "
                    f"{result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}"
                )
            return
        live = {joint.key_map.to_live(key): value for key, value in self.lora_tensors.items()}
        try:
            result = set_peft_model_state_dict(joint.peft_model, live, LORA_ADAPTER_NAME)
        except RuntimeError as error:  # shape mismatches
            raise ValueError(f"{self.source / PEFT_WEIGHTS_NAME} does not fit: {error}") from error
        lora_keys = {name.removeprefix("peft_model.") for name, _ in joint.lora_named_parameters()}
        missing = [key for key in result.missing_keys if key in lora_keys]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{self.source / PEFT_WEIGHTS_NAME} does not fit the LoRA config: missing "
                f"{missing[:8]}, unexpected {list(result.unexpected_keys)[:8]}"
            )
        joint.load_steering_tensors(self.steering_tensors)


def _read_joint_directory(directory: Path) -> SavedJoint:
    missing = [name for name in JOINT_FILES if not (directory / name).is_file()]
    if missing:
        raise ValueError(f"{directory} is a joint adapter directory without {missing}")
    joint_file = directory / JOINT_CONFIG_NAME
    joint = check_joint_values(read_json_object(joint_file), str(joint_file))
    orthogonality = read_orthogonality(joint)
    steer_config, steering_tensors = read_steering_files(directory)
    lora_config = read_lora_config(directory)
    lora_tensors = read_tensors(directory / PEFT_WEIGHTS_NAME)
    if not lora_tensors:
        raise ValueError(f"{directory / PEFT_WEIGHTS_NAME} holds no tensor")
    return SavedJoint(
        steer_config,
        lora_config,
        orthogonality,
        directory,
        steering_tensors=steering_tensors,
        lora_tensors=lora_tensors,
    )


def read_saved_joint(directory: Path) -> SavedJoint:
    """What a ``JointModel.save_pretrained`` directory or a Trainer checkpoint of a JointModel
    holds, read and checked (nothing loaded into a model yet)."""
    check_directory(directory)
    if (directory / JOINT_CONFIG_NAME).is_file():
        return _read_joint_directory(directory)
    checkpoint = read_trainer_checkpoint(directory, "JointModel")
    if checkpoint is None:
        raise ValueError(
            f"{directory} holds neither {JOINT_CONFIG_NAME} and the adapter files "
            f"(JointModel.save_pretrained) nor {TRAINER_WEIGHTS_NAME} (a Trainer checkpoint of a "
            "JointModel)"
        )
    state, state_dict = checkpoint
    source = str(directory / TRAINER_WEIGHTS_NAME)
    check_joint_values(state, source)
    steer_values = state["steer_config"]
    return SavedJoint(
        SteerConfig.from_dict(steer_values),
        read_lora_config(state["lora_config"]),
        read_orthogonality(state),
        directory,
        state_dict=state_dict,
        legacy_keys=is_legacy_format(steer_values.get("format_version")),
    )
