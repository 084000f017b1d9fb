"""The methods compared in the model-level suites, each one small ``setup`` function.

A method takes a ``MethodContext`` (the model spec, device, rank, seed) and returns a
``Candidate``: the prepared model, a ``forward`` that takes the Hugging Face keyword arguments
(input_ids, labels, past_key_values, use_cache, ...) and returns the model output, and the
parameters to train. Every method builds its own copy of the model from the same seed, so all
start from identical weights. A method that cannot run on this machine raises
``MethodUnavailable`` with the reason; the suites turn that into a "skipped" row.

Adding a method is one function in one of the tables:

    @TRAINING_METHODS.register("my_method", "My method")
    def _my_method(ctx: MethodContext) -> Candidate:
        model = ctx.fresh_model()
        ...
        return Candidate(module=model, forward=model, trainable=[...])
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapter import PostBlockAdapter
from ..ops import resolve_backend, triton_available
from .models import ModelSpec, build_model

TRITON_NEEDS_CUDA = (
    "the fused Triton kernels need CUDA; on the CPU they run only under the Triton "
    "interpreter, whose timings are not meaningful"
)


class MethodUnavailable(Exception):
    """The method cannot run on this machine; the message says why."""


@dataclass(frozen=True)
class MethodContext:
    """What every method's setup receives."""

    spec: ModelSpec
    device: torch.device
    rank: int
    activation: str
    seed: int

    def fresh_model(self) -> nn.Module:
        return build_model(self.spec, self.device, self.seed)


@dataclass
class Candidate:
    """A model prepared for one method.

    ``module`` owns every tensor of the method (the resident set for memory accounting);
    ``forward(**hf_kwargs)`` runs it; ``trainable`` is the adapter's parameters, what AdamW
    updates (empty: no optimizer step; a merged LoRA has none left); ``backend`` is the
    steer_fast backend the model actually runs, where there is one.
    """

    module: nn.Module
    forward: Callable[..., object]
    trainable: list[nn.Parameter] = field(default_factory=list)
    backend: str | None = None


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    setup: Callable[[MethodContext], Candidate]


class MethodTable(dict[str, Method]):
    """Methods by name, in registration order (the order of the report's rows)."""

    def register(self, name: str, label: str):
        if name in self:
            raise ValueError(f"method {name!r} is already registered")

        def decorator(setup: Callable[[MethodContext], Candidate]):
            self[name] = Method(name, label, setup)
            return setup

        return decorator

    def select(self, names: Iterable[str] | None) -> list[Method]:
        """The named methods (all when ``names`` is None), in table order."""
        if names is None:
            return list(self.values())
        wanted = set(names)
        return [method for name, method in self.items() if name in wanted]

    def groups(self, names: Iterable[str] | None, interleave: bool) -> list[list[Method]]:
        """The selected methods as timing groups: all together when interleaved (timed in
        rounds), else one group per method (timed one after another)."""
        methods = self.select(names)
        return [methods] if interleave else [[method] for method in methods]


TRAINING_METHODS = MethodTable()
INFERENCE_METHODS = MethodTable()


# --- steer_fast -----------------------------------------------------------------------------


def steer_candidate(ctx: MethodContext, backend: str) -> Candidate:
    """Post-block steering on every decoder layer through steer_fast's public API."""
    if backend == "triton":
        if ctx.device.type != "cuda":
            raise MethodUnavailable(TRITON_NEEDS_CUDA)
        if not triton_available():
            raise MethodUnavailable("triton is not installed")
    from .. import SteerConfig, get_steer_model

    model = get_steer_model(
        ctx.fresh_model(),
        SteerConfig(rank=ctx.rank, activation=ctx.activation, backend=backend),
    )
    adapters = [m for m in model.modules() if isinstance(m, PostBlockAdapter)]
    if not adapters:
        raise RuntimeError("get_steer_model returned a model without PostBlockAdapter modules")
    probe = torch.empty(1, ctx.spec.hidden_size, device=ctx.device, dtype=ctx.spec.dtype)
    used = {resolve_backend(probe, adapter.backend) for adapter in adapters}
    return Candidate(
        module=model,
        forward=model,
        trainable=[p for p in model.parameters() if p.requires_grad],
        backend="/".join(sorted(used)),
    )


