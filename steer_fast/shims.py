"""What steer_fast relies on in transformers, PEFT, the Trainer and bitsandbytes beyond their
documented API.

Everything here reads or calls something that belongs to another library and may change with
its version: a private attribute, a wrapper recognised by its code name, a state-dict naming
convention, a storage layout. Keeping it in one module means one place to read against a new
version, and ``tests/test_shims.py`` (``tests/test_shims_distributed.py`` for TRL, accelerate's
FSDP plugin and the Trainer's DDP settings) checks each function against the installed versions
(a test there fails when the behaviour a shim relies on changes). Nothing here imports
transformers, PEFT, TRL or bitsandbytes: the shims look at the objects they are given, so
importing steer_fast stays light.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# ----------------------------------------------------------------------------------------------
# torch.nn.Module
# ----------------------------------------------------------------------------------------------

# nn.Module's forward-hook registries, which a SteeredBlock shares with the layer it wraps.
FORWARD_HOOK_DICTS: tuple[str, ...] = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def share_forward_hooks(block: nn.Module, layer: nn.Module) -> None:
    """Make ``block`` use ``layer``'s forward hooks and pre-hooks (the same dicts): a hook
    registered on either fires once per call of ``block``, and stays on ``layer`` afterwards."""
    for name in FORWARD_HOOK_DICTS:
        if hasattr(layer, name):
            object.__setattr__(block, name, getattr(layer, name))


# ----------------------------------------------------------------------------------------------
# transformers decoder layers
# ----------------------------------------------------------------------------------------------

# Decoder layers return a tensor from transformers 5 on (a tuple before), which the fused path
# relies on.
MIN_TRANSFORMERS_MAJOR_FOR_FUSING = 5


def transformers_major() -> int | None:
    """The major version of the imported transformers, or None if it is not imported."""
    version = getattr(sys.modules.get("transformers"), "__version__", None)
    if not isinstance(version, str):
        return None
    try:
        return int(version.split(".")[0])
    except ValueError:
        return None


def layer_forward_function(layer: nn.Module) -> Callable[..., Any]:
    """``layer``'s forward as a function of (layer, *args, **kwargs), outside any checkpointing.

    A SteeredBlock does the gradient checkpointing of the layer it wraps, so it calls the
    layer's forward without transformers' checkpointing wrapper: transformers 5 puts one named
    ``forward_with_checkpointing`` around ``GradientCheckpointingLayer.forward`` (keeping the
    original as ``__wrapped__``); earlier versions checkpoint in ``__call__`` instead. A forward
    set on the instance (accelerate hooks) is used as it is.
    """
    if "forward" in vars(layer):
        return _call_instance_forward
    forward = type(layer).forward
    code = getattr(forward, "__code__", None)
    if code is not None and code.co_name == "forward_with_checkpointing":
        forward = forward.__wrapped__
    return forward


def _call_instance_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return module.forward(*args, **kwargs)


def checkpointing_active(layer: nn.Module, training: bool) -> bool:
    """Whether ``layer`` is set to be gradient-checkpointed now: its ``gradient_checkpointing``
    flag, which ``gradient_checkpointing_enable()`` sets on every layer it covers, in training
    mode with gradients enabled."""
    # Without gradients there is no backward to replay the layer, so it runs as it is (as
    # transformers' own wrapper does, e.g. when generating from a model in training mode).
    return (
        bool(getattr(layer, "gradient_checkpointing", False))
        and training
        and torch.is_grad_enabled()
    )


def checkpointed_call(
    layer: nn.Module, function: Callable[..., Any], args: tuple, kwargs: dict[str, Any]
) -> Any:
    """``function(*args, **kwargs)`` under ``layer``'s gradient checkpointing, as transformers'
    ``GradientCheckpointingLayer.__call__`` does it for the layer itself: the cache is not
    written twice (forward and recompute), and layers that cannot checkpoint with a cache get
    none. ``layer._gradient_checkpointing_func`` is the function
    ``gradient_checkpointing_enable()`` installs (torch.utils.checkpoint with its arguments)."""
    kwargs = dict(kwargs)
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    if not getattr(layer, "_can_checkpoint_with_cache", False):
        # The cache's name differs between transformers versions and layers.
        for name in ("past_key_values", "cache", "layer_past"):
            if kwargs.get(name) is not None:
                kwargs[name] = None
    return layer._gradient_checkpointing_func(functools.partial(function, **kwargs), *args)


# ----------------------------------------------------------------------------------------------
# PEFT
# ----------------------------------------------------------------------------------------------

# The prefix of every key of PeftModel.state_dict() and get_peft_model_state_dict() that lies
# inside the wrapped model (PeftModel.base_model is the tuner, whose .model is the model).
PEFT_MODEL_PREFIX = "base_model.model."


def lora_b_weight(module: nn.Module, adapter_name: str) -> torch.Tensor | None:
    """The B matrix (out_features x r) of LoRA adapter ``adapter_name`` in a PEFT LoRA layer,
    or None if ``module`` is not a LoRA layer holding that adapter. PEFT keeps it as
    ``module.lora_B[adapter_name].weight``, an nn.Linear(r, out_features)."""
    lora_b = getattr(module, "lora_B", None)
    if not isinstance(lora_b, nn.ModuleDict) or adapter_name not in lora_b:
        return None
    return lora_b[adapter_name].weight


def peft_adapter_layers_enabled(model: nn.Module) -> bool:
    """Whether the PEFT LoRA layers in ``model`` run their adapters: PEFT's switch
    (``enable_adapter_layers`` / ``disable_adapter_layers``) sets each layer's
    ``disable_adapters`` property. True when no layer is switched off."""
    return not any(
        module.disable_adapters
        for module in model.modules()
        if isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
    )


# ----------------------------------------------------------------------------------------------
# bitsandbytes
# ----------------------------------------------------------------------------------------------

# The class of bitsandbytes' 4-bit weights (bitsandbytes.nn.Params4bit), recognised by its name
# as PEFT recognises it, so that counting parameters imports nothing.
BNB_4BIT_PARAMETER_CLASS = "Params4bit"


def parameter_count(parameter: torch.Tensor) -> int:
    """The number of values ``parameter`` stands for, as PEFT's ``get_nb_trainable_parameters``
    counts them.

    Its ``numel()``, except that a bitsandbytes 4-bit weight (``Params4bit``) packs its values
    two to a byte into elements of its storage dtype (``bnb_4bit_quant_storage``, uint8 by
    default), so that it holds ``2 * element_size()`` values per element, whatever layout
    bitsandbytes repacks it into for the CPU on its first forward; and a parameter DeepSpeed
    ZeRO-3 has partitioned away (numel 0) counts its ``ds_numel``.
    """
    count = parameter.numel()
    if count == 0 and hasattr(parameter, "ds_numel"):
        count = int(parameter.ds_numel)
    if type(parameter).__name__ == BNB_4BIT_PARAMETER_CLASS:
        count *= 2 * parameter.element_size()
    return count


# ----------------------------------------------------------------------------------------------
# transformers.Trainer
# ----------------------------------------------------------------------------------------------


def trainer_loss_is_scaled(trainer: Any, num_items_in_batch: Any) -> bool:
    """Whether the Trainer takes a training loss as already normalised over the whole
    accumulated batch (it divides it by the accumulation steps otherwise): its attribute
    ``loss_is_scaled_for_ga`` where it has one, else the rule it applies."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (
            trainer.model_accepts_loss_kwargs and num_items_in_batch is not None
        ) or trainer.compute_loss_func is not None
    return bool(scaled)


