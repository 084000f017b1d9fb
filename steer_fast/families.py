"""How the decoder layer of each known transformers family is run with its residual add fused.

Pre-norm decoder layers compute, up to the placement of their norms and dropouts,

    h   = x + attn_branch(x)        attn_branch = post_ops(attention(pre_norm(x), **call_args))
    out = h + mlp_branch(h)         mlp_branch  = post_ops(mlp(pre_norm(h)))

A ``FusedBlockSpec`` names the submodules of one such layout, and ``run_fused_block`` runs any
layer described by a spec up to ``out``'s last add, returning (mlp_branch, h) so that the caller
adds them inside the steering kernel. One generic function serves every family; the table below
has one row per family, naming its layer class and its spec.

A layer takes the fused path only if it passes ``check_fused_layer``: its class is the
transformers implementation named in the table, its forward is the one that class defines, and
it has every submodule its spec names. Anything else (GPT-2, GPT-NeoX, a patched or unknown
layer) takes the plain path, and the reason is reported.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class FusedBlockSpec:
    """Attribute names of a pre-norm decoder layer's submodules.

    Attributes:
        attention: the self-attention module. It is called with ``hidden_states=`` the normed
            input and every other argument the layer received, as the layer itself calls it; the
            first element of its output (a tuple or a tensor) is the branch output.
        mlp: the feed-forward module.
        attention_norm: the norm applied to the layer input before attention, or None.
        attention_post: modules applied in order to the attention output before the first
            residual add (post-attention norms, residual dropouts).
        mlp_norm: the norm applied to h before the MLP, or None.
        mlp_post: modules applied in order to the MLP output before the final residual add.
    """

    attention: str = "self_attn"
    mlp: str = "mlp"
    attention_norm: str | None = "input_layernorm"
    attention_post: tuple[str, ...] = ()
    mlp_norm: str | None = "post_attention_layernorm"
    mlp_post: tuple[str, ...] = ()

    def module_names(self) -> tuple[str, ...]:
        """Every attribute the layer must have, in the order the block uses them."""
        names = (
            self.attention_norm,
            self.attention,
            *self.attention_post,
            self.mlp_norm,
            self.mlp,
            *self.mlp_post,
        )
        return tuple(name for name in names if name is not None)


# Llama and its many copies: x + attn(norm(x)), then h + mlp(norm(h)).
PRE_NORM = FusedBlockSpec()
# Phi3: Llama with a dropout on each branch output.
PRE_NORM_BRANCH_DROPOUT = FusedBlockSpec(
    attention_post=("resid_attn_dropout",), mlp_post=("resid_mlp_dropout",)
)
# Gemma2/3: a norm before and after each branch ("sandwich" norms).
SANDWICH_NORM = FusedBlockSpec(
    attention_post=("post_attention_layernorm",),
    mlp_norm="pre_feedforward_layernorm",
    mlp_post=("post_feedforward_layernorm",),
)
# OLMo2/3: the norms sit at the end of each residual branch, none before it.
BRANCH_POST_NORM = FusedBlockSpec(
    attention_norm=None,
    attention_post=("post_attention_layernorm",),
    mlp_norm=None,
    mlp_post=("post_feedforward_layernorm",),
)


@dataclass(frozen=True)
class FusedFamily:
    """One row of the table: a transformers decoder-layer class and how it is fused.

    Attributes:
        model_type: ``config.model_type`` of the family's models (for documentation).
        layer_class: the decoder layer's class name.
        module: the transformers module defining it, ``transformers.models.<module>``.
        spec: the layer's layout.
    """

    model_type: str
    layer_class: str
    module: str
    spec: FusedBlockSpec

    @property
    def module_path(self) -> str:
        return f"transformers.models.{self.module}.modeling_{self.module}"


# Each row was read against the transformers 5.17 and 5.23 source of the layer, and is checked by
# the test suite (fused layer == original layer, exactly, with a zero adapter).
FUSED_FAMILIES: tuple[FusedFamily, ...] = (
    FusedFamily("llama", "LlamaDecoderLayer", "llama", PRE_NORM),
    FusedFamily("mistral", "MistralDecoderLayer", "mistral", PRE_NORM),
    FusedFamily("mixtral", "MixtralDecoderLayer", "mixtral", PRE_NORM),
    FusedFamily("qwen2", "Qwen2DecoderLayer", "qwen2", PRE_NORM),
    FusedFamily("qwen2_moe", "Qwen2MoeDecoderLayer", "qwen2_moe", PRE_NORM),
    FusedFamily("qwen3", "Qwen3DecoderLayer", "qwen3", PRE_NORM),
    FusedFamily("gemma", "GemmaDecoderLayer", "gemma", PRE_NORM),
    FusedFamily("gemma2", "Gemma2DecoderLayer", "gemma2", SANDWICH_NORM),
    FusedFamily("gemma3_text", "Gemma3DecoderLayer", "gemma3", SANDWICH_NORM),
    FusedFamily("phi3", "Phi3DecoderLayer", "phi3", PRE_NORM_BRANCH_DROPOUT),
    FusedFamily("olmo", "OlmoDecoderLayer", "olmo", PRE_NORM),
    FusedFamily("olmo2", "Olmo2DecoderLayer", "olmo2", BRANCH_POST_NORM),
    FusedFamily("olmo3", "Olmo3DecoderLayer", "olmo3", BRANCH_POST_NORM),
    FusedFamily("starcoder2", "Starcoder2DecoderLayer", "starcoder2", PRE_NORM),
)

_BY_LAYER_CLASS: dict[str, FusedFamily] = {row.layer_class: row for row in FUSED_FAMILIES}

# Decoder layers return a tensor from transformers 5 on (a tuple before), which the fused path
# relies on.
MIN_TRANSFORMERS_MAJOR = 5


def family_for(layer: nn.Module) -> FusedFamily | None:
    """The table row of ``layer``'s class, or None if its class name is not in the table."""
    return _BY_LAYER_CLASS.get(type(layer).__name__)


