"""The model under test: a transformers config with random weights, and its batch of tokens.

Nothing is downloaded. The config is either a transformers config class given by name (sized by
a preset, then overridden by explicit keyword arguments) or a local ``config.json`` (a file or
a model folder), which profiles the user's own architecture with random weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from .presets import ModelPreset

_CONFIG_BASE = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig


@dataclass
class ModelSpec:
    """A config and the dtype to instantiate it in; ``name`` is what the records call it."""

    name: str
    config: object
    dtype: torch.dtype

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)


def resolve_config_class(name: str) -> type:
    """``getattr(transformers, name)``, checked to be a config class."""
    candidate = getattr(transformers, name, None)
    if not (isinstance(candidate, type) and issubclass(candidate, _CONFIG_BASE)):
        raise ValueError(
            f"config must name a transformers config class (e.g. LlamaConfig, MistralConfig, "
            f"Qwen2Config) or be a path to a config.json or model folder, got {name!r}"
        )
    return candidate


def build_spec(
    preset: ModelPreset,
    config: str | None = None,
    config_kwargs: dict | None = None,
    dtype: torch.dtype | None = None,
) -> ModelSpec:
    """The config to benchmark.

    - ``config`` None: a LlamaConfig with the preset's sizes.
    - ``config`` a class name: that class with the preset's sizes.
    - ``config`` a path to a config.json or a folder holding one: that config as written.
    ``config_kwargs`` then override any field. ``dtype`` defaults to the preset's.
    """
    overrides = dict(config_kwargs or {})
    dtype = dtype or preset.dtype
    if config is not None and Path(config).exists():
        path = Path(config)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"config folder {str(path)!r} has no config.json")
        with open(file, encoding="utf-8") as handle:
            values = json.load(handle)
        if "model_type" not in values:
            raise ValueError(f"config file {str(file)!r} has no model_type")
        values.update(overrides)
        model_type = values.pop("model_type")
        built = _instantiate(
            lambda: transformers.AutoConfig.for_model(model_type, **values), str(file)
        )
        name = f"{type(built).__name__}({file})"
    else:
        config_class = resolve_config_class(config or "LlamaConfig")
        built = _instantiate(
            lambda: config_class(**{**preset.sizes, **overrides}), config_class.__name__
        )
        name = f"{config_class.__name__}[{preset.name}]"
    if overrides:
        name += " " + json.dumps(overrides, sort_keys=True)
    for field in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if not isinstance(getattr(built, field, None), int):
            raise ValueError(f"config {name} has no integer {field}; a decoder-only LM is needed")
    return ModelSpec(name=name, config=built, dtype=dtype)


def _instantiate(make, what: str):
    """Build a config, turning transformers' own validation errors into a ValueError."""
    try:
        return make()
    except Exception as error:  # transformers raises its own error types for bad fields
        message = " ".join(str(error).split())
        raise ValueError(f"config {what} rejected its arguments: {message}") from error


def build_model(spec: ModelSpec, device: torch.device, seed: int) -> nn.Module:
    """A causal LM with random weights, created directly on ``device`` in ``spec.dtype``.

    The same seed gives the same weights, so every method starts from the same model.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(spec.config, dtype=spec.dtype)
    return model


def make_tokens(spec: ModelSpec, batch: int, seq_len: int, device: torch.device, seed: int):
    """[batch, seq_len] token ids drawn uniformly from the vocabulary, fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, spec.vocab_size, (batch, seq_len), generator=generator)
    return tokens.to(device)
