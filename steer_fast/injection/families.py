"""The decoder-layer families steer_fast knows: how each is run fused, and which modules write
into its residual stream.

Pre-norm decoder layers compute, up to the placement of their norms and dropouts,

    h   = x + attn_branch(x)        attn_branch = post_ops(attention(pre_norm(x), **call_args))
    out = h + mlp_branch(h)         mlp_branch  = post_ops(mlp(pre_norm(h)))

A ``FusedBlockSpec`` names the submodules of one such layout, and ``run_fused_block`` runs any
layer described by a spec up to ``out``'s last add, returning (mlp_branch, h) so that the caller
adds them inside the steering kernel. One generic function serves every family.

``FAMILIES`` is the one table, a row per decoder-layer class: its layout (None for a family that
takes the plain path) and its residual writers, the modules whose outputs go straight into the
layer's residual adds (the orthogonality constraint of joint adaptation reads them). Adding a
family is one row here, plus the family in ``tests/tiny_models.py`` so that the suite checks it.

A layer takes the fused path only if it passes ``check_fused_layer``: its class is the
transformers implementation named in the table, its forward is the one that class defines, and
it has every submodule its spec names. Anything else (GPT-2, GPT-NeoX, a patched or unknown
layer) takes the plain path, and the reason is reported.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..shims import MIN_TRANSFORMERS_MAJOR_FOR_FUSING, transformers_major


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
class Family:
    """One row of the table: a transformers decoder-layer class and how steer_fast treats it.

    Attributes:
        model_type: ``config.model_type`` of the family's models (for documentation).
        layer_class: the decoder layer's class name.
        module: the transformers module defining it, ``transformers.models.<module>``.
        spec: the layer's layout for the fused path, or None: its layers take the plain path.
        attention_writer: path inside the layer of the module whose output is the attention
            branch's contribution to the residual stream (the attention output projection).
        mlp_writer: the same for the MLP branch (the MLP down projection), or None where no
            module LoRA can adapt writes it.
        branch_ends: for a family without a fused layout, the paths of the modules whose
            outputs are the attention and the MLP branch outputs, just before their residual
            adds (where sites "attn" and "mlp" steer); a fused layout names them itself.

    In Gemma2/3 and OLMo2/3 a norm sits between the writers and the residual add (it rescales
    each channel), so there a constraint on the writers is on the directions they write before
    that rescaling.
    """

    model_type: str
    layer_class: str
    module: str
    spec: FusedBlockSpec | None
    attention_writer: str = "self_attn.o_proj"
    mlp_writer: str | None = "mlp.down_proj"
    branch_ends: tuple[str, str] | None = None

    @property
    def module_path(self) -> str:
        return f"transformers.models.{self.module}.modeling_{self.module}"

    @property
    def residual_writers(self) -> tuple[str, ...]:
        """The modules whose outputs go straight into the layer's residual adds."""
        return tuple(path for path in (self.attention_writer, self.mlp_writer) if path)


# Each row was read against the transformers 5.17 and 5.23 source of the layer, and is checked by
# the test suite (fused layer == original layer, exactly, with a zero adapter; every residual
# writer exists and writes hidden-size outputs).
FAMILIES: tuple[Family, ...] = (
    Family("llama", "LlamaDecoderLayer", "llama", PRE_NORM),
    Family("mistral", "MistralDecoderLayer", "mistral", PRE_NORM),
    # The routed experts are fused 3-D parameters (no nn.Linear): no MLP writer LoRA can adapt.
    Family("mixtral", "MixtralDecoderLayer", "mixtral", PRE_NORM, mlp_writer=None),
    Family("qwen2", "Qwen2DecoderLayer", "qwen2", PRE_NORM),
    Family(
        "qwen2_moe",
        "Qwen2MoeDecoderLayer",
        "qwen2_moe",
        PRE_NORM,
        mlp_writer="mlp.shared_expert.down_proj",
    ),
    Family("qwen3", "Qwen3DecoderLayer", "qwen3", PRE_NORM),
    Family("gemma", "GemmaDecoderLayer", "gemma", PRE_NORM),
    Family("gemma2", "Gemma2DecoderLayer", "gemma2", SANDWICH_NORM),
    Family("gemma3_text", "Gemma3DecoderLayer", "gemma3", SANDWICH_NORM),
    Family("phi3", "Phi3DecoderLayer", "phi3", PRE_NORM_BRANCH_DROPOUT),
    Family("olmo", "OlmoDecoderLayer", "olmo", PRE_NORM),
    Family("olmo2", "Olmo2DecoderLayer", "olmo2", BRANCH_POST_NORM),
    Family("olmo3", "Olmo3DecoderLayer", "olmo3", BRANCH_POST_NORM),
    Family("starcoder2", "Starcoder2DecoderLayer", "starcoder2", PRE_NORM, mlp_writer="mlp.c_proj"),
    # Plain path (no fused layout): their writers serve joint adaptation.
    Family("gpt2", "GPT2Block", "gpt2", None, "attn.c_proj", "mlp.c_proj", ("attn", "mlp")),
    Family(
        "gpt_neox",
        "GPTNeoXLayer",
        "gpt_neox",
        None,
        "attention.dense",
        "mlp.dense_4h_to_h",
        ("post_attention_dropout", "post_mlp_dropout"),
    ),
)

