"""Row routing: every row of a mixed batch with its own adapter and its own strength.

``SteerModel(..., adapter_names=[...], steering_scales=[...])`` (and ``generate``) gives each
row one of the model's loaded adapters, or "__base__" for none, and optionally its own scale.
The model turns the names into a ``RowRouting`` (model-level adapter ids, one per row) and sets
it on every steered block for the length of the call. At each site of each block,
``mixed_site_steerer`` then runs ``multi_adapter_steer`` once over every adapter that steers
that site there, stacked:

    slot 0:     zeros, "no steering": rows routed there come out exactly as they went in
    slot k > 0: the k-th adapter steering the site, its D [r, d] and U [d, r] zero-padded to
                the largest rank R of the stack (padded lanes give phi(0) = 0, so they add
                nothing); a steering vector b is a slot with zero D, U and b_u = b

A row's slot at a site is ``slot_table[adapter_id]``, a gather on the device, so neither the
ids nor the scales are ever Python values the kernels or a compiled graph specialise on. A
row whose adapter does not steer a layer (other ``layers``, other sites) has slot 0 there.

The stacks are rebuilt at every call while autograd records (so that gradients reach each
adapter's own parameters, from its rows only) and cached otherwise, keyed by the parameters'
identities and versions, so that decoding does not restack every layer at every token
(parameters created under ``torch.inference_mode`` have no version counter: they are restacked
at every call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..modules import Steering, block_dtype
from ..ops.multi_adapter_steer import multi_adapter_steer


@dataclass(frozen=True, eq=False)
class RowRouting:
    """The routing of one mixed-batch call.

    Attributes:
        names: the adapter names in model-level id order; ``names[0]`` is "__base__".
        adapter_ids: [B] int64, each row's id in ``names``.
        scales: [B] fp32, each row's strength, or None for each adapter's own scale.
    """

    names: tuple[str, ...]
    adapter_ids: torch.Tensor
    scales: torch.Tensor | None


def per_token(row_values: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """[B] row values as one per token of ``hidden`` ([B', T, d] or [B', d]): B' = k B when
    generate expanded every row k times (beams, several return sequences: transformers repeats
    each row in place, as ``repeat_interleave`` does)."""
    rows, batch = hidden.shape[0], row_values.shape[0]
    if rows != batch:
        if rows % batch:
            raise ValueError(
                f"adapter_names: the batch has {batch} rows, but a steered layer received "
                f"{rows}, which is not a multiple of it"
            )
        row_values = row_values.repeat_interleave(rows // batch)
    row_values = row_values.to(hidden.device)
    return row_values.view(rows, *([1] * (hidden.dim() - 2))).expand(hidden.shape[:-1])


def _parameters(members: Sequence[Steering]) -> list[torch.Tensor]:
    return [p for module in members for p in module.parameters()]


def stack_adapters(
    members: Sequence[Steering], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, tuple[str, ...]]:
    """(down_weights [A, R, d], up_weights [A, d, R], down_biases [A, R] or None, up_biases
    [A, d] or None, activations) of ``members`` as slots 1..A-1 behind a zero slot 0, in
    ``dtype``; differentiable in every member's parameters."""
    rank = max(1, *(module.rank for module in members))
    hidden_size = members[0].hidden_size
    zeros_down = torch.zeros(rank, hidden_size, dtype=dtype, device=device)
    zeros_up = torch.zeros(hidden_size, rank, dtype=dtype, device=device)
    has_down_bias = any(m.rank > 0 and m.down.bias is not None for m in members)
    has_up_bias = any(m.rank == 0 or m.up.bias is not None for m in members)
    downs, ups = [zeros_down], [zeros_up]
    down_biases = [zeros_down.new_zeros(rank)]
    up_biases = [zeros_up.new_zeros(hidden_size)]
    for module in members:
        if module.rank == 0:
            downs.append(zeros_down)
            ups.append(zeros_up)
            down_biases.append(down_biases[0])
            up_biases.append(module.vector.to(device=device, dtype=dtype))
            continue
        pad = rank - module.rank
        downs.append(F.pad(module.down.weight.to(device=device, dtype=dtype), (0, 0, 0, pad)))
        ups.append(F.pad(module.up.weight.to(device=device, dtype=dtype), (0, pad)))
        down_bias, up_bias = module.down.bias, module.up.bias
        down_biases.append(
            down_biases[0]
            if down_bias is None
            else F.pad(down_bias.to(device=device, dtype=dtype), (0, pad))
        )
        up_biases.append(
            up_biases[0] if up_bias is None else up_bias.to(device=device, dtype=dtype)
        )
    activations = ("identity", *(module.activation for module in members))
    return (
        torch.stack(downs),
        torch.stack(ups),
        torch.stack(down_biases) if has_down_bias else None,
        torch.stack(up_biases) if has_up_bias else None,
        activations,
    )


def _cached(cache: dict, key: Any, make: Callable[[], Any]) -> Any:
    if key not in cache:
        if len(cache) > 64:  # stale entries of replaced parameters or of other dtypes
            cache.clear()
        cache[key] = make()
    return cache[key]


def mixed_site_steerer(
    routing: RowRouting, site: str, members: dict[str, Steering], cache: dict
) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """(hidden, residual or None) -> the hidden state of every row steered by its own adapter
    at ``site`` (plus residual when given), for the adapters ``members`` (name -> module) that
    steer ``site`` in this block. ``cache`` is the block's: slot tables, scale tables and, when
    nothing is recorded for autograd, the stacked weights."""
    names = tuple(members)
    modules = tuple(members.values())
    slot_of = {name: slot for slot, name in enumerate(names, start=1)}

    def steer(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        dtype = block_dtype(hidden, residual)
        device = hidden.device
        parameters = _parameters(modules)
        recording = torch.is_grad_enabled() and any(p.requires_grad for p in parameters)
        # Inference tensors (a model built under torch.inference_mode) keep no version counter,
        # so an in-place change could not be told from the cache key: they are restacked.
        if recording or torch.compiler.is_compiling() or any(p.is_inference() for p in parameters):
            stacked = stack_adapters(modules, dtype, device)
        else:
            versions = tuple((id(p), p._version) for p in parameters)
            stacked = _cached(
                cache,
                ("stack", site, names, dtype, device, versions),
                lambda: stack_adapters(modules, dtype, device),
            )
        down, up, down_bias, up_bias, activations = stacked
        slot_table = _cached(
            cache,
            ("slots", site, names, routing.names, device),
            lambda: torch.tensor([slot_of.get(name, 0) for name in routing.names], device=device),
        )
        slots = slot_table[routing.adapter_ids.to(device)]
        if routing.scales is None:
            scale_values = (0.0, *(float(module.scale) for module in modules))
            scale_table = _cached(
                cache,
                ("scales", site, names, scale_values, device),
                lambda: torch.tensor(scale_values, dtype=torch.float32, device=device),
            )
            row_scales = scale_table[slots]
        else:
            row_scales = routing.scales
        # At a branch site a low-rank adapter reads the branch alone: the add follows.
        fuse = site == "block"
        out = multi_adapter_steer(
            hidden.to(dtype),
            down,
            up,
            down_bias,
            up_bias,
            # Expanded views: the op flattens them into contiguous [N] tensors itself.
            adapter_index=per_token(slots, hidden),
            scales=per_token(row_scales, hidden),
            activations=activations,
            residual=None if residual is None or not fuse else residual.to(dtype),
            backend=modules[0].backend,
            check_index=False,
        )
        return out if residual is None or fuse else residual.to(dtype) + out

    return steer
