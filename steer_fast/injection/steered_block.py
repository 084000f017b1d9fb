"""The steered block: a decoder layer with its steering; it stands in for the layer.

A ``SteeredBlock`` holds the steering modules of every adapter that steers its layer
(``steer_fast.modules``), one ``nn.ModuleDict`` per site keyed by adapter name (the naming rule
of ``steer_fast.constants``: ``steer_adapter.{name}`` at "block", ``steer_adapter_attn.{name}``
and ``steer_adapter_mlp.{name}`` at the branch sites). At "block" the layer's output h (after
its skip connection) becomes

    out = h + s * (U phi(D h + b_d) + b_u)       (rank >= 1)      or      h + s * b   (rank 0)

and at "attn" / "mlp" the same is applied to that branch's output before its residual add.
The block takes one of two paths, fixed when it is made (``steer_fast.injection.plan``
decides):

- "fused": the layer's family has a layout in ``families``; the block runs the layer's own
  submodules and hands the MLP branch and the residual to the steering op, which does the final
  residual add and the steering in one kernel (a rank-0 vector at a branch site is fused with
  that branch's residual add too).
- "plain": the layer runs as it is; its output (a tensor, or the first element of a tuple) is
  steered at "block", and forward hooks on the branch modules steer "attn" / "mlp".

One adapter, the active one, runs on every row; a mixed batch (``routing``) instead gives each
row its own adapter and strength, and every site then runs ``multi_adapter_steer`` over the
stacked adapters of that site.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..constants import DEFAULT_ADAPTER_NAME, PATH_FUSED, PATH_PLAIN, SITES, site_attribute
from ..modules import Steering
from ..shims import (
    checkpointed_call,
    checkpointing_active,
    layer_forward_function,
    share_forward_hooks,
)
from .families import FusedBlockSpec, run_fused_block
from .routing import RowRouting, mixed_site_steerer

__all__ = ["PATH_FUSED", "PATH_PLAIN", "CallConvention", "LayerPlan", "SteeredBlock"]

# (hidden, residual or None) -> the steered hidden state (residual + hidden when given).
SiteSteerer = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def steer_hidden_states(
    adapter: Steering, hidden: torch.Tensor, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``adapter`` applied to ``hidden`` (plus ``residual``), in the dtype the unsteered block
    returns: the promoted dtype of residual and hidden (under torch.autocast the residual
    stream can be fp32 while a branch output is bf16); see ``PostBlockAdapter.steer``."""
    return adapter.steer(hidden, residual)


