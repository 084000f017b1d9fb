"""Training-step suite: forward, backward and AdamW on the same model and batch, per method.

One step is ``loss = model(input_ids, labels=input_ids).loss``, ``loss.backward()``,
``optimizer.step()``, ``optimizer.zero_grad(set_to_none=True)``. The optimizer is
``AdamW(trainable, lr=1e-4, weight_decay=0.0)`` for every method. Weight decay is off because
pyreft's LoReFT keeps the diagonal of its orthogonal parametrization at +-1 through an integer
cast: decoupled weight decay shrinks it below 1 and turns the rotation into zeros after the
first step (Hugging Face's Trainer, which pyreft trains with, defaults to weight_decay=0 too).

Before timing, one step checks that every trainable parameter receives a finite gradient, so
a method that silently stopped training fails its row instead of posting a fast time. With
``settings.interleave`` all methods are set up first and their steps timed in rounds (see
``measure_interleaved``); otherwise each method is set up, timed and freed in turn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .context import RunContext, describe_error, release_memory
from .memory import measure_peak_memory
from .methods import TRAINING_METHODS, Candidate, Method, MethodUnavailable
from .models import make_tokens
from .records import BenchmarkRecord
from .timing import Call, measure_interleaved

LEARNING_RATE = 1e-4


def make_optimizer(parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
    """AdamW over the trainable parameters, or None when there are none (the floor)."""
    if not parameters:
        return None
    return torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=0.0)


@dataclass
class PreparedStep:
    method: Method
    candidate: Candidate
    optimizer: torch.optim.Optimizer | None
    step: Callable[[], None]


def training_job_count(ctx: RunContext) -> int:
    return len(TRAINING_METHODS.select(ctx.settings.methods))


def run_training_suite(ctx: RunContext) -> Iterator[BenchmarkRecord]:
    s = ctx.settings
    tokens = make_tokens(s.spec, s.batch, s.seq_len, s.device, s.seed)
    for group in TRAINING_METHODS.groups(s.methods, s.interleave):
        yield from _run_group(ctx, group, tokens)
        release_memory(s.device)


def _run_group(
    ctx: RunContext, methods: list[Method], tokens: torch.Tensor
) -> list[BenchmarkRecord]:
    records: dict[str, BenchmarkRecord] = {}
    prepared: dict[str, PreparedStep] = {}
    for method in methods:
        ctx.advance(f"training: {method.name}")
        outcome = _prepare(ctx, method, tokens)
        if isinstance(outcome, BenchmarkRecord):
            records[method.name] = outcome
        else:
            prepared[method.name] = outcome
    if len(prepared) > 1:
        ctx.advance(f"training: timing {len(prepared)} methods in rounds", count=False)
    timings = measure_interleaved(
        {name: Call(p.step) for name, p in prepared.items()}, ctx.device, ctx.settings.timing.step
    )
    for name, p in prepared.items():
        records[name] = _record(ctx, p, timings[name], tokens)
    return [records[method.name] for method in methods]


def _failed(ctx: RunContext, method: Method, status: str, reason: str, backend=None):
    return ctx.record("training", method.name, method.label, status=status, reason=reason,
                      backend=backend)


def _prepare(
    ctx: RunContext, method: Method, tokens: torch.Tensor
) -> PreparedStep | BenchmarkRecord:
    try:
        candidate = method.setup(ctx.method_context())
    except MethodUnavailable as reason:
        return _failed(ctx, method, "skipped", str(reason))
    except Exception as error:  # a method that cannot be set up gets a row that says why
        return _failed(ctx, method, "failed", describe_error(error))
    try:
        candidate.module.train()
        optimizer = make_optimizer(candidate.trainable)
        check_gradients(candidate, tokens)
    except Exception as error:
        return _failed(ctx, method, "failed", describe_error(error), candidate.backend)

    def step() -> None:
        output = candidate.forward(input_ids=tokens, labels=tokens, use_cache=False)
        output.loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return PreparedStep(method, candidate, optimizer, step)


def _record(
    ctx: RunContext, prepared: PreparedStep, timing, tokens: torch.Tensor
) -> BenchmarkRecord:
    method, candidate = prepared.method, prepared.candidate
    if isinstance(timing, Exception):
        return _failed(ctx, method, "failed", describe_error(timing), candidate.backend)
    try:
        memory = measure_peak_memory(
            prepared.step, ctx.device, resident=[candidate.module, prepared.optimizer, tokens]
        )
    except Exception as error:
        return _failed(ctx, method, "failed", describe_error(error), candidate.backend)
    return ctx.record(
        "training",
        method.name,
        method.label,
        **timing.record_fields(),
        tokens_per_s=tokens.numel() / (timing.median_ms * 1e-3),
        peak_mem_bytes=memory.peak_bytes,
        memory_measure=memory.measure,
        trainable_params=sum(p.numel() for p in candidate.trainable),
        backend=candidate.backend,
    )


def check_gradients(candidate: Candidate, tokens: torch.Tensor) -> None:
    """One forward and backward; every trainable parameter must get a finite gradient.

    Raises:
        RuntimeError: naming how many trainable tensors got none or a non-finite one.
    """
    output = candidate.forward(input_ids=tokens, labels=tokens, use_cache=False)
    if not torch.isfinite(output.loss):
        raise RuntimeError(f"the loss is not finite: {output.loss.item()}")
    output.loss.backward()
    missing = sum(p.grad is None for p in candidate.trainable)
    broken = sum(
        p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in candidate.trainable
    )
    for parameter in candidate.trainable:
        parameter.grad = None
    if missing or broken:
        raise RuntimeError(
            f"{missing} trainable tensors got no gradient and {broken} a non-finite one"
        )
