"""llama.cpp control vectors onto a model: ``load_control_vector``.

A control vector (llama.cpp's ``--control-vector`` file, repeng's ``export_gguf``) is one
vector per decoder layer added to that layer's output: exactly steer_fast's rank-0 adapter at
site "block" (``SteerConfig(rank=0)``). The verbs, in the manner of PEFT's ``from_pretrained``
and ``load_adapter``:

    steered = steer_fast.load_control_vector(model, "happy.gguf")        # a new SteerModel
    steered.load_control_vector("calm.gguf", "calm", scale=0.5)          # one more adapter
    steered.export_control_vector("tuned.gguf", adapter_name="calm")     # back to llama.cpp

The file format and where llama.cpp adds each direction: ``steer_fast.saving.
control_vector_files``.
"""

from __future__ import annotations

import os

from torch import nn

from .constants import DEFAULT_ADAPTER_NAME
from .injection import find_decoder_layers
from .injection.layers import model_hidden_size
from .named_adapters import NamedAdapterWrapper
from .saving.control_vector_files import control_vector_steering
from .saving.state import check_is_trainable
from .steer_model import SteerModel


def load_control_vector(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    scale: float = 1.0,
    is_trainable: bool = False,
    backend: str | None = None,
) -> NamedAdapterWrapper:
    """Steer ``model`` with the control vector at ``path``.

    ``model`` is a transformers model (steered in place: a new SteerModel whose default adapter
    is the control vector; ``adapter_name`` must then be None or "default"), or a SteerModel, to
    which the vector is added as adapter ``adapter_name`` (required; see
    ``SteerModel.load_control_vector``). The vector steers, at strength ``scale``, the output of
    every layer the file has a ``direction.<layer>`` for; the other layers are unsteered
    (repeng's files skip layer 0, llama.cpp's cannot hold it). With ``is_trainable=False`` the
    adapter is frozen (and a new SteerModel put in eval mode), as ``from_pretrained`` does.
    Returns the steered model.

    Raises:
        ValueError: for a file that is not a control vector or is for another hidden size or
            more layers (naming ``path``), a bad ``adapter_name``, ``scale`` or ``backend``, or a
            model that cannot be steered. Everything is checked before ``model`` is touched.
    """
    check_is_trainable(is_trainable)
    if isinstance(model, NamedAdapterWrapper):
        if adapter_name is None:
            raise ValueError(
                "adapter_name: name the adapter the control vector is loaded as on this "
                f"{type(model).__name__} (loaded: {model.list_adapters()})"
            )
        model.load_control_vector(path, adapter_name, scale, is_trainable, backend)
        return model
    if adapter_name not in (None, DEFAULT_ADAPTER_NAME):
        raise ValueError(
            f"adapter_name: a control vector loaded onto a model that is not yet steered is its "
            f"{DEFAULT_ADAPTER_NAME!r} adapter, got {adapter_name!r}; load_control_vector() "
            "onto the SteerModel to add it under another name"
        )
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _, layers = find_decoder_layers(model)
    config, tensors = control_vector_steering(
        path, model_hidden_size(model), len(layers), scale, backend
    )
    steered = SteerModel(model, config)
    steered.load_steering_tensors(tensors)
    if not is_trainable:
        # Everything else of a SteerModel is frozen already: as from_pretrained leaves it.
        steered.requires_grad_(False).eval()
    return steered