_BY_LAYER_CLASS: dict[str, Family] = {row.layer_class: row for row in FAMILIES}


def family_for(layer: nn.Module) -> Family | None:
    """The table row of ``layer``'s class, or None if its class name is not in the table."""
    return _BY_LAYER_CLASS.get(type(layer).__name__)


def branch_end_paths(layer: nn.Module) -> dict[str, str] | None:
    """Site ("attn", "mlp") -> path inside ``layer`` of the module whose output is that branch's
    output just before its residual add; None for a layer whose family the table lacks. For a
    fused layout it is the branch's last post-module (a post-norm, a dropout) or else the
    attention / MLP module itself."""
    row = family_for(layer)
    if row is None:
        return None
    if row.spec is not None:
        spec = row.spec
        return {
            "attn": (spec.attention_post or (spec.attention,))[-1],
            "mlp": (spec.mlp_post or (spec.mlp,))[-1],
        }
    return None if row.branch_ends is None else dict(zip(("attn", "mlp"), row.branch_ends))


def residual_writer_paths(
    layer: nn.Module, residual_modules: Sequence[str] | None = None
) -> tuple[str, ...] | None:
    """The paths inside ``layer`` of its residual-writing modules: ``residual_modules`` when
    given, else its family's row; None when neither says."""
    if residual_modules is not None:
        return tuple(residual_modules)
    row = family_for(layer)
    return None if row is None else row.residual_writers


def check_fused_layer(layer: nn.Module, forward: Any) -> tuple[FusedBlockSpec | None, str]:
    """(spec, reason): the spec to run ``layer`` fused with, or None and why it cannot be.

    ``forward`` is the layer's own forward function (without transformers' checkpointing
    wrapper), as SteeredBlock would call it on the plain path.
    """
    cls = type(layer)
    row = family_for(layer)
    if row is None:
        return None, f"{cls.__name__} is not in the family table (steer_fast.families)"
    if row.spec is None:
        return None, f"{cls.__name__} has no fused layout in the family table (steer_fast.families)"
    if cls.__module__ != row.module_path:
        return None, (
            f"{cls.__name__} comes from {cls.__module__}, not from {row.module_path}, so its "
            "layout is unknown"
        )
    major = transformers_major()
    if major is None or major < MIN_TRANSFORMERS_MAJOR_FOR_FUSING:
        return None, (
            f"the fused path needs transformers >= {MIN_TRANSFORMERS_MAJOR_FOR_FUSING} (decoder "
            "layers returning a tensor)"
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
    add_attention: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``layer`` up to its final residual add: returns (mlp_branch, residual).

    The layer's output is ``residual + mlp_branch``; the caller computes that sum inside the
    steering kernel. hidden_states: [B, T, d]; attention_kwargs: every argument the layer was
    called with besides hidden_states (its defaults filled in), passed on to the attention
    module exactly as the layer's own forward passes them. ``add_attention(branch, residual)``,
    when given, computes the first residual add in place of ``residual + branch`` (to steer the
    attention branch).
    """
    residual = hidden_states
    branch = hidden_states
    if spec.attention_norm is not None:
        branch = getattr(layer, spec.attention_norm)(branch)
    branch = getattr(layer, spec.attention)(hidden_states=branch, **attention_kwargs)
    if isinstance(branch, tuple):  # (attn_output, attn_weights)
        branch = branch[0]
    branch = _apply(layer, spec.attention_post, branch)
    hidden_states = residual + branch if add_attention is None else add_attention(branch, residual)

    branch = hidden_states
    if spec.mlp_norm is not None:
        branch = getattr(layer, spec.mlp_norm)(branch)
    branch = getattr(layer, spec.mlp)(branch)
    branch = _apply(layer, spec.mlp_post, branch)
    return branch, hidden_states