def _transformers_major() -> int | None:
    transformers = sys.modules.get("transformers")
    version = getattr(transformers, "__version__", None)
    if not isinstance(version, str):
        return None
    try:
        return int(version.split(".")[0])
    except ValueError:
        return None


def check_fused_layer(layer: nn.Module, forward: Any) -> tuple[FusedBlockSpec | None, str]:
    """(spec, reason): the spec to run ``layer`` fused with, or None and why it cannot be.

    ``forward`` is the layer's own forward function (without transformers' checkpointing
    wrapper), as SteeredBlock would call it on the plain path.
    """
    cls = type(layer)
    row = family_for(layer)
    if row is None:
        return None, f"{cls.__name__} is not in the fused-block table (steer_fast.families)"
    if cls.__module__ != row.module_path:
        return None, (
            f"{cls.__name__} comes from {cls.__module__}, not from {row.module_path}, so its "
            "layout is unknown"
        )
    major = _transformers_major()
    if major is None or major < MIN_TRANSFORMERS_MAJOR:
        return None, (
            f"the fused path needs transformers >= {MIN_TRANSFORMERS_MAJOR} (decoder layers "
            "returning a tensor)"
        )
    if "forward" in vars(layer):
        return None, (
            f"this {cls.__name__} has a forward set on the instance (e.g. by accelerate hooks), "
            "which the fused path would bypass"
        )
    if getattr(forward, "__qualname__", None) != f"{cls.__qualname__}.forward":
        return None, (
            f"{cls.__name__}.forward has been replaced (by "
            f"{getattr(forward, '__module__', '?')}.{getattr(forward, '__qualname__', '?')}), "
            "which the fused path would bypass"
        )
    missing = [
        name
        for name in row.spec.module_names()
        if not isinstance(getattr(layer, name, None), nn.Module)
    ]
    if missing:
        return None, f"{cls.__name__} lacks the submodules {missing} its table row expects"
    parameters = list(inspect.signature(forward).parameters.values())[1:]
    if not parameters or parameters[0].name != "hidden_states":
        return None, f"{cls.__name__}.forward does not take hidden_states first"
    attention = getattr(layer, row.spec.attention)
    accepted = inspect.signature(attention.forward).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        rejected = [p.name for p in parameters[1:] if p.name not in accepted]
        if rejected:
            return None, (
                f"{type(attention).__name__}.forward does not accept the layer arguments "
                f"{rejected} that the fused path passes on"
            )
    return row.spec, f"{cls.__name__}: final residual add fused into the steering kernel"


def _apply(layer: nn.Module, names: tuple[str, ...], hidden: torch.Tensor) -> torch.Tensor:
    for name in names:
        hidden = getattr(layer, name)(hidden)
    return hidden


def run_fused_block(
    layer: nn.Module,
    spec: FusedBlockSpec,
    hidden_states: torch.Tensor,
    attention_kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``layer`` up to its final residual add: returns (mlp_branch, residual).

    The layer's output is ``residual + mlp_branch``; the caller computes that sum inside the
    steering kernel. hidden_states: [B, T, d]; attention_kwargs: every argument the layer was
    called with besides hidden_states (its defaults filled in), passed on to the attention
    module exactly as the layer's own forward passes them.
    """
    residual = hidden_states
    branch = hidden_states
    if spec.attention_norm is not None:
        branch = getattr(layer, spec.attention_norm)(branch)
    branch = getattr(layer, spec.attention)(hidden_states=branch, **attention_kwargs)
    if isinstance(branch, tuple):  # (attn_output, attn_weights)
        branch = branch[0]
    branch = _apply(layer, spec.attention_post, branch)
    hidden_states = residual + branch

    branch = hidden_states
    if spec.mlp_norm is not None:
        branch = getattr(layer, spec.mlp_norm)(branch)
    branch = getattr(layer, spec.mlp)(branch)
    branch = _apply(layer, spec.mlp_post, branch)
    return branch, hidden_states
