"""The model-level suites, training step and inference: every method on the same model and tokens.

A method that cannot be set up, prepared, timed or measured still gets its rows, with the
status and the reason. With ``settings.interleave`` all methods of a suite are set up first and
each phase is timed in rounds across them; otherwise each is set up, timed and freed in turn.

The training step is forward, backward and ``AdamW(lr=1e-4, weight_decay=0)`` for every method.
Weight decay is off because pyreft's LoReFT keeps the diagonal of its orthogonal parametrization
at +-1 through an integer cast: decoupled weight decay shrinks it below 1 and turns the rotation
into zeros after the first step (Hugging Face's Trainer, which pyreft trains with, defaults to 0
too). Inference times the prefill of the prompt (with ``logits_to_keep=1`` where the model takes
it, as ``generate`` does) and, from a fresh untimed prefill, the greedy decode through the KV
cache, per token, under ``torch.inference_mode``. Steering methods act on every position,
decoded tokens included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from .memory import MEASURES, measure_peak_memory, release_memory
from .methods import METHODS, Candidate, Method, MethodContext, expected_to_run
from .models import forward_parameters, make_tokens
from .records import BenchmarkRecord, RunContext, not_run
from .timing import Call, measure_interleaved, unwrap

LEARNING_RATE = 1e-4
# A peak-memory call, in plain calls: on the CPU it runs under torch.profiler.
PROFILED_CALL = {"cpu": 1.2, "cuda": 1.0}


class Phase(NamedTuple):
    """One timed call of a prepared method: ``tokens`` processed per call, and ``steps`` the
    call takes (its time is reported per step, e.g. per decoded token)."""

    name: str | None
    call: Call
    tokens: int
    steps: int = 1


def prepare_step(
    ctx: RunContext, candidate: Candidate, tokens: torch.Tensor
) -> tuple[list[Phase], list[Any]]:
    """The training step to time, after one forward and backward that must give every
    trainable parameter a finite gradient."""
    candidate.module.train()
    optimizer = None  # none without parameters to train
    if candidate.trainable:
        optimizer = torch.optim.AdamW(candidate.trainable, lr=LEARNING_RATE, weight_decay=0.0)
    output = candidate.forward(input_ids=tokens, labels=tokens, use_cache=False)
    if not torch.isfinite(output.loss):
        raise RuntimeError(f"the loss is not finite: {output.loss.item()}")
    output.loss.backward()
    grads = [p.grad for p in candidate.trainable]
    missing = sum(g is None for g in grads)
    broken = sum(g is not None and not bool(torch.isfinite(g).all()) for g in grads)
    for parameter in candidate.trainable:
        parameter.grad = None
    if missing or broken:
        raise RuntimeError(
            f"{missing} trainable tensors got no gradient and {broken} a non-finite one"
        )

    def step() -> None:
        output = candidate.forward(input_ids=tokens, labels=tokens, use_cache=False)
        output.loss.backward()  # the output (logits included) stays alive through the update
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return [Phase(None, Call(step), tokens.numel())], [candidate.module, optimizer, tokens]


def prepare_generation(
    ctx: RunContext, candidate: Candidate, prompt: torch.Tensor
) -> tuple[list[Phase], list[Any]]:
    """The prefill, and the decode steps from a fresh (untimed) prefill, to time. The KV cache
    goes back in as ``cache`` where the model takes it (as transformers 5.24 does), else as
    ``past_key_values``, and is read from the output field of the same name."""
    candidate.module.eval()
    parameters = forward_parameters(candidate.module)
    prefill_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    cache = "cache" if "cache" in parameters else "past_key_values"
    steps = ctx.settings.decode_tokens

    def prefill():
        return candidate.forward(input_ids=prompt, use_cache=True, **prefill_kwargs)

    def decode(output):
        for _ in range(steps):
            token = output.logits[:, -1:].argmax(dim=-1)
            output = candidate.forward(
                input_ids=token, use_cache=True, **{cache: getattr(output, cache)}
            )
        return output

    phases = [
        Phase("prefill", Call(prefill), prompt.numel()),
        Phase("decode", Call(decode, setup=prefill), prompt.shape[0], steps),
    ]
    return phases, [candidate.module, prompt]


class ModelSuite(NamedTuple):
    """A model-level suite: its name (also its method table's and timing plan's), the record
    ``phase`` of each timed call (None: one unnamed phase), ``prepare(ctx, candidate, tokens)``
    (the phases and the resident set; raises when the method cannot run), ``costs(settings,
    probe)`` (per phase, from ``progress.Probe``: the seconds of a timed call, of the untimed
    set-up before each, and of what runs once before the timing) and ``mode``, entered around
    each group's set-up, timing and measurement."""

    name: str
    phases: tuple[str | None, ...]
    prepare: Callable[..., tuple[list[Phase], list[Any]]]
    costs: Callable[..., list[tuple[float, float, float]]]
    mode: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def estimate_s(self, ctx: RunContext, probe: Any) -> float:
        """The suite's expected seconds: per method that should run here, its build, then per
        phase the warm-ups, the repeats the timing plan buys and the peak-memory call."""
        s, plan = ctx.settings, ctx.settings.timing[self.name]
        per_method = probe.build_s
        for timed, setup, once in self.costs(s, probe):
            calls = plan.warmup + plan.repeats_for(timed) + PROFILED_CALL[s.device.type]
            per_method += once + calls * (timed + setup)
        methods = METHODS[self.name].select(s.methods)
        return per_method * sum(expected_to_run(m, s.device) for m in methods)

    def run(self, ctx: RunContext) -> Iterator[BenchmarkRecord]:
        s = ctx.settings
        tokens = make_tokens(s.spec, s.batch, s.seq_len, s.device, s.seed)
        methods = METHODS[self.name].select(s.methods)
        for group in [methods] if s.interleave else [[method] for method in methods]:
            with self.mode():
                rows = self._run_group(ctx, group, tokens)
            release_memory(s.device)
            yield from rows

    def _rows(self, ctx: RunContext, method: Method, **fields: Any) -> list[BenchmarkRecord]:
        """The rows of a method that did not run, one per phase."""
        return [
            ctx.record(self.name, method.name, method.label, phase=phase, **fields)
            for phase in self.phases
        ]

    def _run_group(
        self, ctx: RunContext, methods: list[Method], tokens: torch.Tensor
    ) -> list[BenchmarkRecord]:
        s, rows, prepared = ctx.settings, {}, {}
        for method in methods:
            ctx.describe(f"{self.name}: setting up {method.name}")
            candidate = None
            try:
                candidate = method.setup(
                    MethodContext(s.spec, s.device, s.rank, s.activation, s.seed)
                )
                prepared[method.name] = (candidate, *self.prepare(ctx, candidate, tokens))
            except Exception as error:  # a method that cannot be set up gets rows that say why
                rows[method.name] = self._rows(
                    ctx, method, **not_run(error), backend=getattr(candidate, "backend", None)
                )
        timings = []
        for i, phase in enumerate(self.phases):
            what = f"{len(prepared)} methods in rounds" if len(prepared) > 1 else "".join(prepared)
            ctx.describe(f"{self.name}: timing {what}" + (f", {phase}" if phase else ""))
            timings.append(
                measure_interleaved(
                    {n: p[1][i].call for n, p in prepared.items()},
                    s.device,
                    s.timing[self.name],
                    on_round=ctx.timing_left,
                )
            )
        ctx.describe(f"{self.name}: peak memory")
        for method in (m for m in methods if m.name in prepared):
            candidate, phases, resident = prepared[method.name]
            try:
                times = [unwrap(timing[method.name]) for timing in timings]
                memory = [
                    measure_peak_memory(phase.call.once, s.device, resident) for phase in phases
                ]
            except Exception as error:  # a method that fails here still gets rows that say why
                rows[method.name] = self._rows(
                    ctx, method, **not_run(error), backend=candidate.backend
                )
                continue
            rows[method.name] = []
            for phase, timing, peak in zip(phases, times, memory):
                fields = timing.record_fields(1.0 / phase.steps)
                rows[method.name].append(
                    ctx.record(
                        self.name,
                        method.name,
                        method.label,
                        phase=phase.name,
                        **fields,
                        tokens_per_s=phase.tokens / (fields["ms"] * 1e-3),
                        peak_mem_bytes=peak,
                        memory_measure=MEASURES[s.device.type],
                        backend=candidate.backend,
                        trainable_params=sum(p.numel() for p in candidate.trainable),
                    )
                )
        return [row for method in methods for row in rows[method.name]]


TRAINING_SUITE = ModelSuite(
    "training", (None,), prepare_step, lambda settings, probe: [(probe.step_s, 0.0, probe.step_s)]
)
INFERENCE_SUITE = ModelSuite(
    "inference",
    ("prefill", "decode"),
    prepare_generation,
    lambda settings, probe: [
        (probe.prefill_s, 0.0, 0.0),
        (settings.decode_tokens * probe.token_s, probe.prefill_s, 0.0),
    ],
    torch.inference_mode,
)
