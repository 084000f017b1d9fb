"""NamedAdapterWrapper: several named adapters on one steered model, and mixed batches over
them, with PEFT's verbs; SteerModel is one.

A SteerModel starts with one adapter, "default". ``add_adapter(name, config)`` and
``load_adapter(path, name)`` add more on the same base model; they may differ in rank,
activation, scale, layers and sites. ``set_adapter(name)`` picks the adapter every row runs
with; ``delete_adapter(name)`` takes one off. ``save_pretrained`` writes the default adapter at
the top of the directory (so one-adapter directories keep their layout) and every other one in a
subfolder of its name, as PEFT does; ``SteerModel.from_pretrained`` loads the default one and
``load_adapter(directory / name, name)`` the others. A Trainer checkpoint (the state_dict) holds
them all, their configs in the extra state: ``from_pretrained`` restores every one.

A mixed batch names an adapter per row::

    model(**batch, adapter_names=["french", "__base__", "default"], steering_scales=[1, 0, 2])
    model.generate(**inputs, adapter_names=[...], max_new_tokens=20)

"__base__" rows run the base model (bit-identical to it); ``steering_scales`` (a list or 1-D
tensor, one float per row) replaces each row's adapter scale. In training mode the same call
trains every named adapter at once, each from its own rows only. ``generate`` with beams or
several return sequences expands the names as transformers expands the rows.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import SteerConfig
from .constants import (
    ADAPTER_NAME_PATTERN,
    BASE_ADAPTER_NAME,
    CONFIG_NAME,
    DEFAULT_ADAPTER_NAME,
    WEIGHTS_NAME,
)
from .hub import resolve_adapter
from .injection import apply_named_adapter, plan_named_adapter
from .injection.layers import model_hidden_size
from .injection.routing import RowRouting
from .ops.checks import check_scale
from .saving.control_vector_files import (
    control_vector_directions,
    control_vector_model_hint,
    control_vector_steering,
    write_control_vector,
)
from .saving.state import check_is_trainable, with_backend
from .saving.steering_files import read_steering, write_steering_files
from .wrapper import SteeringWrapper

# Names an adapter cannot have: ModuleDict's own attributes (every site's modules live in a
# ModuleDict keyed by adapter name) and the name of the unsteered rows.
_RESERVED = frozenset(dir(nn.ModuleDict())) | {BASE_ADAPTER_NAME}


class NamedAdapterWrapper(SteeringWrapper):
    """A SteeringWrapper holding several named steering adapters, and running mixed batches
    over them (see the module docstring); the base of SteerModel.

    Subclasses set ``base_model`` (the steered model), ``layers_name`` (where its decoder layers
    are) and ``steer_config`` (the default adapter's), then call ``_init_named_adapters()``."""

    base_model: nn.Module
    layers_name: str

    def _init_named_adapters(self) -> None:
        self.steer_configs: dict[str, SteerConfig] = {DEFAULT_ADAPTER_NAME: self.steer_config}
        self._active_adapter = DEFAULT_ADAPTER_NAME

    # --- what is loaded --------------------------------------------------------------------

    @property
    def active_adapter(self) -> str:
        """The adapter every row runs with outside a mixed batch."""
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        """[active_adapter] (PEFT's plural form)."""
        return [self._active_adapter]

    def list_adapters(self) -> list[str]:
        """The names of the loaded adapters, "default" first."""
        return list(self.steer_configs)

    def _check_loaded(self, argument: str, name: object) -> str:
        if not isinstance(name, str) or name not in self.steer_configs:
            raise ValueError(
                f"{argument}: no adapter {name!r} is loaded; loaded: {self.list_adapters()}"
            )
        return name

    # --- adding, choosing, deleting --------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: SteerConfig) -> None:
        """Add a new adapter, identity at first and trainable, as ``adapter_name``.

        Raises:
            ValueError: for a name that is loaded already, reserved ("__base__") or not made of
                letters, digits, "_" and "-"; for a config that does not fit the base model.
                Nothing is added then.
        """
        self._add_adapter(adapter_name, config)

    def _add_adapter(self, adapter_name: str, config: SteerConfig) -> SteerConfig:
        if not isinstance(adapter_name, str) or not ADAPTER_NAME_PATTERN.match(adapter_name):
            raise ValueError(
                f"adapter_name must be a non-empty string of letters, digits, '_' and '-', got "
                f"{adapter_name!r}"
            )
        if adapter_name in self.steer_configs:
            raise ValueError(f"adapter_name: an adapter {adapter_name!r} is loaded already")
        if adapter_name in _RESERVED:
            raise ValueError(f"adapter_name: {adapter_name!r} is reserved")
        plan = plan_named_adapter(self.base_model, self.layers_name, config)
        apply_named_adapter(self.base_model, self.layers_name, adapter_name, plan)
        self.steer_configs[adapter_name] = plan.config
        self._set_active_on_blocks()
        return plan.config

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        backend: str | None = None,
        **hub_kwargs: Any,
    ) -> None:
        """Load the adapter ``save_pretrained`` (or a Trainer checkpoint) wrote in ``model_id`` (a
        folder or Hub repo id: ``hub_kwargs``) as ``adapter_name``, frozen unless ``is_trainable``.

        Raises:
            ValueError: as ``add_adapter``, and for a directory without a valid adapter or with
                one saved for another base model. Nothing is loaded then.
        """
        check_is_trainable(is_trainable)
        config, tensors = read_steering(resolve_adapter(model_id, "model_id", **hub_kwargs))
        self._add_adapter(adapter_name, with_backend(config, backend))
        self.load_steering_tensors(tensors, adapter_name)
        if not is_trainable:
            for module in self._adapter_modules(adapter_name):
                module.requires_grad_(False)

    def set_adapter(self, adapter_name: str) -> None:
        """Run every row with ``adapter_name`` (outside a mixed batch). It does not change which
        adapters train."""
        self._active_adapter = self._check_loaded("adapter_name", adapter_name)
        self._set_active_on_blocks()

    def delete_adapter(self, adapter_name: str, new_active_adapter: str | None = None) -> None:
        """Take adapter ``adapter_name`` off the model. Deleting the active adapter needs
        ``new_active_adapter``, the adapter that takes its place. The default adapter, the one
        ``steer_config`` describes and ``save_pretrained`` writes at the top of its directory,
        cannot be deleted (``unload()`` takes everything off).

        Raises:
            ValueError: for an adapter that is not loaded, the default adapter, or the active
                adapter without a loaded ``new_active_adapter``. Nothing changes then.
        """
        self._check_loaded("adapter_name", adapter_name)
        if adapter_name == DEFAULT_ADAPTER_NAME:
            raise ValueError(
                "adapter_name: the default adapter cannot be deleted (it is the model's "
                "steer_config, written at the top of a save_pretrained directory); "
                "set_adapter() another one, or unload() the model"
            )
        if new_active_adapter is not None:
            self._check_loaded("new_active_adapter", new_active_adapter)
            if new_active_adapter == adapter_name:
                raise ValueError("new_active_adapter must be another adapter than adapter_name")
        elif adapter_name == self._active_adapter:
            raise ValueError(
                f"new_active_adapter: {adapter_name!r} is the active adapter; name the adapter "
                f"to activate instead (loaded: {self.list_adapters()})"
            )
        for block in self._steered_blocks().values():
            block.delete_adapter(adapter_name)
        del self.steer_configs[adapter_name]
        if new_active_adapter is not None:
            self.set_adapter(new_active_adapter)

    def _set_active_on_blocks(self) -> None:
        for block in self._steered_blocks().values():
            block.active_adapter = self._active_adapter

    def _adapter_modules(self, adapter_name: str) -> list[nn.Module]:
        return [
            module
            for block in self._steered_blocks().values()
            for module in block.adapters(adapter_name).values()
        ]

    # --- files -----------------------------------------------------------------------------

    def _selected(self, selected_adapters: Sequence[str] | None) -> list[str]:
        if selected_adapters is None:
            return self.list_adapters()
        if isinstance(selected_adapters, str) or not isinstance(selected_adapters, Sequence):
            raise ValueError(
                f"selected_adapters must be a list of adapter names, got {selected_adapters!r}"
            )
        return [self._check_loaded("selected_adapters", name) for name in selected_adapters]

    def _adapter_files(
        self, selected_adapters: Sequence[str] | None
    ) -> tuple[dict[str, tuple[SteerConfig, dict[str, torch.Tensor]]], tuple[str, ...]]:
        """(name -> (config, tensors), the entries written at the top of the directory)."""
        names = self._selected(selected_adapters)
        off = [name for name in names if self.steer_configs[name].scale == 0]
        if off:
            # The scale is part of the adapter (set_scale changes what is saved, as a config
            # field): say so where an adapter would load switched off.
            warnings.warn(
                f"steer_fast: saving adapter(s) {off} with scale 0.0: they load switched off; "
                "set_scale() the trained strength first, or use disable_adapter() to switch "
                "steering off without changing what is saved",
                UserWarning,
                stacklevel=3,
            )
        files = {name: (self.steer_configs[name], self.steering_tensors(name)) for name in names}
        written = tuple(name for name in names if name != DEFAULT_ADAPTER_NAME)
        if DEFAULT_ADAPTER_NAME in names:
            written += (WEIGHTS_NAME, CONFIG_NAME)
        return files, written

    @staticmethod
    def _write_adapter_files(
        staging: Path, files: dict[str, tuple[SteerConfig, dict[str, torch.Tensor]]]
    ) -> None:
        for name, (config, tensors) in files.items():
            directory = staging
            if name != DEFAULT_ADAPTER_NAME:
                directory = staging / name
                directory.mkdir()
            write_steering_files(directory, config, tensors)

    # --- llama.cpp control vectors (docs/control_vectors.md) ------------------------------

    def export_control_vector(
        self,
        path: str | os.PathLike,
        adapter_name: str = DEFAULT_ADAPTER_NAME,
        model_hint: str | None = None,
    ) -> None:
        """Write rank-0 adapter ``adapter_name`` as a llama.cpp control vector (GGUF): an f32
        ``direction.N = scale * vector`` per steered layer N (llama.cpp adds it to layer N's
        output), ``controlvector.model_hint`` (``model_hint`` or ``config.model_type``) and
        ``controlvector.layer_count``; written beside ``path``, then renamed into place.

        Raises:
            ValueError: for an adapter not loaded, of rank >= 1, at a site other than "block"
                or with a non-zero vector at layer 0, or a bad ``path`` or ``model_hint``.
        """
        self._check_loaded("adapter_name", adapter_name)
        hint = control_vector_model_hint(self.base_model, model_hint)
        config, tensors = self.steer_configs[adapter_name], self.steering_tensors(adapter_name)
        write_control_vector(path, control_vector_directions(config, tensors, adapter_name), hint)

    def load_control_vector(
        self,
        path: str | os.PathLike,
        adapter_name: str,
        scale: float = 1.0,
        is_trainable: bool = False,
        backend: str | None = None,
    ) -> None:
        """Load the llama.cpp or repeng control vector at ``path`` as rank-0 adapter
        ``adapter_name`` (as ``load_adapter``): a vector at site "block" of each layer the file
        has a direction for, at strength ``scale``; frozen unless ``is_trainable``.

        Raises:
            ValueError: as ``add_adapter``, and for a file that is not a control vector or is
                for another hidden size or more layers. Nothing is loaded then.
        """
        check_is_trainable(is_trainable)
        num_layers = len(self.base_model.get_submodule(self.layers_name))
        hidden_size = model_hidden_size(self.base_model)
        config, tensors = control_vector_steering(path, hidden_size, num_layers, scale, backend)
        self._add_adapter(adapter_name, config)
        self.load_steering_tensors(tensors, adapter_name)
        if not is_trainable:
            for module in self._adapter_modules(adapter_name):
                module.requires_grad_(False)

    # --- running ----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        adapter_names: Sequence[str] | None = None,
        steering_scales: Sequence[float] | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The wrapped model's forward; ``adapter_names`` (one per row, "__base__" for none)
        and ``steering_scales`` (one float per row) make it a mixed batch."""
        batch_size, device = self._batch_size(
            (), {"input_ids": input_ids, "inputs_embeds": inputs_embeds}
        )
        routing = self._routing(adapter_names, steering_scales, batch_size, device)
        if routing is None:
            return SteeringWrapper.forward(
                self, input_ids, attention_mask, inputs_embeds, labels, **kwargs
            )
        self._route_rows(routing)
        if torch.compiler.is_compiling():
            # torch.compile traces no try/finally around the model: a traced call that raised
            # leaves the routing set until the next call of this model sets its own.
            output = SteeringWrapper.forward(
                self, input_ids, attention_mask, inputs_embeds, labels, **kwargs
            )
            self._route_rows(None)
            return output
        try:
            return SteeringWrapper.forward(
                self, input_ids, attention_mask, inputs_embeds, labels, **kwargs
            )
        finally:
            self._route_rows(None)

    def generate(
        self,
        *args: Any,
        adapter_names: Sequence[str] | None = None,
        steering_scales: Sequence[float] | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The wrapped model's generate; ``adapter_names`` and ``steering_scales`` as in
        ``forward`` (rows expanded for beams and several return sequences follow their row)."""
        batch_size, device = self._batch_size(args, kwargs)
        routing = self._routing(adapter_names, steering_scales, batch_size, device)
        self._route_rows(routing)
        try:
            return SteeringWrapper.generate(self, *args, **kwargs)
        finally:
            self._route_rows(None)

    def set_scale(self, scale: float, adapter_name: str | None = None) -> None:
        """Set the steering strength s of adapter ``adapter_name``, or of every adapter
        (0: no steering)."""
        scale = check_scale(scale)
        names = (
            self.list_adapters()
            if adapter_name is None
            else [self._check_loaded("adapter_name", adapter_name)]
        )
        for name in names:
            for _, _, adapter in self._all_adapters(name):
                adapter.scale = scale
            self.steer_configs[name].scale = scale

    # --- mixed batches ---------------------------------------------------------------------

    def _route_rows(self, routing: RowRouting | None) -> None:
        """Set ``routing`` on every steered block (None: the active adapter on every row). A
        plain set, not a context manager, so that torch.compile traces the call whole."""
        for block in self._steered_blocks().values():
            block.routing = routing

    def _routing(
        self,
        adapter_names: object,
        steering_scales: object,
        batch_size: int | None,
        device: torch.device,
    ) -> RowRouting | None:
        """The RowRouting of a call, every argument checked (ValueError naming it); None when
        both arguments are None."""
        if adapter_names is None and steering_scales is None:
            return None
        if batch_size is None:
            raise ValueError(
                "adapter_names / steering_scales need input_ids or inputs_embeds to tell the "
                "batch size"
            )
        names = (BASE_ADAPTER_NAME, *self.steer_configs)
        if adapter_names is None:
            rows = [self._active_adapter] * batch_size
        else:
            if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
                raise ValueError(
                    f"adapter_names must be a list of adapter names, one per row, got "
                    f"{type(adapter_names).__name__}"
                )
            rows = list(adapter_names)
            if len(rows) != batch_size:
                raise ValueError(
                    f"adapter_names has {len(rows)} names for a batch of {batch_size} rows"
                )
            unknown = sorted({str(n) for n in rows if not isinstance(n, str) or n not in names})
            if unknown:
                raise ValueError(
                    f"adapter_names: unknown adapter(s) {unknown}; loaded: "
                    f"{self.list_adapters()} (or {BASE_ADAPTER_NAME!r} for none)"
                )
        ids = torch.tensor([names.index(name) for name in rows], dtype=torch.long)
        return RowRouting(names, ids.to(device), _row_scales(steering_scales, batch_size, device))

    @staticmethod
    def _batch_size(args: tuple, kwargs: dict[str, Any]) -> tuple[int | None, torch.device]:
        for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                return value.shape[0], value.device
        return None, torch.device("cpu")


