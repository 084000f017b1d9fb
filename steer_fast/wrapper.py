"""SteeringWrapper, the base of the steer_fast models: a PEFT-style wrapper around a steered model.

The models, top-down: ``SteeringWrapper`` (one steering part; this module), then
``NamedAdapterWrapper`` (several named steering adapters and mixed batches,
``steer_fast.named_adapters``) and ``SteerModel`` (``steer_fast.steer_model``); and
``JointModel`` (a steering adapter and a PEFT LoRA adapter, ``steer_fast.joint.model``).

Calls go to the wrapped model (``forward`` with labels and all, ``generate``, and any attribute
the wrapper lacks); the steering adapters are those of the wrapped model's steered blocks.

The verbs a PEFT user types mean what they mean in PEFT, on both models:

- ``disable_adapter()``: a context manager running the base model (every adapter off),
  restoring the previous state on exit; ``disable_adapter_layers()`` /
  ``enable_adapter_layers()`` switch every adapter off / on until switched again;
- ``enable_adapters()`` / ``disable_adapters()``, transformers' spelling of the same switches,
  also usable as context managers that switch back on exit;
- ``print_trainable_parameters()``, ``get_nb_trainable_parameters()``, ``get_base_model()``,
  ``save_pretrained``, ``from_pretrained``, ``unload()``;
- ``merge_and_unload``, ``merge_adapter`` and ``unmerge_adapter`` raise NotImplementedError
  saying why, instead of reaching the wrapped transformers model's methods of the same names.

``disable_steering()`` switches the steering part alone off (the LoRA part of a JointModel keeps
running).

For the tools that take the wrapper for a transformers model: the forward TRL's trainers install
for their fused LM head runs on the transformers model (``__setattr__``), ``_no_split_modules``
names SteeredBlock for FSDP's transformer-based wrap, and ``steering_tensors()`` gathers
adapters that FSDP2 shards (``steer_fast.distributed`` has the rest).
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .constants import DEFAULT_ADAPTER_NAME, EXTRA_STATE_KEY, steering_file_key
from .injection.steered_block import SteeredBlock
from .modules import Steering
from .ops.checks import check_scale
from .saving.legacy import is_legacy_format, upgrade_state_dict_keys
from .saving.state import decode_state, encode_state, is_adapter_key
from .shims import parameter_count, trl_fused_lm_head

if TYPE_CHECKING:
    from .config import SteerConfig


class AdapterSwitch:
    """A switch of the wrapper's adapters (``enable_adapters()``, ``disable_adapters()``,
    ``JointModel.set_inference_mode``): ``switch()`` has run when it is returned; used as a
    context manager, it puts the previous state of every adapter back on exit."""

    def __init__(self, wrapper: SteeringWrapper, switch: Callable[[], None]) -> None:
        self._wrapper = wrapper
        self._previous = wrapper._adapter_layer_state()
        switch()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        self._wrapper._restore_adapter_layer_state(self._previous)


class SteeringWrapper(nn.Module):
    """Base of SteerModel and JointModel.

    Subclasses name the attribute that holds the wrapped model (``wrapped_attribute``), keep
    their (first) steering adapter's SteerConfig as ``steer_config``, list their steered blocks
    (``_steered_blocks``), name their adapter parameters (``_adapter_parameter_names``) and
    describe their saved state (``_saved_state`` / ``_load_saved_state``, and the steer config's
    format version in it, ``_saved_steer_format``). ``state_dict()`` then holds the adapter
    parameters and that state (under "_extra_state"), not the frozen base weights, so that a
    transformers Trainer checkpoint of the wrapper is an adapter checkpoint; ``load_state_dict``
    reads the key names of older formats too (``steer_fast.saving.legacy``).
    """

    wrapped_attribute: str = ""
    steer_config: SteerConfig

    def __init__(self) -> None:
        super().__init__()
        self.register_state_dict_post_hook(_keep_adapter_state)
        self._register_load_state_dict_pre_hook(_upgrade_legacy_keys, with_module=True)
        self.register_load_state_dict_post_hook(_ignore_missing_base_weights)

    # --- what subclasses provide -----------------------------------------------------------

    def _steered_blocks(self) -> dict[int, SteeredBlock]:
        """Decoder-layer index -> its SteeredBlock, in index order."""
        raise NotImplementedError

    def _adapter_parameter_names(self) -> set[str]:
        """Names (in this wrapper) of every adapter parameter, trainable or frozen."""
        raise NotImplementedError

    def _saved_state(self) -> dict[str, Any]:
        """The JSON state ``state_dict()`` carries under "_extra_state"."""
        raise NotImplementedError

    def _load_saved_state(self, values: dict[str, Any]) -> None:
        """Check a loaded "_extra_state" against this wrapper and take over what may differ."""
        raise NotImplementedError

    @staticmethod
    def _saved_steer_format(values: dict[str, Any]) -> object:
        """The format version of the steer config in a decoded "_extra_state" (which tells how
        its steering keys are named)."""
        raise NotImplementedError

    # --- the wrapped model -----------------------------------------------------------------

    def _wrapped(self) -> nn.Module:
        return getattr(self, self.wrapped_attribute)

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks come from the wrapped model."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self.wrapped_attribute:
                raise AttributeError(
                    f"this {type(self).__name__} has no model (it was unloaded)"
                ) from None
            return getattr(self._wrapped(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        """nn.Module's, except for the forward TRL's trainers install to compute log-probabilities
        with a fused LM head (``shims.trl_fused_lm_head``). TRL writes that function for a
        transformers model: it reads ``self.base_model`` as transformers means it (the decoder
        backbone) and ``self.get_output_embeddings()``. It is therefore run with the
        transformers model (``get_base_model()``) as ``self``, so that it runs the backbone's
        layers, steered blocks included; without ``fused_lm_head=True`` it calls this wrapper's
        forward, as before."""
        if name == "forward":
            function = trl_fused_lm_head(value, self)
            if function is not None:
                value = types.MethodType(_on_transformers_model(function), self)
        super().__setattr__(name, value)

    @property
    def _no_split_modules(self) -> list[str]:
        """The class names of the modules that must stay whole: the wrapped model's, with
        SteeredBlock in place of the class of the layers it steers.

        accelerate's transformer-based FSDP wrap (the Trainer's default with ``fsdp``) shards
        the modules of these classes, so a steered model is sharded per SteeredBlock, its
        adapters inside, and never inside one: a steered block runs its original layer's
        submodules itself. A decoder layer left unsteered stays in the root unit there (its
        class is that of the layers inside the blocks); ``steer_fast.distributed`` gives
        per-layer units for those.
        """
        names = getattr(self.get_base_model(), "_no_split_modules", None) or []
        steered = {type(block.base_layer).__name__ for block in self._steered_blocks().values()}
        return [name for name in names if name not in steered] + [SteeredBlock.__name__]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The wrapped model's forward. The usual arguments are named (so that the transformers
        Trainer keeps those dataset columns and finds the labels) and passed on when given."""
        named = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "inputs_embeds": inputs_embeds,
            "labels": labels,
        }
        return self._wrapped()(**{k: v for k, v in named.items() if v is not None}, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's generate (the adapters run inside its layers)."""
        return self._wrapped().generate(*args, **kwargs)

    # --- parameters ------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counted as PEFT counts them: a
        bitsandbytes 4-bit weight counts the values it packs, not its storage elements
        (``shims.parameter_count``), so a 4-bit model counts as many parameters as unquantized."""
        trainable = total = 0
        for parameter in self.parameters():
            count = parameter_count(parameter)
            total += count
            if parameter.requires_grad:
                trainable += count
        return trainable, total

    def _trainable_line(self, detail: str = "") -> str:
        """PEFT's line: "trainable params: N || all params: M || trainable%: P"."""
        trainable, total = self.get_nb_trainable_parameters()
        return (
            f"trainable params: {trainable:,d}{detail} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    def _freeze_for_inference(self) -> None:
        """What ``from_pretrained(is_trainable=False)`` does: every adapter frozen, eval mode."""
        names = self._adapter_parameter_names()
        for name, parameter in self.named_parameters():
            if name in names:
                parameter.requires_grad_(False)
        self.eval()

    # --- steering --------------------------------------------------------------------------

    def get_adapters(self, site: str | None = None) -> dict[int, Steering]:
        """Decoder-layer index -> its steering module at ``site`` (a PostBlockAdapter, or a
        SteeringVector for rank 0). ``site`` may be left out when the config has one site."""
        sites = self.steer_config.site
        if site is None:
            if len(sites) != 1:
                raise ValueError(f"site must name one of the steered sites {list(sites)}")
            site = sites[0]
        elif site not in sites:
            raise ValueError(f"site must be one of the steered sites {list(sites)}, got {site!r}")
        return {
            index: adapters[site]
            for index, block in self._steered_blocks().items()
            if site in (adapters := block.adapters(DEFAULT_ADAPTER_NAME))
        }

    def _all_adapters(
        self, adapter_name: str = DEFAULT_ADAPTER_NAME
    ) -> list[tuple[int, str, Steering]]:
        return [
            (index, site, adapter)
            for index, block in self._steered_blocks().items()
            for site, adapter in block.adapters(adapter_name).items()
        ]

    def steering_paths(self) -> dict[int, str]:
        """Decoder-layer index -> "fused" or "plain" (``steer_fast.injection.steered_block``)."""
        return {index: block.path for index, block in self._steered_blocks().items()}

    def steering_report(self) -> str:
        """One line per steered layer: index, class, path and why."""
        return "\n".join(
            f"layer {index}: {type(block.base_layer).__name__} -> {block.path} "
            f"({block.path_reason})"
            for index, block in self._steered_blocks().items()
        )

    def set_scale(self, scale: float) -> None:
        """Set the steering strength s of every post-block adapter (0: no steering)."""
        scale = check_scale(scale)
        for _, _, adapter in self._all_adapters():
            adapter.scale = scale
        self.steer_config.scale = scale

    def _steering_state(self) -> list[tuple[SteeredBlock, bool]]:
        return [(block, block.steering_enabled) for block in self._steered_blocks().values()]

    def _set_steering(self, enabled: bool) -> None:
        for block in self._steered_blocks().values():
            block.steering_enabled = enabled

    @staticmethod
    def _restore_steering(state: list[tuple[SteeredBlock, bool]]) -> None:
        for block, enabled in state:
            block.steering_enabled = enabled

    @contextlib.contextmanager
    def disable_steering(self) -> Iterator[None]:
        """Run without the post-block adapters inside the block (every steered layer runs its
        own forward, exactly); other adapters keep running. Restores the previous state."""
        state = self._steering_state()
        try:
            self._set_steering(False)
            yield
        finally:
            self._restore_steering(state)

    # --- PEFT's switches -------------------------------------------------------------------
    # Subclasses with adapters besides steering extend these three.

    def _adapter_layer_state(self) -> Any:
        return self._steering_state()

    def _set_adapter_layers(self, enabled: bool) -> None:
        self._set_steering(enabled)

    def _restore_adapter_layer_state(self, state: Any) -> None:
        self._restore_steering(state)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model: every adapter off inside the block, the previous state restored
        on exit (PEFT's ``PeftModel.disable_adapter``)."""
        with self.disable_adapters():
            yield

    def enable_adapter_layers(self) -> None:
        """Switch every adapter on (PEFT's verb)."""
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        """Switch every adapter off until ``enable_adapter_layers()`` (PEFT's verb)."""
        self._set_adapter_layers(False)

    def enable_adapters(self) -> AdapterSwitch:
        """Switch every adapter on now (transformers' verb); as a context manager, switch back
        to the previous state on exit."""
        return AdapterSwitch(self, lambda: self._set_adapter_layers(True))

    def disable_adapters(self) -> AdapterSwitch:
        """Switch every adapter off now (transformers' verb); as a context manager
        (``with model.disable_adapters(): ...``), switch back to the previous state on exit."""
        return AdapterSwitch(self, lambda: self._set_adapter_layers(False))

    # --- PEFT verbs that have no meaning here ----------------------------------------------

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Not possible: see ``merge_adapter``."""
        raise NotImplementedError(_CANNOT_MERGE)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not possible: post-block steering acts on the residual stream after each block,
        through a nonlinearity and not through a weight, so it has no weight to merge into."""
        raise NotImplementedError(_CANNOT_MERGE)

    def unmerge_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not possible: nothing is ever merged (see ``merge_adapter``)."""
        raise NotImplementedError(_CANNOT_MERGE)

    # --- state -----------------------------------------------------------------------------

    def get_extra_state(self) -> torch.Tensor:
        """The configs as a uint8 tensor of JSON, so that state_dict() carries them."""
        return encode_state(self._saved_state())

    def set_extra_state(self, state: Any) -> None:
        """Check that a loaded state_dict is for this model; take over its scale."""
        self._load_saved_state(decode_state(state, type(self).__name__))

    def steering_tensors(self, adapter_name: str = DEFAULT_ADAPTER_NAME) -> dict[str, torch.Tensor]:
        """Every steering tensor of adapter ``adapter_name`` on the CPU, keyed as in
        steer_model.safetensors (``steering_file_key``: "layers.{index}.{down,up}.{weight,bias}"
        at site "block").

        Tensors sharded by FSDP2 (DTensors) are gathered whole: under FSDP2 every process
        calls this (a collective)."""
        tensors = {}
        for index, site, adapter in self._all_adapters(adapter_name):
            for name, tensor in adapter.state_dict().items():
                key = steering_file_key(index, site, name)
                tensors[key] = full_tensor(tensor.detach()).to("cpu").contiguous()
        return tensors

    def load_steering_tensors(
        self, tensors: dict[str, torch.Tensor], adapter_name: str = DEFAULT_ADAPTER_NAME
    ) -> None:
        """Copy tensors keyed as ``steering_tensors`` gives them into the steering modules of
        adapter ``adapter_name``."""
        with torch.no_grad():
            for index, site, adapter in self._all_adapters(adapter_name):
                for name, parameter in adapter.state_dict(keep_vars=True).items():
                    parameter.copy_(tensors[steering_file_key(index, site, name)])


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (a parameter FSDP2 shards) gathered whole, a collective every process of its
    mesh runs; any other tensor as it is."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            return tensor.full_tensor()
    return tensor


def _on_transformers_model(function: Any) -> Any:
    """``function``, a method written for a transformers model, as a method of the wrapper: it
    calls ``function`` with the wrapped transformers model as ``self``. Whoever binds it again
    (accelerate's mixed-precision wrapper rebinds a model's forward) binds it to the wrapper,
    and it still reaches the transformers model."""

    @functools.wraps(function)
    def forward(wrapper: SteeringWrapper, *args: Any, **kwargs: Any) -> Any:
        return function(wrapper.get_base_model(), *args, **kwargs)

    return forward


_CANNOT_MERGE = (
    "post-block steering acts on the residual stream after each decoder block, not through a "
    "weight, so it cannot be merged into the model's weights; unload() takes the adapters off "
    "and gives back the base model"
)


def _keep_adapter_state(module: SteeringWrapper, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: keep the adapters and the extra state, drop the frozen base
    weights (they belong to the base model's own checkpoint)."""
    keep = module._adapter_parameter_names()
    for key in [key for key in state_dict if key.startswith(prefix)]:
        name = key[len(prefix) :]
        if name != EXTRA_STATE_KEY and name not in keep:
            del state_dict[key]


def _upgrade_legacy_keys(module: SteeringWrapper, state_dict, prefix, *args: Any) -> None:
    """load_state_dict pre-hook: a state_dict of format 2 or earlier (its extra state says)
    named the steering parameters without the adapter segment; its keys are renamed before any
    tensor is copied."""
    state = state_dict.get(prefix + EXTRA_STATE_KEY)
    if state is None:
        return
    values = decode_state(state, type(module).__name__)
    if is_legacy_format(module._saved_steer_format(values)):
        upgrade_state_dict_keys(state_dict, prefix)


def _ignore_missing_base_weights(module: SteeringWrapper, incompatible_keys) -> None:
    """load_state_dict post-hook: an adapter state_dict has no base weights."""
    keep = module._adapter_parameter_names()
    incompatible_keys.missing_keys[:] = [
        key for key in incompatible_keys.missing_keys if is_adapter_key(key, keep)
    ]
