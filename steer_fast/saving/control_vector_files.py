"""llama.cpp's control vectors: the GGUF files of ``--control-vector`` and of repeng, read and
written.

The format, as llama.cpp reads it (``common_control_vector_load_one`` in common/common.cpp,
``llama_adapter_cvec`` in src/llama-adapter.cpp) and as repeng (``ControlVector.export_gguf``)
and llama.cpp's cvector-generator write it:

- ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the model's
  ``model_type``, e.g. "llama") and ``controlvector.layer_count`` (the number of direction
  tensors; llama.cpp's loader reads neither key);
- one 1-D f32 tensor ``direction.<il>`` of the model's hidden size per steered layer. llama.cpp
  adds it, times the strength it is loaded with, to the output of decoder layer ``il``
  (0-based) after that layer's last residual add (``build_cvec(cur, il)`` right after
  ``ffn_out`` in every model graph, at every position): exactly a rank-0 steering vector at
  site "block" of layer ``il`` of the transformers model. llama.cpp keeps no vector for layer 0
  and rejects a file holding ``direction.0``; repeng's default layers skip layer 0 as well.

Nothing here imports gguf until a file is read or written.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import SteerConfig
from ..constants import (
    CONTROL_VECTOR_ARCHITECTURE,
    CONTROL_VECTOR_LAYER_COUNT_KEY,
    CONTROL_VECTOR_MODEL_HINT_KEY,
    CONTROL_VECTOR_TENSOR_PREFIX,
    GGUF_ARCHITECTURE_KEY,
    steering_file_key,
)

# The tensor types a direction may have: llama.cpp reads f32 only; repeng writes whatever numpy
# dtype its directions have, so f16 and f64 are read too (as f32).
_READABLE_TYPES = ("F32", "F16", "F64")


@dataclass(frozen=True)
class ControlVectorFile:
    """What a control-vector file holds.

    Attributes:
        directions: layer index -> its direction, a float32 tensor [hidden size] on the CPU.
        model_hint: ``controlvector.model_hint``, or None when the file has none.
        layer_count: ``controlvector.layer_count``, or None when the file has none.
    """

    directions: dict[int, torch.Tensor]
    model_hint: str | None
    layer_count: int | None

    @property
    def hidden_size(self) -> int:
        return next(iter(self.directions.values())).numel()


# ----------------------------------------------------------------------------------------------
# From a steering adapter to a file
# ----------------------------------------------------------------------------------------------


def control_vector_directions(
    config: SteerConfig, tensors: dict[str, torch.Tensor], adapter_name: str
) -> dict[int, torch.Tensor]:
    """Layer index -> ``scale * vector`` (float32) of a rank-0 adapter at site "block": what
    llama.cpp adds after each layer. A zero vector at layer 0 is left out (llama.cpp cannot hold
    one).

    Raises:
        ValueError (naming ``adapter_name``): for an adapter of rank >= 1 or steering a site other
            than "block" (one constant vector per layer at the block output cannot express it),
            and for a non-zero vector at layer 0.
    """
    if config.rank != 0:
        raise ValueError(
            f"adapter_name: adapter {adapter_name!r} has rank {config.rank}; a control vector is "
            "one constant vector per layer (rank 0, SteerConfig(rank=0)), which cannot express "
            "a low-rank adapter's input-dependent steering"
        )
    if tuple(config.site) != ("block",):
        raise ValueError(
            f"adapter_name: adapter {adapter_name!r} steers sites {list(config.site)}; a control "
            "vector is added to each layer's output (site 'block') only"
        )
    layers = range(config.num_layers) if config.layers is None else config.layers
    directions = {}
    for index in layers:
        vector = tensors[steering_file_key(index, "block", "vector")].detach()
        direction = vector.to(device="cpu", dtype=torch.float32) * float(config.scale)
        if index == 0:
            if bool(direction.any()):
                raise ValueError(
                    f"adapter_name: adapter {adapter_name!r} steers layer 0 with a non-zero "
                    "vector, which a llama.cpp control vector cannot hold (its loader rejects "
                    "direction.0); steer layers 1.. only, e.g. SteerConfig(rank=0, "
                    f"layers=range(1, {config.num_layers}))"
                )
            continue
        directions[index] = direction.contiguous()
    return directions


def control_vector_model_hint(model: object, model_hint: object = None) -> str:
    """``model_hint`` if given (a string), else ``model.config.model_type`` (what repeng writes),
    else the model's class name."""
    if model_hint is not None:
        if not isinstance(model_hint, str):
            raise ValueError(f"model_hint must be a string or None, got {model_hint!r}")
        return model_hint
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if isinstance(model_type, str) and model_type else type(model).__name__


