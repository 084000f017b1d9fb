"""Finding a model's decoder layers, and what steering needs to know of them.

``find_decoder_layers(model)`` returns the ModuleList of decoder layers steer_fast steers (and
its name in the model): the list whose layers are all of a class the model names in
``_no_split_modules``, else a list at a usual place. ``model_hidden_size`` reads the width of the
residual stream from the model's config (or its input embeddings); ``base_model_reference`` the
name and revision a steering config records of the model.
"""

from __future__ import annotations

import torch
from torch import nn

# Where decoder layers live when ``_no_split_modules`` does not say (and to break ties).
KNOWN_LAYER_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.decoder.layers",
    "decoder.layers",
    "transformer.h",
    "transformer.layers",
    "transformer.blocks",
    "gpt_neox.layers",
    "layers",
    "h",
    "blocks",
)


def _path_rank(name: str) -> int | None:
    """Position in KNOWN_LAYER_PATHS of the first usual place ``name`` is (or ends with)."""
    for rank, path in enumerate(KNOWN_LAYER_PATHS):
        if name == path or name.endswith("." + path):
            return rank
    return None


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of ``model``'s decoder layers.

    The list is the ModuleList whose layers are all of a class named in the ``_no_split_modules``
    of the model (or of a transformers model inside it); failing that, a ModuleList at a usual
    place (``model.layers``, ``transformer.h``, ``gpt_neox.layers``, ...). Among several
    candidates, the one at the most specific usual place wins (``model.language_model.layers``
    over a vision tower's ``encoder.layers``).

    Raises:
        ValueError: if no such list exists, or if several remain.
    """
    no_split: set[str] = set()
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if isinstance(names, (list, tuple, set)):
            no_split.update(name for name in names if isinstance(name, str))
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    candidates = [
        (name, module)
        for name, module in lists
        if all(type(layer).__name__ in no_split for layer in module)
    ]
    if not candidates:
        candidates = [(name, module) for name, module in lists if _path_rank(name) is not None]
    ranks = [_path_rank(name) for name, _ in candidates]
    if len(candidates) > 1 and any(rank is not None for rank in ranks):
        best = min(rank for rank in ranks if rank is not None)
        candidates = [c for c, rank in zip(candidates, ranks, strict=True) if rank == best]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(
            f"model ({type(model).__name__}) has no recognisable decoder layers: expected a "
            f"ModuleList of layers named in _no_split_modules ({sorted(no_split)}) or one at "
            f"{list(KNOWN_LAYER_PATHS)}"
        )
    raise ValueError(
        f"model ({type(model).__name__}) has several candidate decoder-layer lists "
        f"{[name for name, _ in candidates]}; steer one language model at a time"
    )


def model_hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        size = getattr(text_config, "hidden_size", None)
        if isinstance(size, int) and size > 0:
            return size
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.embedding_dim
    raise ValueError(
        f"cannot tell the hidden size of {type(model).__name__}: it has neither "
        "config.hidden_size nor input embeddings"
    )


def base_model_reference(model: nn.Module) -> tuple[str | None, str | None]:
    """(name_or_path, revision) of a transformers model, as an adapter records its base: the
    ``name_or_path`` ``from_pretrained`` gave it (a Hub id or a local path; None for a model built
    from a config, whose name is ""), and the commit of the Hub snapshot it came from where the
    config keeps one (``_commit_hash``, transformers 4; transformers 5 keeps none: None)."""
    config = getattr(model, "config", None)
    name = model.__dict__.get("name_or_path", None) or getattr(config, "name_or_path", None)
    if not isinstance(name, str) or not name:
        return None, None
    revision = getattr(config, "_commit_hash", None)
    return name, revision if isinstance(revision, str) and revision else None


def first_floating(module: nn.Module) -> torch.Tensor | None:
    """The first floating-point parameter or buffer of ``module``, or None."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            return tensor
    return None


def layer_device(layer: nn.Module) -> torch.device:
    """The device of ``layer``'s first parameter or buffer (the CPU for a layer with none)."""
    reference = next(iter([*layer.parameters(), *layer.buffers()]), None)
    return reference.device if reference is not None else torch.device("cpu")
