"""The mixed suite: many adapters loaded on one model, every row of a batch with its own.

For each adapter count A (``--adapters``) and spread of the rows over the adapters
(``--spread``: "even", row i -> adapter i mod A; "skewed", half of the rows on one adapter, the
rest round robin over the others), the suite times, on the same model and tokens:

- inference, the prefill of a B x T prompt and the KV-cache decode per token, for the base
  model, steer_fast with every row on one adapter (no ``adapter_names``), steer_fast's mixed
  batch (``adapter_names``, one call), the same adapters one batch per adapter
  (``set_adapter``, then the forward or the decode, one adapter after another) and PEFT LoRA's
  mixed batch with A adapters;
- a training step (forward, backward, AdamW over the A adapters) with one mixed batch, and
  with the adapters trained one after another on their own rows (the losses weighted by their
  share of the rows, so that both steps compute the same gradients), then one AdamW step.

The batch has B = max(--batch, largest A) rows, the same for every A and method, so that every
adapter can have a row and the methods at each A, and each method across A, process the same
rows; each row has T = --batch x --seq-len / B tokens (at least 2), so that a prompt holds as
many tokens as the inference suite's. The skewed spread at A = 1 is the even one, run once.

Before any timing, each method's setup checks its outputs (``mixed_methods``): a mixed batch
whose logits (or gradients) differ from the adapters run one at a time, or adapters that leave
the base model's logits unchanged, fail the method, whose rows then say why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from .memory import MEASURES, measure_peak_memory, release_memory
from .methods import MIXED_METHODS, Method
from .mixed_methods import (
    INFERENCE_PHASES,
    TRAINING_PHASES,
    MixedSetup,
    ModelCache,
    model_kind,
    row_adapters,
)
from .model_suite import LEARNING_RATE, PROFILED_CALL
from .models import make_tokens
from .progress import MixedProbe, probe_mixed
from .records import BenchmarkRecord, RunContext, not_run
from .settings import BenchmarkSettings
from .timing import measure_interleaved, unwrap

SUITE = "mixed"
KINDS: dict[str, tuple[tuple[str, ...], Callable[[], contextlib.AbstractContextManager]]] = {
    "inference": (INFERENCE_PHASES, torch.inference_mode),
    "training": (TRAINING_PHASES, contextlib.nullcontext),
}
# For the time estimate: a small op's cost (a mixed batch adds a few per loaded adapter and
# layer, PEFT's mixed batch a few per adapter with rows, LoRA module and layer: measured on
# cpu-small at A = 64), and adding one adapter to a model, per layer.
SMALL_OP_S = {"cpu": 2e-5, "cuda": 1e-5}
ADD_ADAPTER_S = {"cpu": 4e-3, "cuda": 5e-3}


def kind(method: Method) -> str:
    """ "training" for a method whose name ends in "_train", else "inference"."""
    return "training" if method.name.endswith("_train") else "inference"


def batch_shape(settings: BenchmarkSettings) -> tuple[int, int]:
    """(B, T): B = max(batch, largest A) rows of T = batch x seq_len / B tokens (at least 2)."""
    rows = max(settings.batch, max(settings.adapters))
    return rows, max(2, settings.batch * settings.seq_len // rows)


def cases(settings: BenchmarkSettings) -> list[tuple[int, str]]:
    """The (A, spread) pairs the suite runs, A ascending (skewed at A = 1 only without even)."""
    return [
        (count, spread)
        for count in settings.adapters
        for spread in settings.spreads
        if not (count == 1 and spread == "skewed" and "even" in settings.spreads)
    ]


def used_adapters(rows: int, count: int, spread: str) -> int:
    """How many of ``count`` adapters have rows."""
    return len(set(row_adapters(rows, count, spread)))


def run_mixed_suite(ctx: RunContext) -> Iterator[BenchmarkRecord]:
    """Per A: the inference methods over each spread, then the training methods; each group's
    models built once for every spread and freed before the next group."""
    s = ctx.settings
    methods = MIXED_METHODS.select(s.methods)
    if not methods:
        return
    rows, length = batch_shape(s)
    tokens = make_tokens(s.spec, rows, length, s.device, s.seed)
    todo = cases(s)
    # The share of the suite each group is, for the progress bar: one per method, plus one per
    # extra batch of the one-batch-per-adapter methods.
    weight = {
        (count, spread, k): sum(
            1 + (used_adapters(rows, count, spread) - 1) * ("separate" in m.name)
            for m in methods
            if kind(m) == k
        )
        for count, spread in todo
        for k in KINDS
    }
    total, done = max(sum(weight.values()), 1), 0
    for count in s.adapters:
        spreads = [spread for c, spread in todo if c == count]
        for name, (phases, mode) in KINDS.items():
            group = [m for m in methods if kind(m) == name]
            if not group or not spreads:
                continue
            records: list[BenchmarkRecord] = []
            models = ModelCache(s.spec, s.device, s.rank, s.activation, s.seed, count)
            ctx.describe(f"{SUITE} A={count}: building the {name} models")
            models.prebuild(sorted({model_kind(m.name) for m in group}))  # outside the mode
            with mode():
                for spread in spreads:
                    setup = MixedSetup(
                        count, spread, tokens, s.decode_tokens, LEARNING_RATE, models
                    )
                    records += _run_group(ctx, group, setup, phases)
                    done += weight[count, spread, name]
                    ctx.part_done(done / total)
                del models, setup
            release_memory(s.device)
            yield from records


def _run_group(
    ctx: RunContext, methods: list[Method], setup: MixedSetup, phases: tuple[str, ...]
) -> list[BenchmarkRecord]:
    """Set up (and check) every method of one (A, spread), time each phase in rounds across
    them, then measure each one's peak memory per phase."""
    s = ctx.settings
    where = f"{SUITE} A={setup.adapters} {setup.spread}"
    shape = dict(
        batch=setup.tokens.shape[0],
        seq_len=setup.tokens.shape[1],
        adapters=setup.adapters,
        spread=setup.spread,
    )
    rows: dict[str, list[BenchmarkRecord]] = {}
    prepared = {}

    def not_ran(method: Method, error: Exception, backend: str | None = None) -> None:
        rows[method.name] = [
            ctx.record(
                SUITE,
                method.name,
                method.label,
                phase=phase,
                **shape,
                **not_run(error),
                backend=backend,
            )
            for phase in phases
        ]

    for method in methods:
        ctx.describe(f"{where}: setting up {method.name}")
        try:
            prepared[method.name] = method.setup(setup)
        except Exception as error:  # a method that cannot be set up or checked: rows say why
            not_ran(method, error)
    timings = []
    for phase in phases:
        calls = {name: candidate.phases[phase].call for name, candidate in prepared.items()}
        what = f"{len(calls)} methods in rounds" if len(calls) > 1 else "".join(calls)
        ctx.describe(f"{where}: timing {what}, {phase}")
        groups = [calls] if s.interleave else [{name: call} for name, call in calls.items()]
        timings.append(
            {
                name: timing
                for group in groups
                for name, timing in measure_interleaved(
                    group, s.device, s.timing[SUITE], on_round=ctx.timing_left
                ).items()
            }
        )
    ctx.describe(f"{where}: peak memory")
    for method in (m for m in methods if m.name in prepared):
        candidate = prepared[method.name]
        try:
            times = [unwrap(timing[method.name]) for timing in timings]
            memory = [
                measure_peak_memory(candidate.phases[phase].call.once, s.device, candidate.resident)
                for phase in phases
            ]
        except Exception as error:  # a method that fails here still gets rows that say why
            not_ran(method, error, candidate.backend)
            continue
        rows[method.name] = []
        for phase, timing, peak in zip(phases, times, memory):
            timed = candidate.phases[phase]
            fields = timing.record_fields(1.0 / timed.steps)
            rows[method.name].append(
                ctx.record(
                    SUITE,
                    method.name,
                    method.label,
                    phase=phase,
                    **shape,
                    **fields,
                    tokens_per_s=timed.tokens / (fields["ms"] * 1e-3),
                    peak_mem_bytes=peak,
                    memory_measure=MEASURES[s.device.type],
                    backend=candidate.backend,
                    trainable_params=candidate.adapter_params,
                )
            )
    return [row for method in methods for row in rows[method.name]]


