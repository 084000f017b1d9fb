"""Inference suite: prefill latency and decode time per token with the KV cache, per method.

Prefill: one forward over the [batch, seq_len] prompt with ``use_cache=True`` (and
``logits_to_keep=1`` where the model takes it, as ``generate`` does). Decode: from a fresh
prefill (not timed), ``decode_tokens`` greedy steps of one token each through the cache; the
time is reported per token. Everything runs under ``torch.inference_mode`` in eval mode, with
the same prompt for every method. Steering methods act on every position, decoded tokens
included (LoReFT too: each call intervenes on every position it is given). With
``settings.interleave`` the methods' prefills, then their decodes, are timed in rounds.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .context import RunContext, describe_error, release_memory
from .memory import measure_peak_memory
from .methods import INFERENCE_METHODS, Candidate, Method, MethodUnavailable
from .models import make_tokens
from .records import BenchmarkRecord
from .timing import Call, Timing, measure_interleaved

PHASES: tuple[str, ...] = ("prefill", "decode")


@dataclass
class PreparedInference:
    method: Method
    candidate: Candidate
    prefill: Callable[[], object]
    decode: Callable[[object], object]


def inference_job_count(ctx: RunContext) -> int:
    return len(INFERENCE_METHODS.select(ctx.settings.methods))


def run_inference_suite(ctx: RunContext) -> Iterator[BenchmarkRecord]:
    s = ctx.settings
    prompt = make_tokens(s.spec, s.batch, s.seq_len, s.device, s.seed)
    for group in INFERENCE_METHODS.groups(s.methods, s.interleave):
        with torch.inference_mode():
            rows = _run_group(ctx, group, prompt)
        release_memory(s.device)
        yield from rows


def _rows(ctx: RunContext, method: Method, status: str, reason: str, backend=None):
    return [
        ctx.record("inference", method.name, method.label, status=status, reason=reason,
                   phase=phase, backend=backend)
        for phase in PHASES
    ]


def _run_group(
    ctx: RunContext, methods: list[Method], prompt: torch.Tensor
) -> list[BenchmarkRecord]:
    records: dict[str, list[BenchmarkRecord]] = {}
    prepared: dict[str, PreparedInference] = {}
    for method in methods:
        ctx.advance(f"inference: {method.name}")
        outcome = _prepare(ctx, method, prompt)
        if isinstance(outcome, list):
            records[method.name] = outcome
        else:
            prepared[method.name] = outcome
    if len(prepared) > 1:
        ctx.advance(f"inference: timing {len(prepared)} methods in rounds", count=False)
    plan = ctx.settings.timing.inference
    prefill_timings = measure_interleaved(
        {name: Call(p.prefill) for name, p in prepared.items()}, ctx.device, plan
    )
    decode_timings = measure_interleaved(
        {name: Call(p.decode, setup=p.prefill) for name, p in prepared.items()}, ctx.device, plan
    )
    for name, p in prepared.items():
        records[name] = _record(ctx, p, prefill_timings[name], decode_timings[name], prompt)
    return [row for method in methods for row in records[method.name]]


def _takes_logits_to_keep(candidate: Candidate) -> bool:
    """Whether the wrapped transformers model accepts ``logits_to_keep``."""
    for module in candidate.module.modules():
        if hasattr(module, "generate") and hasattr(module, "config"):
            forward = getattr(type(module), "forward", None)
            if forward is not None and "logits_to_keep" in inspect.signature(forward).parameters:
                return True
    return False


def _prepare(
    ctx: RunContext, method: Method, prompt: torch.Tensor
) -> PreparedInference | list[BenchmarkRecord]:
    try:
        candidate = method.setup(ctx.method_context())
    except MethodUnavailable as reason:
        return _rows(ctx, method, "skipped", str(reason))
    except Exception as error:  # a method that cannot be set up gets rows that say why
        return _rows(ctx, method, "failed", describe_error(error))
    candidate.module.eval()
    prefill_kwargs = {"logits_to_keep": 1} if _takes_logits_to_keep(candidate) else {}
    decode_tokens = ctx.settings.decode_tokens

    def prefill():
        return candidate.forward(input_ids=prompt, use_cache=True, **prefill_kwargs)

    def decode(output):
        for _ in range(decode_tokens):
            token = output.logits[:, -1:].argmax(dim=-1)
            output = candidate.forward(
                input_ids=token, past_key_values=output.past_key_values, use_cache=True
            )
        return output

    return PreparedInference(method, candidate, prefill, decode)


def _record(
    ctx: RunContext,
    prepared: PreparedInference,
    prefill_timing: Timing | Exception,
    decode_timing: Timing | Exception,
    prompt: torch.Tensor,
) -> list[BenchmarkRecord]:
    method, candidate = prepared.method, prepared.candidate
    for timing in (prefill_timing, decode_timing):
        if isinstance(timing, Exception):
            return _rows(ctx, method, "failed", describe_error(timing), candidate.backend)
    resident = [candidate.module, prompt]
    try:
        prefill_memory = measure_peak_memory(prepared.prefill, ctx.device, resident)
        decode_memory = measure_peak_memory(
            lambda: prepared.decode(prepared.prefill()), ctx.device, resident
        )
    except Exception as error:
        return _rows(ctx, method, "failed", describe_error(error), candidate.backend)
    per_token = _scaled(decode_timing, 1.0 / ctx.settings.decode_tokens)
    rows = []
    for phase, timing, memory, tokens in (
        ("prefill", prefill_timing, prefill_memory, prompt.numel()),
        ("decode", per_token, decode_memory, prompt.shape[0]),
    ):
        rows.append(
            ctx.record(
                "inference",
                method.name,
                method.label,
                phase=phase,
                **timing.record_fields(),
                tokens_per_s=tokens / (timing.median_ms * 1e-3),
                peak_mem_bytes=memory.peak_bytes,
                memory_measure=memory.measure,
                trainable_params=sum(p.numel() for p in candidate.trainable),
                backend=candidate.backend,
            )
        )
    return rows


def _scaled(timing: Timing, factor: float) -> Timing:
    return Timing(
        median_ms=timing.median_ms * factor,
        min_ms=timing.min_ms * factor,
        max_ms=timing.max_ms * factor,
        repeats=timing.repeats,
        warmup=timing.warmup,
    )
