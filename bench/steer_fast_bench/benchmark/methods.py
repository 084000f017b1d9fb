"""The methods every suite compares, in one registry: ``METHODS[suite]``, a ``MethodTable``.

A training or inference method's ``setup`` takes a ``MethodContext`` and returns a
``Candidate`` with its own copy of the model (built from the same seed as every other method's).
A kernel method's ``setup`` takes the device and returns the function the kernel suite times,
called like ``post_block_steer``; a mixed method's takes a ``mixed_methods.MixedSetup`` and
returns a ``mixed_methods.MixedCandidate``. A method that cannot run on this machine raises
``MethodUnavailable`` with the reason (a "skipped" row). Adding a method is one function,
registered with ``@TRAINING_METHODS.register("my_method", "My method")`` (or the kernel or
inference table); docs/benchmarks.md shows one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from steer_fast import (
    OrthogonalityConfig,
    PostBlockAdapter,
    SteerConfig,
    find_decoder_layers,
    get_steer_model,
    post_block_steer,
)
from steer_fast.ops import activate, reference_post_block_steer, resolve_backend, triton_available

from ..baselines import MethodUnavailable, joint_model, lora_model, loreft_model
from . import mixed_methods as mixed
from .models import ModelSpec, build_model

TRITON_NEEDS_CUDA = (
    "the fused Triton kernels need CUDA; on the CPU they run only under the "
    "Triton interpreter, whose timings are not meaningful"
)
LORA_QV = ["q_proj", "v_proj"]
JOINT_PENALTY_WEIGHT = 0.1


@dataclass(frozen=True)
class MethodContext:
    """What every training and inference method's setup receives."""

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
    ``forward(**hf_kwargs)`` runs it; ``trainable`` is what AdamW updates (empty: no optimizer
    step); ``backend`` is the steer_fast backend the model actually runs, where there is one.
    """

    module: nn.Module
    forward: Callable[..., Any]
    trainable: list[nn.Parameter] = field(default_factory=list)
    backend: str | None = None


class Method(NamedTuple):
    name: str
    label: str  # what reports call it
    setup: Callable[[Any], Any]  # setup(MethodContext), or setup(device) for a kernel
    cuda_only: bool = False  # skipped without CUDA (what a run's time estimate leaves out)


class MethodTable(dict[str, Method]):
    """One suite's methods by name, in registration order (the order of the report's rows)."""

    def register(
        self, name: str, label: str, cuda_only: bool = False
    ) -> Callable[[Callable], Callable]:
        """A decorator that adds ``setup`` under ``name``."""
        if name in self:
            raise ValueError(f"method {name!r} is already registered")
        return lambda setup: self.setdefault(name, Method(name, label, setup, cuda_only)).setup

    def select(self, names: Iterable[str] | None) -> list[Method]:
        """The named methods (all when ``names`` is None), in table order."""
        return [m for name, m in self.items() if names is None or name in names]


def require_triton(device: torch.device) -> None:
    """Raise ``MethodUnavailable`` unless the fused kernels can run (and be timed) here."""
    if device.type != "cuda":
        raise MethodUnavailable(TRITON_NEEDS_CUDA)
    if not triton_available():
        raise MethodUnavailable("triton is not installed")


def expected_to_run(method: Method, device: torch.device) -> bool:
    """Whether ``method`` should run on ``device``: False when it will be skipped for want of
    CUDA (what a run's time estimate leaves out)."""
    return not method.cuda_only or (device.type == "cuda" and triton_available())


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def steer_candidate(ctx: MethodContext, backend: str) -> Candidate:
    """Post-block steering on every decoder layer through steer_fast's public API."""
    if backend == "triton":
        require_triton(ctx.device)
    config = SteerConfig(rank=ctx.rank, activation=ctx.activation, backend=backend)
    model = get_steer_model(ctx.fresh_model(), config)
    adapters = [m for m in model.modules() if isinstance(m, PostBlockAdapter)]
    if not adapters:
        raise RuntimeError("get_steer_model returned a model without PostBlockAdapter modules")
    probe = torch.empty(1, ctx.spec.hidden_size, device=ctx.device, dtype=ctx.spec.dtype)
    used = sorted({resolve_backend(probe, adapter.backend) for adapter in adapters})
    return Candidate(model, model, _trainable(model), backend="/".join(used))


def _steer_output(adapter: PostBlockAdapter, hidden: torch.Tensor) -> torch.Tensor:
    """h + s * (U phi(D h + b_d) + b_u), in eager PyTorch."""
    return hidden + adapter.scale * adapter.up(activate(adapter.down(hidden), adapter.activation))


def hooks_candidate(ctx: MethodContext) -> Candidate:
    """Post-block steering written the way the published code writes it: a forward hook on each
    decoder layer adds s * (U phi(D h + b_d) + b_u) to the layer's output h, in eager PyTorch.

    The adapters are the ones ``steer_candidate`` trains: built by ``get_steer_model`` with the
    same config from the same model and seed (so the same weights), then taken off the model
    with ``unload()``; only their ``down`` and ``up`` linears are used, by the hooks.
    """
    steered = get_steer_model(
        ctx.fresh_model(), SteerConfig(rank=ctx.rank, activation=ctx.activation)
    )
    adapters = steered.get_adapters()
    model = steered.unload().requires_grad_(False)
    _, layers = find_decoder_layers(model)

    def hook(adapter: PostBlockAdapter) -> Callable[..., Any]:
        def steer(module: nn.Module, args: Any, output: Any) -> Any:
            if isinstance(output, tuple):  # layers that also return attention weights or a cache
                return (_steer_output(adapter, output[0]), *output[1:])
            return _steer_output(adapter, output)

        return steer

    for index, adapter in adapters.items():
        layers[index].register_forward_hook(hook(adapter))
    steering = nn.ModuleList(adapters.values()).requires_grad_(True)
    return Candidate(
        nn.ModuleDict(dict(model=model, steering=steering)), model, _trainable(steering)
    )


def lora_candidate(ctx: MethodContext, target_modules: list[str] | str, merge=False) -> Candidate:
    """PEFT LoRA at the same rank (``baselines.lora_config``); with ``merge``, merged into the
    base weights (``merge_and_unload``): nothing left to train."""
    model = lora_model(ctx.fresh_model(), ctx.rank, target_modules)
    model = model.merge_and_unload() if merge else model
    return Candidate(model, model, [] if merge else _trainable(model))


def loreft_candidate(ctx: MethodContext) -> Candidate:
    """pyreft LoReFT at the same rank on every layer's block output, at every position.

    pyvene places interventions by ``unit_locations``: for each intervention (one per layer),
    for each sequence in the batch, the positions to intervene on. Passing every position of
    every sequence makes LoReFT act where post-block steering acts.
    """
    reft_model = loreft_model(ctx.fresh_model(), ctx.rank)
    n_interventions = len(reft_model.interventions)

    @functools.cache
    def every_position(batch: int, length: int) -> dict:
        return {"sources->base": (None, [[list(range(length))] * batch] * n_interventions)}

    def forward(input_ids, labels=None, use_cache=None, **model_kwargs):
        return reft_model(
            {"input_ids": input_ids, **model_kwargs},
            unit_locations=every_position(*input_ids.shape),
            labels=labels,
            use_cache=use_cache,
        )[1]

    return Candidate(reft_model, forward, _trainable(reft_model))


def joint_candidate(ctx: MethodContext) -> Candidate:
    """steer_fast.get_joint_model: LoRA (same rank) and post-block steering on every layer,
    trained together with the orthogonality penalty added to the loss. The steering runs the
    fused kernels where they can run (CUDA) and the torch path elsewhere."""
    backend = "triton" if ctx.device.type == "cuda" and triton_available() else "torch"
    model = joint_model(
        ctx.fresh_model(),
        SteerConfig(rank=ctx.rank, activation=ctx.activation, backend=backend),
        ctx.rank,
        OrthogonalityConfig(weight=JOINT_PENALTY_WEIGHT, mode="penalty"),
    )

    def forward(**model_kwargs):
        output = model(**model_kwargs)
        if output.loss is not None:
            output.loss = output.loss + model.orthogonality_term()
        return output

    return Candidate(model, forward, _trainable(model), backend=backend)


def floor_candidate(ctx: MethodContext) -> Candidate:
    """The frozen model, no adapter, with the gradient taken w.r.t. the input embeddings.

    The backward then runs through every layer, as it does for any method that trains
    something inside the first layer, and there is nothing to update. (Post-block steering's
    first adapter sits after layer 0, so its backward stops there and can cost a little less.)
    """
    model = ctx.fresh_model().requires_grad_(False)
    embed = model.get_input_embeddings()

    def forward(input_ids, **kwargs):
        return model(inputs_embeds=embed(input_ids).requires_grad_(True), **kwargs)

    return Candidate(model, forward)


def full_finetuning_candidate(ctx: MethodContext) -> Candidate:
    model = ctx.fresh_model().requires_grad_(True)
    return Candidate(model, model, list(model.parameters()))


def base_candidate(ctx: MethodContext) -> Candidate:
    model = ctx.fresh_model()
    return Candidate(model, model)


def fused_kernel(device: torch.device) -> Callable[..., torch.Tensor]:
    require_triton(device)
    return functools.partial(post_block_steer, backend="triton")


def compiled_reference(device: torch.device) -> Callable[..., torch.Tensor]:
    """``torch.compile`` of the unfused reference, compiled afresh: static shapes, and no
    recompile limit that could quietly fall back to eager after a few grid points."""
    torch.compiler.reset()
    return torch.compile(reference_post_block_steer, fullgraph=True, dynamic=False)


def _table(*rows: tuple) -> MethodTable:
    """A table of (name, label, setup[, cuda_only]) rows."""
    return MethodTable({row[0]: Method(*row) for row in rows})


FUSED, TORCH_PATH = "steer_fast fused (Triton)", "steer_fast torch path"
HOOKS = "forward hooks, eager (the published code's form)"
steer_fused = functools.partial(steer_candidate, backend="triton")
steer_torch = functools.partial(steer_candidate, backend="torch")
lora_qv = functools.partial(lora_candidate, target_modules=LORA_QV)
KERNEL_METHODS = _table(
    ("steer_fast_fused", FUSED, fused_kernel, True),
    (
        "steer_fast_torch",
        TORCH_PATH,
        lambda device: functools.partial(post_block_steer, backend="torch"),
    ),
    ("eager", "unfused eager", lambda device: reference_post_block_steer),
    ("torch_compile", "torch.compile(unfused)", compiled_reference),
)
TRAINING_METHODS = _table(
    ("steer_fast_fused", FUSED, steer_fused, True),
    ("steer_fast_torch", TORCH_PATH, steer_torch),
    ("hooks_eager", HOOKS, hooks_candidate),
    ("lora_qv", "PEFT LoRA q,v", lora_qv),
    (
        "lora_all",
        "PEFT LoRA all-linear",
        functools.partial(lora_candidate, target_modules="all-linear"),
    ),
    ("joint", "joint: LoRA q,k,v,o,gate,up,down + steer_fast (penalty 0.1)", joint_candidate),
    ("loreft", "pyreft LoReFT", loreft_candidate),
    ("full_ft", "full fine-tuning", full_finetuning_candidate),
    ("floor", "floor (frozen, input grads)", floor_candidate),
)
INFERENCE_METHODS = _table(
    ("base", "base model", base_candidate),
    ("steer_fast_fused", FUSED, steer_fused, True),
    ("steer_fast_torch", TORCH_PATH, steer_torch),
    ("hooks_eager", HOOKS, hooks_candidate),
    ("lora_unmerged", "PEFT LoRA q,v unmerged", lora_qv),
    ("lora_merged", "PEFT LoRA q,v merged", functools.partial(lora_qv, merge=True)),
    ("loreft", "pyreft LoReFT", loreft_candidate),
)
# The mixed suite's (``mixed_methods``): each setup takes a ``MixedSetup``; names ending in
# "_train" are training steps, the others inference.
MIXED_METHODS = _table(
    ("base", "base model (no adapter)", mixed.base_method),
    ("steer_single", "steer_fast, every row on one adapter", mixed.steer_single),
    ("steer_mixed", "steer_fast mixed batch", mixed.steer_mixed),
    ("steer_separate", "steer_fast, one batch per adapter", mixed.steer_separate),
    ("peft_lora_mixed", "PEFT LoRA mixed batch", mixed.peft_lora_mixed),
    ("steer_mixed_train", "steer_fast mixed-batch training", mixed.steer_mixed_train),
    (
        "steer_separate_train",
        "steer_fast, adapters trained one at a time",
        mixed.steer_separate_train,
    ),
)
METHODS = {
    "kernel": KERNEL_METHODS,
    "training": TRAINING_METHODS,
    "inference": INFERENCE_METHODS,
    "mixed": MIXED_METHODS,
}
SUITES: tuple[str, ...] = tuple(METHODS)
