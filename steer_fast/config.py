"""SteerConfig: what post-block steering to put on a model, saved as steer_config.json."""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import torch

from .constants import FORMAT_VERSION, SITES, STEER_TYPE
from .ops import BACKENDS, TORCH_DTYPES, TRITON_DTYPES
from .ops.checks import check_activation, check_scale

# How a low-rank adapter's down-projection starts: "published", Kaiming-uniform (a = sqrt 5)
# scaled by 1e-3 as in the paper's code; "lora", Kaiming-uniform as LoRA's A matrix.
INITS: tuple[str, ...] = ("published", "lora")

_DTYPE_NAMES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype for dtype in TORCH_DTYPES
}


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16: the spelling steer_config.json uses."""
    return str(dtype).removeprefix("torch.")


def _check_dtype(dtype: object) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)} or None, got {dtype!r}")
        return _DTYPE_NAMES[name]
    if not isinstance(dtype, torch.dtype) or dtype not in TORCH_DTYPES:
        raise ValueError(
            f"dtype must be one of {[str(d) for d in TORCH_DTYPES]} or None (the model's dtype): "
            f"the steering kernels do not support {dtype!r}"
        )
    return dtype


def check_format_version(version: object, newest: int, source: str = "the config") -> int:
    """``version`` if it is a format version this steer_fast reads (an integer in 1..newest);
    ValueError otherwise. Every saved format of steer_fast carries one."""
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= newest:
        raise ValueError(
            f"{source} has format_version {version!r}; this version of steer_fast reads 1..{newest}"
        )
    return version


def _check_sites(site: object) -> tuple[str, ...]:
    names = (site,) if isinstance(site, str) else site
    if isinstance(names, bytes) or not isinstance(names, Sequence) or not names:
        raise ValueError(f"site must be one of {SITES} or a list of them, got {site!r}")
    unknown = [name for name in names if name not in SITES]
    if unknown:
        raise ValueError(f"site must be one of {SITES} or a list of them, got {site!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"site must not repeat a site, got {site!r}")
    return tuple(name for name in SITES if name in names)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _check_name(name: str, value: object) -> str | None:
    """None, or ``value`` as a non-empty string (a path is taken as its string)."""
    if value is None:
        return None
    if isinstance(value, PathLike):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be None or a non-empty string, got {value!r}")
    return value


def _check_layers(layers: object) -> tuple[int, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ValueError(f"layers must be None or a list of layer indices, got {layers!r}")
    indices = tuple(_check_int("each entry of layers", index, 0) for index in layers)
    if not indices:
        raise ValueError("layers must be None (every decoder layer) or a non-empty list of indices")
    if len(set(indices)) != len(indices):
        raise ValueError(f"layers must not repeat an index, got {list(layers)!r}")
    return tuple(sorted(indices))


@dataclass
class SteerConfig:
    """Configuration of post-block steering (arXiv 2603.00425), in the manner of a PEFT config.

    After each chosen decoder layer, the layer output h (after its skip connection) becomes

        out = h + scale * (U phi(D h + b_d) + b_u)      D: rank x d, U: d x rank

    Every field is checked in ``__post_init__``; a bad value raises ValueError naming the field.

    Attributes:
        rank: width r of the bottleneck, >= 1; or 0 for a steering vector, one trainable vector
            b per steered layer and site, zero at first: out = h + scale * b.
        activation: phi, one of ``steer_fast.ACTIVATIONS`` ("identity", "relu", "silu", "gelu",
            "gelu_tanh", "tanh"); None (the default) gives "silu", the published default, for
            rank >= 1 and "identity" for rank 0 (which has no phi: any other is an error).
        bias: whether D and U carry the biases b_d, b_u (the published adapter has none; rank 0
            must leave it False).
        scale: steering strength s, any finite real; 0 leaves the model unchanged. Changed at run
            time with ``SteerModel.set_scale``.
        layers: decoder-layer indices to steer (0-based, stored sorted), or None for every layer.
        fuse_residual: for decoder layers in ``steer_fast.families`` (Llama, Mistral, Qwen2/3,
            Gemma/2/3, Phi3, OLMo/2/3, ...), run the layer's own submodules so that its final
            residual add happens inside the steering kernel. Layers of other families, and every
            layer when False, get the plain path: the layer runs unchanged and its output is
            steered. ``SteerModel.steering_paths()`` reports the path of each layer.
        dtype: dtype of the adapter parameters: float32, bfloat16, float16 or float64 (torch
            backend only), as a torch.dtype or its name; None for the model's dtype.
        backend: post_block_steer backend for every adapter: "auto" (Triton on CUDA, torch
            otherwise), "triton" or "torch".
        site: where each steered layer is steered: "block" (its output, after the skip
            connection: post-block steering), "attn" or "mlp" (the attention or MLP branch
            output, before its residual add), or a list of them, each with its own adapter
            (["attn", "mlp"] is the paper's submodule variant). Stored as a tuple in the order
            block, attn, mlp.
        init: how a new adapter's down-projection D starts: "published" (Kaiming-uniform with
            a = sqrt 5, scaled by 1e-3, as in the paper's code) or "lora" (Kaiming-uniform,
            unscaled, as LoRA's A). U (and the biases) start at zero either way. None gives
            "published" for rank >= 1; rank 0 has no D and takes None.
        hidden_size: width d of the model's residual stream. Leave None: it is filled in when the
            config is applied to a model, saved with the adapter, and checked on load.
        num_layers: number of decoder layers of the model; filled in and checked like
            hidden_size.
        base_model_name_or_path: the base model the adapter was put on, as PEFT's config names
            it: a Hub repo id or a local path. Leave None: it is filled in from the model's
            ``name_or_path`` when the config is applied to a model (and stays None for a model
            built from a config, which has none). ``AutoSteerModelForCausalLM`` loads it; it is
            a record, not checked on load (``SteerModel.from_pretrained`` takes any base with
            the right shape).
        revision: the base model's revision (a branch, tag or commit), or None: filled in with
            ``base_model_name_or_path`` where transformers keeps it on the model (the commit of
            a Hub snapshot, transformers 4), None otherwise (transformers 5 keeps none); set it
            to pin the base ``AutoSteerModelForCausalLM`` loads.
        steer_type: the steering method, "post_block" (set by the library, not an argument).
        format_version: version of the saved format (set by the library, not an argument).
    """

    rank: int = 8
    activation: str | None = None
    bias: bool = False
    scale: float = 1.0
    layers: Sequence[int] | None = None
    fuse_residual: bool = True
    dtype: torch.dtype | str | None = None
    backend: str = "auto"
    site: str | Sequence[str] = "block"
    init: str | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    steer_type: str = field(default=STEER_TYPE, init=False)
    format_version: int = field(default=FORMAT_VERSION, init=False)

    def __post_init__(self) -> None:
        self.rank = _check_int("rank", self.rank, 0)
        self.bias = _check_bool("bias", self.bias)
        if self.rank == 0:
            if self.activation not in (None, "identity"):
                raise ValueError(
                    f"activation={self.activation!r} needs rank >= 1: rank 0 is a steering vector "
                    "(out = h + s b), which has no bottleneck to apply a nonlinearity in"
                )
            if self.bias:
                raise ValueError(
                    "bias=True needs rank >= 1: rank 0 is a steering vector (out = h + s b), "
                    "whose one parameter is the vector; it has no down/up biases"
                )
            if self.init is not None:
                raise ValueError(
                    f"init={self.init!r} needs rank >= 1: rank 0 is a steering vector, which "
                    "starts at zero"
                )
            self.activation = "identity"
        else:
            activation = "silu" if self.activation is None else self.activation
            self.activation = check_activation(activation)
            init = "published" if self.init is None else self.init
            if not isinstance(init, str) or init not in INITS:
                raise ValueError(f"init must be one of {INITS} or None, got {self.init!r}")
            self.init = init
        self.site = _check_sites(self.site)
        self.scale = check_scale(self.scale)
        self.layers = _check_layers(self.layers)
        self.fuse_residual = _check_bool("fuse_residual", self.fuse_residual)
        self.dtype = _check_dtype(self.dtype)
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "triton" and self.dtype is not None and self.dtype not in TRITON_DTYPES:
            raise ValueError(
                f"dtype {self.dtype} is not supported by backend='triton' (supported: "
                f"{[str(d) for d in TRITON_DTYPES]}); use backend='torch' or 'auto' for it"
            )
        if self.hidden_size is not None:
            self.hidden_size = _check_int("hidden_size", self.hidden_size, 1)
        if self.num_layers is not None:
            self.num_layers = _check_int("num_layers", self.num_layers, 1)
            if self.layers is not None and self.layers[-1] >= self.num_layers:
                raise ValueError(
                    f"layers {list(self.layers)} has an index out of range for a model with "
                    f"num_layers={self.num_layers} (valid: 0..{self.num_layers - 1})"
                )
        self.base_model_name_or_path = _check_name(
            "base_model_name_or_path", self.base_model_name_or_path
        )
        self.revision = _check_name("revision", self.revision)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (dtype by name, layers as a list)."""
        result = dataclasses.asdict(self)
        result["dtype"] = None if self.dtype is None else dtype_name(self.dtype)
        result["layers"] = None if self.layers is None else list(self.layers)
        result["site"] = list(self.site)
        return result

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SteerConfig:
        """The config ``to_dict`` described; ValueError for unknown keys, another steer_type or a
        newer format_version than this library reads."""
        if not isinstance(values, dict):
            raise ValueError(f"a steer config must be a dict, got {type(values).__name__}")
        values = dict(values)
        steer_type = values.pop("steer_type", STEER_TYPE)
        if steer_type != STEER_TYPE:
            raise ValueError(f"steer_type must be {STEER_TYPE!r}, got {steer_type!r}")
        check_format_version(values.pop("format_version", FORMAT_VERSION), FORMAT_VERSION)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown steer config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def to_json_string(self) -> str:
        """The JSON text of steer_config.json: sorted keys, two-space indent, final newline."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | PathLike) -> SteerConfig:
        """Read a steer_config.json; ValueError if it is not valid JSON or not a valid config."""
        try:
            with open(path, encoding="utf-8") as handle:
                values = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        return cls.from_dict(values)