@dataclass(frozen=True)
class CallConvention:
    """How a layer's forward takes its arguments, for the fused path to pass them on.

    Attributes:
        positional: names of the parameters after hidden_states that can be given by position.
        defaults: the default of every parameter besides hidden_states that has one.
    """

    positional: tuple[str, ...]
    defaults: dict[str, Any]

    @classmethod
    def of(cls, forward: Callable[..., Any]) -> CallConvention:
        parameters = list(inspect.signature(forward).parameters.values())[2:]  # self, hidden
        by_position = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        return cls(
            positional=tuple(p.name for p in parameters if p.kind in by_position),
            defaults={
                p.name: p.default
                for p in parameters
                if p.kind not in variadic and p.default is not inspect.Parameter.empty
            },
        )

    def split(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """(hidden_states, every other argument by name, defaults filled in)."""
        if args:
            hidden_states, extra = args[0], args[1:]
        elif "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            hidden_states, extra = kwargs.pop("hidden_states"), ()
        else:
            raise TypeError("the decoder layer was called without hidden_states")
        if len(extra) > len(self.positional):
            raise TypeError(
                f"the decoder layer takes at most {len(self.positional) + 1} positional "
                f"arguments, got {len(args)}"
            )
        call = dict(self.defaults)
        for name, value in zip(self.positional, extra, strict=False):
            if name in kwargs:
                raise TypeError(f"the decoder layer got multiple values for argument {name!r}")
            call[name] = value
        call.update(kwargs)
        return hidden_states, call


@dataclass(frozen=True)
class LayerPlan:
    """How one decoder layer is steered.

    Attributes:
        index: the layer's index in the model's decoder-layer list.
        layer_class: the layer's class name.
        path: "fused" or "plain".
        reason: why the layer takes that path, in words.
        spec: the fused-block layout (fused path only).
        branch_ends: site ("attn", "mlp") -> path inside the layer of the module whose output
            that site steers (plain path, branch sites only).
    """

    index: int
    layer_class: str
    path: str
    reason: str
    spec: FusedBlockSpec | None = None
    branch_ends: dict[str, str] = field(default_factory=dict)


class SteeredBlock(nn.Module):
    """A decoder layer with its steering modules; stands in for the layer.

    ``base_layer`` is the original layer; ``steer_adapter``, ``steer_adapter_attn`` and
    ``steer_adapter_mlp`` (those of the sites some adapter steers here) map each adapter's name
    to its steering module at that site. The block is called exactly as the layer is and returns
    what the layer returns, steered. The block shares its forward hooks and pre-hooks with the
    wrapped layer: hooks registered on either (such as those transformers installs for
    ``output_hidden_states``) fire once per call, around the steered block, so they see the
    steered output, and they stay on the layer when the block is removed. Gradient checkpointing
    follows the wrapped layer's own setting (``gradient_checkpointing_enable()`` sets it) and
    covers the steering. On the plain path the branch sites are forward hooks on the branch
    modules, put on by ``attach()`` and taken off by ``detach()``.

    Args:
        base_layer: the decoder layer.
        adapters: the first adapter's steering modules, by site (empty for a layer that only
            adapters added later steer), stored under ``adapter_name``.
        plan: how the layer is steered (``steer_fast.injection.plan``).
        adapter_name: the first adapter's name.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapters: dict[str, Steering],
        plan: LayerPlan,
        adapter_name: str = DEFAULT_ADAPTER_NAME,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        # The adapters that steer this layer, in the order they were added.
        self._adapter_order: list[str] = []
        self.active_adapter = DEFAULT_ADAPTER_NAME
        self.layer_index = plan.index
        self.path = plan.path
        self.path_reason = plan.reason
        self.steering_enabled = True
        self._spec = plan.spec
        self._branch_ends = dict(plan.branch_ends)
        self._hook_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._attached = False
        # Set by the model for the length of a mixed-batch call (``routing``).
        self.routing: RowRouting | None = None
        # The steerers of the call under way, for the branch hooks of the plain path.
        self._steerers: dict[str, SiteSteerer] = {}
        self._stack_cache: dict = {}
        self._layer_forward = layer_forward_function(base_layer)
        self._call = CallConvention.of(self._layer_forward) if plan.spec else None
        share_forward_hooks(self, base_layer)
        if adapters:
            self._store(adapter_name, adapters)

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites the default adapter steers in this layer (in the order block, attn, mlp)."""
        return tuple(self.adapters(DEFAULT_ADAPTER_NAME))

    def adapters(self, adapter_name: str = DEFAULT_ADAPTER_NAME) -> dict[str, Steering]:
        """Site -> the steering module of adapter ``adapter_name`` ("default": the model's
        first adapter); empty when that adapter does not steer this layer."""
        found = {}
        for site in SITES:
            modules = getattr(self, site_attribute(site), None)
            if modules is not None and adapter_name in modules:
                found[site] = modules[adapter_name]
        return found

    def adapter_names(self) -> list[str]:
        """The names of the adapters that steer this layer, in the order they were added (the
        model's first adapter, "default", first)."""
        return list(self._adapter_order)

    def _store(self, adapter_name: str, adapters: dict[str, Steering]) -> None:
        for site, module in adapters.items():
            attribute = site_attribute(site)
            if not hasattr(self, attribute):
                self.add_module(attribute, nn.ModuleDict())
            getattr(self, attribute)[adapter_name] = module
        self._adapter_order.append(adapter_name)

    def add_adapter(
        self, adapter_name: str, adapters: dict[str, Steering], branch_ends: dict[str, str]
    ) -> None:
        """Add adapter ``adapter_name`` (site -> module); ``branch_ends`` names the branch
        modules of its branch sites (plain path; checked by the caller)."""
        self._store(adapter_name, adapters)
        attached = self._attached
        self.detach()
        self._branch_ends.update(branch_ends)
        if attached:
            self.attach()
        self._stack_cache.clear()

    def delete_adapter(self, adapter_name: str) -> None:
        """Take adapter ``adapter_name`` off this layer, if it steers it."""
        for site in SITES:
            modules = getattr(self, site_attribute(site), None)
            if modules is not None and adapter_name in modules:
                del modules[adapter_name]
        if adapter_name in self._adapter_order:
            self._adapter_order.remove(adapter_name)
        self._stack_cache.clear()

    # --- branch hooks (plain path) ---------------------------------------------------------

    def attach(self) -> None:
        """Put the branch sites' hooks on the branch modules (plain path; idempotent)."""
        if self._attached:
            return
        self._attached = True
        for site, path in self._branch_ends.items():
            module = self.base_layer.get_submodule(path)
            self._hook_handles.append(module.register_forward_hook(self._branch_hook(site)))

    def detach(self) -> None:
        """Take the branch hooks off again."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        self._attached = False

    def _branch_hook(self, site: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            steerer = self._steerers.get(site)
            if steerer is None:
                return None
            return _steer_output(steerer, output, module)

        return hook

    # --- forward ---------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # The routing is read now and travels with the call, so that a checkpointed layer
        # recomputed in the backward (after the mixed-batch call returned) routes alike.
        run = functools.partial(self._steered_forward, self.routing)
        if checkpointing_active(self.base_layer, self.training):
            return checkpointed_call(self.base_layer, run, args, kwargs)
        return run(*args, **kwargs)

    def _steered_forward(self, routing: RowRouting | None, *args: Any, **kwargs: Any) -> Any:
        steerers = self._site_steerers(routing) if self.steering_enabled else {}
        if not steerers:
            return self._layer_forward(self.base_layer, *args, **kwargs)
        if self._spec is not None:
            return self._fused_forward(steerers, args, kwargs)
        self._steerers = steerers  # the branch hooks read them
        try:
            output = self._layer_forward(self.base_layer, *args, **kwargs)
        finally:
            self._steerers = {}
        if "block" not in steerers:
            return output
        return _steer_output(steerers["block"], output, self.base_layer)

    def _fused_forward(
        self, steerers: dict[str, SiteSteerer], args: tuple, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        hidden_states, call_kwargs = self._call.split(args, kwargs)
        branch, residual = run_fused_block(
            self.base_layer, self._spec, hidden_states, call_kwargs, steerers.get("attn")
        )
        if "block" not in steerers:
            if "mlp" in steerers:
                return steerers["mlp"](branch, residual)
            return residual + branch  # the layer's own add
        if "mlp" in steerers:
            branch = steerers["mlp"](branch, None)
        return steerers["block"](branch, residual)

    def _site_steerers(self, routing: RowRouting | None) -> dict[str, SiteSteerer]:
        """Site -> how this call steers it: the active adapter's module on every row, or, in a
        mixed batch, each row's own adapter."""
        if routing is None:
            return {
                site: _single_steerer(adapter, site)
                for site, adapter in self.adapters(self.active_adapter).items()
            }
        steerers = {}
        by_name = {name: self.adapters(name) for name in self.adapter_names()}
        for site in SITES:
            members = {
                name: adapters[site] for name, adapters in by_name.items() if site in adapters
            }
            if members:
                steerers[site] = mixed_site_steerer(routing, site, members, self._stack_cache)
        return steerers

    def extra_repr(self) -> str:
        return (
            f"layer_index={self.layer_index}, path={self.path!r}, adapters={self.adapter_names()}"
        )


def _single_steerer(adapter: Steering, site: str) -> SiteSteerer:
    """(hidden, residual) -> the steered hidden, plus residual when given, with one adapter.

    At the block site the adapter reads h = residual + hidden, the add fused into its op. At a
    branch site a low-rank adapter reads the branch alone, so the add follows it; a steering
    vector reads nothing and fuses the add there too (residual + branch + s b in one pass)."""
    if site == "block" or adapter.rank == 0:
        return functools.partial(steer_hidden_states, adapter)

    def steer(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        steered = steer_hidden_states(adapter, hidden)
        return steered if residual is None else residual + steered

    return steer


def _steer_output(steerer: SiteSteerer, output: Any, module: nn.Module) -> Any:
    """``output`` of ``module`` (a tensor, or a tuple whose first element is one) steered."""
    if isinstance(output, torch.Tensor):
        return steerer(output, None)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (steerer(output[0], None), *output[1:])
    raise TypeError(
        f"{type(module).__name__} returned {type(output).__name__}; a steered module must "
        "return its hidden states as a tensor or as the first element of a tuple"
    )