# --- PEFT LoRA ------------------------------------------------------------------------------

LORA_QV = ["q_proj", "v_proj"]


def lora_model(ctx: MethodContext, target_modules: list[str] | str):
    """PEFT LoRA at the same rank, no dropout (scale alpha / r = 1)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=ctx.rank,
        lora_alpha=ctx.rank,
        lora_dropout=0.0,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(ctx.fresh_model(), config)


def lora_candidate(ctx: MethodContext, target_modules: list[str] | str) -> Candidate:
    model = lora_model(ctx, target_modules)
    return Candidate(
        module=model, forward=model, trainable=[p for p in model.parameters() if p.requires_grad]
    )


# --- pyreft LoReFT --------------------------------------------------------------------------


def loreft_candidate(ctx: MethodContext) -> Candidate:
    """pyreft LoReFT at the same rank on every layer's block output, at every position.

    pyvene places interventions by ``unit_locations``: for each intervention (one per layer),
    for each sequence in the batch, the positions to intervene on. Passing every position of
    every sequence makes LoReFT act where post-block steering acts.
    """
    with contextlib.redirect_stdout(io.StringIO()):  # pyvene prints a notice on import
        import pyreft

    model = ctx.fresh_model()
    representations = [
        {
            "layer": layer,
            "component": "block_output",
            "low_rank_dimension": ctx.rank,
            "intervention": pyreft.LoreftIntervention(
                embed_dim=ctx.spec.hidden_size, low_rank_dimension=ctx.rank, dtype=ctx.spec.dtype
            ),
        }
        for layer in range(ctx.spec.num_layers)
    ]
    reft_model = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=representations))
    n_interventions = len(reft_model.interventions)
    locations: dict[tuple[int, int], dict] = {}

    def every_position(batch: int, length: int) -> dict:
        if (batch, length) not in locations:
            positions = [[list(range(length))] * batch] * n_interventions
            locations[batch, length] = {"sources->base": (None, positions)}
        return locations[batch, length]

    def forward(input_ids, labels=None, use_cache=None, **model_kwargs):
        _, output = reft_model(
            {"input_ids": input_ids, **model_kwargs},
            unit_locations=every_position(*input_ids.shape),
            labels=labels,
            use_cache=use_cache,
        )
        return output

    trainable = [p for p in reft_model.parameters() if p.requires_grad]
    return Candidate(module=reft_model, forward=forward, trainable=trainable)


# --- joint LoRA + steering ------------------------------------------------------------------

# LoRA of the joint method: q, v and the two residual writers, so that the orthogonality
# constraint has B matrices to act on in every layer.
JOINT_LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
JOINT_PENALTY_WEIGHT = 0.1


def joint_candidate(ctx: MethodContext) -> Candidate:
    """steer_fast.get_joint_model: LoRA (same rank) and post-block steering on every layer,
    trained together with the orthogonality penalty added to the loss. The steering runs the
    fused kernels where they can run (CUDA) and the torch path elsewhere."""
    from peft import LoraConfig

    from .. import OrthogonalityConfig, SteerConfig, get_joint_model

    backend = "triton" if ctx.device.type == "cuda" and triton_available() else "torch"
    model = get_joint_model(
        ctx.fresh_model(),
        SteerConfig(rank=ctx.rank, activation=ctx.activation, backend=backend),
        LoraConfig(
            r=ctx.rank, lora_alpha=ctx.rank, lora_dropout=0.0, bias="none",
            target_modules=JOINT_LORA_TARGETS, task_type="CAUSAL_LM",
        ),
        OrthogonalityConfig(weight=JOINT_PENALTY_WEIGHT, mode="penalty"),
    )

    def forward(**model_kwargs):
        output = model(**model_kwargs)
        if output.loss is not None:
            output.loss = output.loss + model.orthogonality_term()
        return output

    return Candidate(
        module=model,
        forward=forward,
        trainable=[p for p in model.parameters() if p.requires_grad],
        backend=backend,
    )


# --- training-step methods ------------------------------------------------------------------


@TRAINING_METHODS.register("steer_fast_fused", "steer_fast fused (Triton)")
def _train_steer_fused(ctx: MethodContext) -> Candidate:
    return steer_candidate(ctx, "triton")


@TRAINING_METHODS.register("steer_fast_torch", "steer_fast torch path")
def _train_steer_torch(ctx: MethodContext) -> Candidate:
    return steer_candidate(ctx, "torch")


@TRAINING_METHODS.register("lora_qv", "PEFT LoRA q,v")
def _train_lora_qv(ctx: MethodContext) -> Candidate:
    return lora_candidate(ctx, LORA_QV)


@TRAINING_METHODS.register("lora_all", "PEFT LoRA all-linear")
def _train_lora_all(ctx: MethodContext) -> Candidate:
    return lora_candidate(ctx, "all-linear")


@TRAINING_METHODS.register("joint", "joint: LoRA q,v,o,down + steer_fast (penalty 0.1)")
def _train_joint(ctx: MethodContext) -> Candidate:
    return joint_candidate(ctx)


@TRAINING_METHODS.register("loreft", "pyreft LoReFT")
def _train_loreft(ctx: MethodContext) -> Candidate:
    return loreft_candidate(ctx)


@TRAINING_METHODS.register("full_ft", "full fine-tuning")
def _train_full(ctx: MethodContext) -> Candidate:
    model = ctx.fresh_model()
    model.requires_grad_(True)
    return Candidate(module=model, forward=model, trainable=list(model.parameters()))


@TRAINING_METHODS.register("floor", "floor (frozen, input grads)")
def _train_floor(ctx: MethodContext) -> Candidate:
    """The frozen model, no adapter, with the gradient taken w.r.t. the input embeddings.

    The backward then runs through every layer, as it does for any method that trains
    something inside the first layer, and there is nothing to update. (Post-block steering's
    first adapter sits after layer 0, so its backward stops there and can cost a little less.)
    """
    model = ctx.fresh_model()
    model.requires_grad_(False)
    embed = model.get_input_embeddings()

    def forward(input_ids, **kwargs):
        embeddings = embed(input_ids).requires_grad_(True)
        return model(inputs_embeds=embeddings, **kwargs)

    return Candidate(module=model, forward=forward, trainable=[])


# --- inference methods ----------------------------------------------------------------------


@INFERENCE_METHODS.register("base", "base model")
def _infer_base(ctx: MethodContext) -> Candidate:
    model = ctx.fresh_model()
    return Candidate(module=model, forward=model)


@INFERENCE_METHODS.register("steer_fast_fused", "steer_fast fused (Triton)")
def _infer_steer_fused(ctx: MethodContext) -> Candidate:
    return steer_candidate(ctx, "triton")


@INFERENCE_METHODS.register("steer_fast_torch", "steer_fast torch path")
def _infer_steer_torch(ctx: MethodContext) -> Candidate:
    return steer_candidate(ctx, "torch")


@INFERENCE_METHODS.register("lora_unmerged", "PEFT LoRA q,v unmerged")
def _infer_lora_unmerged(ctx: MethodContext) -> Candidate:
    return lora_candidate(ctx, LORA_QV)


@INFERENCE_METHODS.register("lora_merged", "PEFT LoRA q,v merged")
def _infer_lora_merged(ctx: MethodContext) -> Candidate:
    model = lora_model(ctx, LORA_QV).merge_and_unload()
    return Candidate(module=model, forward=model)


@INFERENCE_METHODS.register("loreft", "pyreft LoReFT")
def _infer_loreft(ctx: MethodContext) -> Candidate:
    return loreft_candidate(ctx)
