"""The model under test: a named preset or a transformers config, random weights, random tokens.

Nothing is downloaded. A preset gives the sizes of a decoder-only model, its dtype and the batch
it is benchmarked with; the default depends on the device: "cpu-small" on the CPU (a training
step takes about a second on one core), "llama-3.2-1b" on a GPU (Llama-3.2-1B's shapes). The
config is a transformers config class given by name (sized by the preset, then overridden by
explicit keyword arguments) or a local ``config.json`` (a file or a model folder), which
profiles the user's own architecture.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn

_CONFIG_BASE = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig


@dataclass(frozen=True)
class ModelPreset:
    """A model size and the batch to benchmark it with. ``sizes`` are keyword arguments of the
    config class; ``decode_tokens`` is how many tokens the inference suite decodes."""

    name: str
    description: str
    sizes: dict[str, int | bool | float] = field(hash=False)
    dtype: torch.dtype
    batch: int
    seq_len: int
    rank: int
    decode_tokens: int


def _sizes(d: int, ffn: int, layers: int, heads: int, kv: int, vocab: int, positions: int, **extra):
    """Config keyword arguments of a Llama-style decoder with tied embeddings."""
    return dict(
        hidden_size=d,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=positions,
        tie_word_embeddings=True,
        **extra,
    )


# name, description, sizes (d, MLP, layers, heads, KV heads, vocab, positions), dtype, batch,
# seq_len, rank, decode_tokens
PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            "tiny",
            "2 layers, d = 64: a smoke test of the machinery",
            _sizes(64, 128, 2, 4, 2, 256, 512),
            torch.float32,
            2,
            16,
            4,
            4,
        ),
        ModelPreset(
            "cpu-small",
            "Llama-style, 6 layers, d = 512, 8 heads (4 KV), vocab 8192: ~21M params",
            _sizes(512, 1376, 6, 8, 4, 8192, 2048),
            torch.float32,
            4,
            256,
            16,
            32,
        ),
        ModelPreset(
            "llama-3.2-1b",
            "Llama-3.2-1B shapes (16 layers, d = 2048, 32 heads, 8 KV, vocab 128256)",
            _sizes(2048, 8192, 16, 32, 8, 128256, 131072, rope_theta=500000.0, rms_norm_eps=1e-5),
            torch.bfloat16,
            4,
            1024,
            16,
            64,
        ),
    )
}


@dataclass
class ModelSpec:
    """A config and the dtype to instantiate it in; ``name`` is what the records call it."""

    name: str
    config: object
    dtype: torch.dtype

    hidden_size = property(lambda self: int(self.config.hidden_size))
    num_layers = property(lambda self: int(self.config.num_hidden_layers))
    vocab_size = property(lambda self: int(self.config.vocab_size))


def build_spec(
    preset: ModelPreset,
    config: str | None = None,
    config_kwargs: dict | None = None,
    dtype: torch.dtype | None = None,
) -> ModelSpec:
    """The config to benchmark: with ``config`` None a LlamaConfig, with a class name that class,
    both sized by the preset; with a path to a config.json or a folder holding one, that config
    as written. ``config_kwargs`` then override any field. ``dtype`` defaults to the preset's."""
    overrides, config_class = dict(config_kwargs or {}), None
    if config is not None and Path(config).exists():
        file = Path(config) / "config.json" if Path(config).is_dir() else Path(config)
        if not file.is_file():
            raise ValueError(f"config folder {str(Path(config))!r} has no config.json")
        values = json.loads(file.read_text(encoding="utf-8"))
        if "model_type" not in values:
            raise ValueError(f"config file {str(file)!r} has no model_type")
        values.update(overrides)
        model_type, what = values.pop("model_type"), str(file)
        make = lambda: transformers.AutoConfig.for_model(model_type, **values)
    else:
        what = config or "LlamaConfig"
        config_class = getattr(transformers, what, None)
        if not (isinstance(config_class, type) and issubclass(config_class, _CONFIG_BASE)):
            raise ValueError(
                "config must name a transformers config class (e.g. LlamaConfig, MistralConfig, "
                f"Qwen2Config) or be a path to a config.json or model folder, got {what!r}"
            )
        make = lambda: config_class(**{**preset.sizes, **overrides})
    try:
        built = make()
    except Exception as error:  # transformers raises its own error types for bad fields
        raise ValueError(
            f"config {what} rejected its arguments: {' '.join(str(error).split())}"
        ) from error
    name = f"{type(built).__name__}({file})" if config_class is None else f"{what}[{preset.name}]"
    if overrides:
        name += " " + json.dumps(overrides, sort_keys=True)
    for size in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if not isinstance(getattr(built, size, None), int):
            raise ValueError(f"config {name} has no integer {size}; a decoder-only LM is needed")
    return ModelSpec(name, built, dtype or preset.dtype)


def build_model(spec: ModelSpec, device: torch.device, seed: int) -> nn.Module:
    """A causal LM with random weights, created directly on ``device`` in ``spec.dtype``; the
    same seed gives the same weights, so every method starts from the same model."""
    torch.manual_seed(seed)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(spec.config, dtype=spec.dtype)


def make_tokens(spec: ModelSpec, batch: int, seq_len: int, device: torch.device, seed: int):
    """[batch, seq_len] token ids drawn uniformly from the vocabulary, fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.vocab_size, (batch, seq_len), generator=generator).to(device)


def forward_parameters(module: nn.Module) -> set[str]:
    """The parameter names of the forwards of the transformers models in ``module`` (itself or
    inside a wrapper such as PEFT's or pyvene's), e.g. to see whether they take
    ``logits_to_keep``, or the KV cache as ``cache`` (transformers >= 5.24) or as
    ``past_key_values``."""
    return {
        name
        for m in module.modules()
        if hasattr(m, "generate") and hasattr(m, "config") and hasattr(type(m), "forward")
        for name in inspect.signature(type(m).forward).parameters
    }
