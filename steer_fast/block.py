"""The steered block: a decoder layer followed by its post-block adapter.

A ``SteeredBlock`` stands in for one decoder layer of a model and computes

    out = h + s * (U phi(D h + b_d) + b_u)       h: the layer's output (after its skip add)

on one of two paths, fixed when it is made (``steer_fast.injection`` decides which):

- "fused": the layer's family has a layout in ``steer_fast.families``; the block runs the
  layer's own submodules and hands the MLP branch and the residual to post_block_steer, which
  does the final residual add and the steering in one kernel.
- "plain": the layer runs as it is and its output (a tensor, or the first element of a tuple)
  is steered.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapter import PostBlockAdapter
from .families import FusedBlockSpec, run_fused_block
from .ops import post_block_steer
from .shims import (
    checkpointed_call,
    checkpointing_active,
    layer_forward_function,
    share_forward_hooks,
)

PATH_FUSED = "fused"
PATH_PLAIN = "plain"

# Every steering parameter's name contains this, so that they are easy to select.
ADAPTER_NAME = "steer_adapter"


def is_steering_parameter(name: str) -> bool:
    """Whether the parameter called ``name`` (in any enclosing module) belongs to a
    post-block adapter."""
    return f".{ADAPTER_NAME}." in name


def steer_hidden_states(
    adapter: PostBlockAdapter, hidden: torch.Tensor, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """post_block_steer with ``adapter``'s weights, in the dtype the unsteered block returns.

    The op takes one dtype for all tensors. A block returns ``residual + hidden`` in the promoted
    dtype of the two (under torch.autocast the residual stream can be fp32 while a branch output
    is bf16), so that dtype is used: residual, hidden and the adapter weights are cast to it
    (a no-op when they already match; the weight cast is differentiable, so fp32 adapter weights
    in a bf16 model train as fp32 master weights).
    """
    dtype = hidden.dtype if residual is None else torch.promote_types(hidden.dtype, residual.dtype)
    hidden = hidden.to(dtype)
    if residual is not None:
        residual = residual.to(dtype)
    down, up = adapter.down, adapter.up
    return post_block_steer(
        hidden,
        down.weight.to(dtype),
        up.weight.to(dtype),
        None if down.bias is None else down.bias.to(dtype),
        None if up.bias is None else up.bias.to(dtype),
        activation=adapter.activation,
        scale=adapter.scale,
        residual=residual,
        backend=adapter.backend,
    )


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
    """

    index: int
    layer_class: str
    path: str
    reason: str
    spec: FusedBlockSpec | None = None


class SteeredBlock(nn.Module):
    """A decoder layer followed by its post-block adapter; stands in for the layer.

    ``base_layer`` is the original layer, ``steer_adapter`` its PostBlockAdapter. The block is
    called exactly as the layer is and returns what the layer returns, with the hidden states
    steered. The block shares its forward hooks and pre-hooks with the wrapped layer: hooks
    registered on either (such as those transformers installs for ``output_hidden_states``) fire
    once per call, around the steered block, so they see the steered output, and they stay on
    the layer when the block is removed. Gradient checkpointing follows the wrapped layer's own
    setting (``gradient_checkpointing_enable()`` sets it) and covers the adapter.
    """

    def __init__(self, base_layer: nn.Module, adapter: PostBlockAdapter, plan: LayerPlan) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.steer_adapter = adapter
        self.layer_index = plan.index
        self.path = plan.path
        self.path_reason = plan.reason
        self.steering_enabled = True
        self._spec = plan.spec
        self._layer_forward = layer_forward_function(base_layer)
        self._call = CallConvention.of(self._layer_forward) if plan.spec else None
        share_forward_hooks(self, base_layer)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if checkpointing_active(self.base_layer, self.training):
            return checkpointed_call(self.base_layer, self._steered_forward, args, kwargs)
        return self._steered_forward(*args, **kwargs)

    def _steered_forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.steering_enabled:
            return self._layer_forward(self.base_layer, *args, **kwargs)
        if self._spec is not None:
            hidden_states, call_kwargs = self._call.split(args, kwargs)
            branch, residual = run_fused_block(
                self.base_layer, self._spec, hidden_states, call_kwargs
            )
            return steer_hidden_states(self.steer_adapter, branch, residual)
        output = self._layer_forward(self.base_layer, *args, **kwargs)
        if isinstance(output, torch.Tensor):
            return steer_hidden_states(self.steer_adapter, output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (steer_hidden_states(self.steer_adapter, output[0]), *output[1:])
        raise TypeError(
            f"{type(self.base_layer).__name__} returned {type(output).__name__}; a steered "
            "layer must return its hidden states as a tensor or as the first element of a tuple"
        )

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}, path={self.path!r}"