def _block_s(costs: list[tuple[float, float]], settings: BenchmarkSettings) -> float:
    """The seconds of one timing block: (timed seconds, untimed set-up seconds) per method, run
    for the warm-ups, the rounds the timing plan buys and the peak-memory call."""
    if not costs:
        return 0.0
    plan, device = settings.timing[SUITE], settings.device.type
    rounds = plan.repeats_for(sum(timed for timed, _ in costs) / len(costs))
    calls = plan.warmup + rounds + PROFILED_CALL[device]
    return calls * sum(timed + setup for timed, setup in costs)


def _group_s(
    settings: BenchmarkSettings, probe: MixedProbe, methods: list[Method], count: int, spread: str
) -> float:
    """The seconds of one (A, spread) group of ``methods`` (all inference or all training)."""
    rows, _ = batch_shape(settings)
    used = used_adapters(rows, count, spread)
    small = SMALL_OP_S[settings.device.type] * settings.spec.num_layers
    extra = {"steer_mixed": 3 * count * small, "peft_lora_mixed": 6 * used * small}
    # One batch per adapter: (used - 1) more calls on small batches, a prefill's about two
    # one-row decode steps, a training forward and backward about four.
    calls = {"prefill": 2.0, "decode": 1.2, "train": 4.0}

    def cost(method: Method, base_s: float, phase: str) -> float:
        separate = "separate" in method.name
        return (
            base_s
            + extra.get(method.name, 0.0)
            + separate * (used - 1) * calls[phase] * probe.call_s
        )

    if kind(methods[0]) == "training":
        steps = [(cost(m, probe.step_s * 1.3, "train"), 0.0) for m in methods]
        return 3 * sum(timed for timed, _ in steps) + _block_s(steps, settings)  # + the check
    prefills = [(cost(m, probe.prefill_s, "prefill"), 0.0) for m in methods]
    decodes = [
        (settings.decode_tokens * cost(m, probe.token_s, "decode"), prefill)
        for m, (prefill, _) in zip(methods, prefills)
    ]
    check = len(methods) * 2 * (used + 2) * probe.call_s
    return check + _block_s(prefills, settings) + _block_s(decodes, settings)


def estimate_s(ctx: RunContext) -> float:
    """The suite's expected seconds, from one probe of the model at the suite's batch shape
    (``progress.probe_mixed``): per A the models built (with A adapters each), then per group
    its checks and timing blocks, each method's calls costed from the probe plus what one batch
    per adapter adds (a call per extra adapter) and PEFT's mixed batch (small ops per adapter
    and layer)."""
    s = ctx.settings
    methods = MIXED_METHODS.select(s.methods)
    if not methods:
        return 0.0
    rows, length = batch_shape(s)
    probe = probe_mixed(s, rows, length)
    models = {m.name: model_kind(m.name) for m in methods}
    total = 0.0
    for count, spread in cases(s):
        for name in KINDS:
            group = [m for m in methods if kind(m) == name]
            if group:
                total += _group_s(s, probe, group, count, spread)
    for count in s.adapters:
        for name in KINDS:
            built = {models[m.name] for m in methods if kind(m) == name}
            total += len(built) * probe.build_s + (
                len(built - {"base"}) * count * ADD_ADAPTER_S[s.device.type] * s.spec.num_layers
            )
    return total
