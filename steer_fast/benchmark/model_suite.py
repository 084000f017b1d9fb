"""What the training and inference suites share: set up each method on the same model and tokens,
time its phases in rounds, measure their peak memory and record one row per phase.

A suite is a ``ModelSuite``: its name (which is also its method table's, ``METHODS[name]``),
its phases, its timing plan, and ``prepare``, which turns a method's ``Candidate`` into the
``Phase`` calls to time. A method that cannot be set up, prepared, timed or measured still gets
its rows, with the status and the reason. With ``settings.interleave`` all methods of the suite
are set up first and each phase is timed in rounds across them (see ``measure_interleaved``);
otherwise each method is set up, timed and freed in turn.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .context import RunContext, describe_error, release_memory
from .memory import measure_peak_memory
from .methods import METHODS, Candidate, Method, MethodUnavailable
from .models import make_tokens
from .presets import TimingPlans
from .records import BenchmarkRecord
from .timing import Call, Timing, TimingPlan, measure_interleaved


@dataclass(frozen=True)
class Phase:
    """One timed call of a prepared method: ``tokens`` processed per call, and ``steps`` the
    call takes (its time is reported per step, e.g. per decoded token)."""

    name: str | None
    call: Call
    tokens: int
    steps: int = 1


@dataclass(frozen=True)
class Prepared:
    """A method ready to time: its phases, and what it holds (its resident set for memory)."""

    method: Method
    candidate: Candidate
    phases: list[Phase]
    resident: list[Any]


# prepare(ctx, candidate, tokens) -> (phases, resident); raises when the method cannot run.
Prepare = Callable[[RunContext, Candidate, torch.Tensor], tuple[list[Phase], list[Any]]]


@dataclass(frozen=True)
class ModelSuite:
    """A model-level suite: its name (also its method table's), the record ``phase`` of each
    timed call (None: one unnamed phase), ``prepare`` and its timing plan."""

    name: str
    phases: tuple[str | None, ...]
    prepare: Prepare
    plan: Callable[[TimingPlans], TimingPlan]
    # Entered around each group's set-up, timing and measurement (e.g. torch.inference_mode).
    mode: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def job_count(self, ctx: RunContext) -> int:
        return len(METHODS[self.name].select(ctx.settings.methods))

    def run(self, ctx: RunContext) -> Iterator[BenchmarkRecord]:
        s = ctx.settings
        tokens = make_tokens(s.spec, s.batch, s.seq_len, s.device, s.seed)
        for group in METHODS[self.name].groups(s.methods, s.interleave):
            with self.mode():
                rows = self._run_group(ctx, group, tokens)
            release_memory(s.device)
            yield from rows

    def _run_group(
        self, ctx: RunContext, methods: list[Method], tokens: torch.Tensor
    ) -> list[BenchmarkRecord]:
        rows: dict[str, list[BenchmarkRecord]] = {}
        prepared: dict[str, Prepared] = {}
        for method in methods:
            ctx.advance(f"{self.name}: {method.name}")
            outcome = self._prepare(ctx, method, tokens)
            if isinstance(outcome, Prepared):
                prepared[method.name] = outcome
            else:
                rows[method.name] = outcome
        if len(prepared) > 1:
            ctx.advance(f"{self.name}: timing {len(prepared)} methods in rounds", count=False)
        plan = self.plan(ctx.settings.timing)
        timings = [
            measure_interleaved(
                {n: p.phases[i].call for n, p in prepared.items()}, ctx.device, plan
            )
            for i in range(len(self.phases))
        ]
        for name, p in prepared.items():
            rows[name] = self._record(ctx, p, [timing[name] for timing in timings])
        return [row for method in methods for row in rows[method.name]]

    def _row(self, ctx: RunContext, method: Method, **fields: Any) -> BenchmarkRecord:
        return ctx.record(self.name, method.name, method.label, **fields)

    def _failed(
        self, ctx: RunContext, method: Method, status: str, reason: str, backend: str | None = None
    ) -> list[BenchmarkRecord]:
        fields = dict(status=status, reason=reason, backend=backend)
        return [self._row(ctx, method, phase=phase, **fields) for phase in self.phases]

    def _prepare(
        self, ctx: RunContext, method: Method, tokens: torch.Tensor
    ) -> Prepared | list[BenchmarkRecord]:
        try:
            candidate = method.setup(ctx.method_context())
        except MethodUnavailable as reason:
            return self._failed(ctx, method, "skipped", str(reason))
        except Exception as error:  # a method that cannot be set up gets rows that say why
            return self._failed(ctx, method, "failed", describe_error(error))
        try:
            phases, resident = self.prepare(ctx, candidate, tokens)
        except Exception as error:
            return self._failed(ctx, method, "failed", describe_error(error), candidate.backend)
        return Prepared(method, candidate, phases, resident)

    def _record(
        self, ctx: RunContext, p: Prepared, timings: list[Timing | Exception]
    ) -> list[BenchmarkRecord]:
        method, backend = p.method, p.candidate.backend
        try:
            failure = next((t for t in timings if isinstance(t, Exception)), None)
            if failure is not None:
                raise failure
            memory = [measure_peak_memory(ph.call.once, ctx.device, p.resident) for ph in p.phases]
        except Exception as error:  # a method that fails here still gets rows that say why
            return self._failed(ctx, method, "failed", describe_error(error), backend)
        trainable = sum(parameter.numel() for parameter in p.candidate.trainable)
        rows = []
        for phase, timing, peak in zip(p.phases, timings, memory, strict=True):
            per_step = timing.scaled(1.0 / phase.steps)
            rows.append(
                self._row(
                    ctx,
                    method,
                    phase=phase.name,
                    **per_step.record_fields(),
                    tokens_per_s=phase.tokens / (per_step.median_ms * 1e-3),
                    peak_mem_bytes=peak.peak_bytes,
                    memory_measure=peak.measure,
                    trainable_params=trainable,
                    backend=backend,
                )
            )
        return rows
