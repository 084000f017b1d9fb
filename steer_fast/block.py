"""The steered block: a decoder layer with its steering; it stands in for the layer.

A ``SteeredBlock`` holds one steering module per site (``steer_fast.adapter``): at "block",
the layer's output h (after its skip connection) becomes

    out = h + s * (U phi(D h + b_d) + b_u)       (rank >= 1)      or      h + s * b   (rank 0)

and at "attn" / "mlp" the same is applied to that branch's output before its residual add.
The block takes one of two paths, fixed when it is made (``steer_fast.injection`` decides):

- "fused": the layer's family has a layout in ``steer_fast.families``; the block runs the
  layer's own submodules and hands the MLP branch and the residual to the steering op, which
  does the final residual add and the steering in one kernel (a rank-0 vector at a branch site
  is fused with that branch's residual add too).
- "plain": the layer runs as it is; its output (a tensor, or the first element of a tuple) is
  steered at "block", and forward hooks on the branch modules steer "attn" / "mlp".
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapter import Steering
from .families import FusedBlockSpec, run_fused_block
from .shims import (
    checkpointed_call,
    checkpointing_active,
    layer_forward_function,
    share_forward_hooks,
)

PATH_FUSED = "fused"
PATH_PLAIN = "plain"

# Every steering parameter's name contains this, so that they are easy to select: the block
# site's module is ``steer_adapter``, the branch sites' ``steer_adapter_attn`` / ``_mlp``.
ADAPTER_NAME = "steer_adapter"
_STEERING_PARAMETER = re.compile(rf"(?:^|\.){ADAPTER_NAME}(?:_attn|_mlp)?\.")


def adapter_attribute(site: str) -> str:
    """The SteeredBlock attribute holding the steering module of ``site``."""
    return ADAPTER_NAME if site == "block" else f"{ADAPTER_NAME}_{site}"


def is_steering_parameter(name: str) -> bool:
    """Whether the parameter called ``name`` (in any enclosing module) belongs to a steering
    module."""
    return _STEERING_PARAMETER.search(name) is not None


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

    ``base_layer`` is the original layer; ``steer_adapter`` (site "block"),
    ``steer_adapter_attn`` and ``steer_adapter_mlp`` its steering modules, those of its sites.
    The block is called exactly as the layer is and returns what the layer returns, steered.
    The block shares its forward hooks and pre-hooks with the wrapped layer: hooks registered on
    either (such as those transformers installs for ``output_hidden_states``) fire once per
    call, around the steered block, so they see the steered output, and they stay on the layer
    when the block is removed. Gradient checkpointing follows the wrapped layer's own setting
    (``gradient_checkpointing_enable()`` sets it) and covers the steering. On the plain path the
    branch sites are forward hooks on the branch modules, put on by ``attach()`` and taken off
    by ``detach()``.
    """

    def __init__(
        self, base_layer: nn.Module, adapters: dict[str, Steering], plan: LayerPlan
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        for site, adapter in adapters.items():
            setattr(self, adapter_attribute(site), adapter)
        self.sites = tuple(adapters)
        self.layer_index = plan.index
        self.path = plan.path
        self.path_reason = plan.reason
        self.steering_enabled = True
        self._spec = plan.spec
        self._branch_ends = dict(plan.branch_ends)
        self._hook_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._layer_forward = layer_forward_function(base_layer)
        self._call = CallConvention.of(self._layer_forward) if plan.spec else None
        share_forward_hooks(self, base_layer)

    def adapters(self) -> dict[str, Steering]:
        """Site -> its steering module."""
        return {site: getattr(self, adapter_attribute(site)) for site in self.sites}

    # --- branch hooks (plain path) ---------------------------------------------------------

    def attach(self) -> None:
        """Put the branch sites' hooks on the branch modules (plain path; idempotent)."""
        if self._hook_handles:
            return
        for site, path in self._branch_ends.items():
            module = self.base_layer.get_submodule(path)
            self._hook_handles.append(module.register_forward_hook(self._branch_hook(site)))

    def detach(self) -> None:
        """Take the branch hooks off again."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    def _branch_hook(self, site: str):
        attribute = adapter_attribute(site)

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not self.steering_enabled:
                return None
            return _steer_output(getattr(self, attribute), output, module)

        return hook

    # --- forward ---------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if checkpointing_active(self.base_layer, self.training):
            return checkpointed_call(self.base_layer, self._steered_forward, args, kwargs)
        return self._steered_forward(*args, **kwargs)

    def _steered_forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.steering_enabled:
            return self._layer_forward(self.base_layer, *args, **kwargs)
        if self._spec is not None:
            return self._fused_forward(args, kwargs)
        output = self._layer_forward(self.base_layer, *args, **kwargs)
        if "block" not in self.sites:
            return output
        return _steer_output(self.steer_adapter, output, self.base_layer)

    def _fused_forward(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        hidden_states, call_kwargs = self._call.split(args, kwargs)
        add_attention = self._branch_add("attn") if "attn" in self.sites else None
        branch, residual = run_fused_block(
            self.base_layer, self._spec, hidden_states, call_kwargs, add_attention
        )
        if "block" not in self.sites:
            if "mlp" in self.sites:
                return self._branch_add("mlp")(branch, residual)
            return residual + branch  # the layer's own add
        if "mlp" in self.sites:
            branch = steer_hidden_states(self.steer_adapter_mlp, branch)
        return steer_hidden_states(self.steer_adapter, branch, residual)

    def _branch_add(self, site: str):
        """(branch, residual) -> residual + the steered branch. A steering vector does both in
        one pass (residual + branch + s b); a low-rank adapter reads the branch alone, so the
        add follows it."""
        adapter = getattr(self, adapter_attribute(site))
        if adapter.rank == 0:
            return lambda branch, residual: steer_hidden_states(adapter, branch, residual)
        return lambda branch, residual: residual + steer_hidden_states(adapter, branch)

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}, path={self.path!r}, sites={list(self.sites)}"


def _steer_output(adapter: Steering, output: Any, module: nn.Module) -> Any:
    """``output`` of ``module`` (a tensor, or a tuple whose first element is one) steered."""
    if isinstance(output, torch.Tensor):
        return steer_hidden_states(adapter, output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (steer_hidden_states(adapter, output[0]), *output[1:])
    raise TypeError(
        f"{type(module).__name__} returned {type(output).__name__}; a steered module must "
        "return its hidden states as a tensor or as the first element of a tuple"
    )