def write_control_vector(
    path: str | os.PathLike, directions: dict[int, torch.Tensor], model_hint: str
) -> None:
    """Write ``directions`` (layer -> [d] float32) as a control-vector GGUF file at ``path``,
    the keys and layout repeng writes. The file is written beside ``path`` and renamed into
    place, so a failure leaves whatever was at ``path`` as it was.

    Raises:
        ValueError: if ``path`` is a directory.
    """
    import gguf

    target = Path(path)
    if target.is_dir():
        raise ValueError(f"path: {target} is a directory; give the control vector's file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".writing", dir=target.parent
    )
    os.close(descriptor)
    try:
        writer = gguf.GGUFWriter(temporary, CONTROL_VECTOR_ARCHITECTURE)
        writer.add_string(CONTROL_VECTOR_MODEL_HINT_KEY, model_hint)
        writer.add_uint32(CONTROL_VECTOR_LAYER_COUNT_KEY, len(directions))
        for index in sorted(directions):
            data = directions[index].detach().to("cpu", torch.float32).numpy()
            writer.add_tensor(f"{CONTROL_VECTOR_TENSOR_PREFIX}{index}", data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# From a file to a steering adapter
# ----------------------------------------------------------------------------------------------


def read_control_vector(path: str | os.PathLike) -> ControlVectorFile:
    """The directions and metadata of the control-vector file at ``path``.

    Raises:
        ValueError (naming ``path``): for a missing file, a file that is not GGUF, a GGUF file
            that is not a control vector (its ``general.architecture``), a tensor that is not a
            ``direction.<layer>`` 1-D float vector, directions of different lengths, or none.
    """
    import gguf

    source = Path(path)
    if not source.is_file():
        raise ValueError(f"path: {source} is not a file")
    try:
        reader = gguf.GGUFReader(source)
    except Exception as error:  # gguf raises ValueError, struct.error, IndexError, ...
        raise ValueError(f"path: {source} is not a GGUF file ({error})") from error
    architecture = _field(reader, GGUF_ARCHITECTURE_KEY)
    if architecture != CONTROL_VECTOR_ARCHITECTURE:
        raise ValueError(
            f"path: {source} is not a control vector: its {GGUF_ARCHITECTURE_KEY} is "
            f"{architecture!r}, not {CONTROL_VECTOR_ARCHITECTURE!r}"
        )
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        prefix, _, layer = tensor.name.partition(".")
        if f"{prefix}." != CONTROL_VECTOR_TENSOR_PREFIX or not layer.isdigit():
            raise ValueError(
                f"path: {source} holds a tensor {tensor.name!r}; a control vector holds "
                f"{CONTROL_VECTOR_TENSOR_PREFIX}<layer> tensors only"
            )
        if tensor.tensor_type.name not in _READABLE_TYPES or len(tensor.shape) != 1:
            raise ValueError(
                f"path: {source}: {tensor.name} is a {tensor.tensor_type.name} tensor of shape "
                f"{list(tensor.shape)}; a direction is a 1-D float vector (llama.cpp: F32)"
            )
        data = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        directions[int(layer)] = torch.from_numpy(data.copy())
    if not directions:
        raise ValueError(f"path: {source} holds no {CONTROL_VECTOR_TENSOR_PREFIX}<layer> tensors")
    sizes = sorted({direction.numel() for direction in directions.values()})
    if len(sizes) != 1:
        raise ValueError(f"path: {source} holds directions of different lengths {sizes}")
    hint = _field(reader, CONTROL_VECTOR_MODEL_HINT_KEY)
    count = _field(reader, CONTROL_VECTOR_LAYER_COUNT_KEY)
    return ControlVectorFile(
        dict(sorted(directions.items())),
        hint if isinstance(hint, str) else None,
        int(count) if isinstance(count, (int, np.integer)) else None,
    )


def control_vector_steering(
    path: str | os.PathLike,
    hidden_size: int,
    num_layers: int,
    scale: float = 1.0,
    backend: str | None = None,
) -> tuple[SteerConfig, dict[str, torch.Tensor]]:
    """The rank-0 adapter (config, tensors by file key) that steers like the control vector at
    ``path`` loaded with strength ``scale``: a vector at site "block" of each layer the file has
    a direction for (other layers unsteered), the directions as they are and ``scale`` the
    adapter's scale.

    Raises:
        ValueError: as ``read_control_vector``, and (naming ``path``) for a file whose hidden
            size is not ``hidden_size`` or that steers a layer the model does not have.
    """
    cvec = read_control_vector(path)
    if cvec.hidden_size != hidden_size:
        raise ValueError(
            f"path: {path} is a control vector of hidden size {cvec.hidden_size}, but the "
            f"model's hidden size is {hidden_size} (a control vector for another model)"
        )
    beyond = [index for index in cvec.directions if index >= num_layers]
    if beyond:
        raise ValueError(
            f"path: {path} has directions for layers {beyond}, but the model has {num_layers} "
            f"decoder layers (0..{num_layers - 1}): a control vector for another model"
        )
    config = SteerConfig(
        rank=0,
        site="block",
        layers=list(cvec.directions),
        scale=scale,
        backend="auto" if backend is None else backend,
        hidden_size=hidden_size,
        num_layers=num_layers,
    )
    tensors = {
        steering_file_key(index, "block", "vector"): direction
        for index, direction in cvec.directions.items()
    }
    return config, tensors


def _field(reader: object, key: str) -> object:
    """The value of GGUF field ``key`` (a str, a number, ...), or None if the file lacks it."""
    field = reader.get_field(key)
    if field is None or not len(field.types):
        return None
    return field.contents()