def trainer_accumulation_steps(trainer: Any) -> int:
    """The number of micro-batches in the Trainer's current optimizer step."""
    return getattr(trainer, "current_gradient_accumulation_steps", 1) or 1


# ----------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------

# The name of the function TRL's trainers install as a model's forward to compute per-token
# log-probabilities without materialising the logits (trl.trainer.utils.add_fused_lm_head), and
# the keyword argument that switches it on.
TRL_FUSED_FORWARD_NAME = "_fused_forward"
TRL_FUSED_FLAG = "fused_lm_head"


def trl_fused_lm_head(value: Any, owner: nn.Module) -> Callable[..., Any] | None:
    """The function of ``value`` if it is TRL's fused LM-head forward bound to ``owner``, else
    None.

    TRL's SFT, GRPO, DPO, KTO and RLOO trainers patch the model they train with
    ``model.forward = types.MethodType(_fused_forward, model)``. Called with
    ``fused_lm_head=True``, that function runs ``self.base_model`` (in transformers, the
    decoder backbone, whose output has ``last_hidden_state``) and projects through
    ``self.get_output_embeddings()``; otherwise it calls the forward it replaced. It is
    recognised by its code name and its keyword-only ``fused_lm_head`` argument.
    """
    if not isinstance(value, types.MethodType) or value.__self__ is not owner:
        return None
    function = value.__func__
    code = getattr(function, "__code__", None)
    if code is None or code.co_name != TRL_FUSED_FORWARD_NAME:
        return None
    keyword_only = code.co_varnames[code.co_argcount : code.co_argcount + code.co_kwonlyargcount]
    return function if TRL_FUSED_FLAG in keyword_only else None