def _row_scales(
    steering_scales: object, batch_size: int, device: torch.device
) -> torch.Tensor | None:
    """``steering_scales`` as a [batch_size] fp32 tensor on ``device`` (None stays None)."""
    if steering_scales is None:
        return None
    if isinstance(steering_scales, torch.Tensor):
        if steering_scales.dim() != 1 or not steering_scales.is_floating_point():
            raise ValueError(
                f"steering_scales must be a 1-D floating tensor or a list of floats, got a "
                f"{steering_scales.dim()}-D {steering_scales.dtype} tensor"
            )
        values = steering_scales.detach().to(device=device, dtype=torch.float32)
    else:
        if isinstance(steering_scales, str) or not isinstance(steering_scales, Sequence):
            raise ValueError(
                f"steering_scales must be a list of floats or a 1-D tensor, one per row, got "
                f"{type(steering_scales).__name__}"
            )
        bad = [v for v in steering_scales if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            raise ValueError(f"steering_scales must hold numbers, got {bad[:3]}")
        if not all(math.isfinite(v) for v in steering_scales):
            raise ValueError(f"steering_scales must be finite, got {list(steering_scales)}")
        values = torch.tensor(list(steering_scales), dtype=torch.float32, device=device)
    if values.shape[0] != batch_size:
        raise ValueError(
            f"steering_scales has {values.shape[0]} values for a batch of {batch_size} rows"
        )
    # A tensor's values are checked in eager mode only: under torch.compile the check would
    # read them back to the host and break the graph.
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(values).all()):
        raise ValueError("steering_scales must be finite")
    return values
