"""Run the chosen suites, then write results.json, report.md and the PNG plots.

A run first says what it will run; then checks the machine (``machine.MachineCheck``) and times
the model once (``progress.probe_model``; the mixed suite at its own batch shape,
``progress.probe_mixed``) to say about how long it will take; then runs the suites under a
progress bar counted in seconds; then checks the machine again.
"""

from __future__ import annotations

import ctypes
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from . import kernel_suite, mixed_suite
from .kernel_suite import run_kernel_suite
from .machine import MachineCheck
from .memory import MEASURES
from .methods import METHODS, expected_to_run
from .mixed_methods import CHECK_TOKENS, INIT_GAIN
from .mixed_suite import run_mixed_suite
from .model_suite import INFERENCE_SUITE, LEARNING_RATE, TRAINING_SUITE
from .progress import Progress, format_duration, probe_model
from .records import BenchmarkRecord, RunContext, environment, save_records, write_text_atomic
from .report import render_report
from .settings import CPU_THREADS, DEFAULT_ACTIVATION, BenchmarkSettings

# The suites in the order they run: (run, estimate_s(ctx, probe, flops_per_s)) by name.
SUITE_RUNNERS = {
    "training": (TRAINING_SUITE.run, lambda ctx, probe, _: TRAINING_SUITE.estimate_s(ctx, probe)),
    "inference": (
        INFERENCE_SUITE.run,
        lambda ctx, probe, _: INFERENCE_SUITE.estimate_s(ctx, probe),
    ),
    "kernel": (run_kernel_suite, lambda ctx, _, flops: kernel_suite.estimate_s(ctx, flops)),
    "mixed": (run_mixed_suite, lambda ctx, probe, _: mixed_suite.estimate_s(ctx)),
}


def keep_freed_host_memory() -> str | None:
    """Ask glibc malloc to keep freed memory in the process; returns what was set, or None.

    By default glibc hands large blocks back to the kernel as soon as they are freed, so every
    call that allocates its outputs pays for fresh page faults: a cost of the host allocator,
    not of the code being timed (and a large one on virtual machines). Raising the mmap and trim
    thresholds makes freed blocks reusable, as PyTorch's caching allocator does on CUDA. Blocks
    above 32 MiB are still mapped afresh (glibc's ceiling). A no-op where libc is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_THRESHOLD (-3) to glibc's 64-bit maximum, then M_TRIM_THRESHOLD (-1).
        done = [libc.mallopt(-3, 32 * 1024 * 1024), libc.mallopt(-1, 2**31 - 1)]
    except (OSError, AttributeError):
        return None
    message = "glibc malloc keeps freed blocks up to 32 MiB (mmap and trim thresholds raised)"
    return message if all(done) else None


class BenchmarkRun(NamedTuple):
    """What a run produced: its records, the report and the files written."""

    records: list[BenchmarkRecord]
    report: str
    out: Path
    files: list[Path]
    seconds: float


def describe_run(settings: BenchmarkSettings) -> str:
    """What a run will do, in a few lines: suites, methods, shapes, model, device, size."""
    s, lines = settings, []
    for suite in (name for name in SUITE_RUNNERS if name in s.suites):
        methods = METHODS[suite].select(s.methods)
        running = sum(expected_to_run(m, s.device) for m in methods)
        what = f"{running} methods" + (
            f" ({len(methods) - running} skipped: need CUDA)" if running < len(methods) else ""
        )
        if suite == "kernel":
            shapes = len(kernel_suite.grid_cases(RunContext(s, {})))
            what = f"{shapes} shape{'s' * (shapes > 1)} x {len(kernel_suite.PASSES)} passes, {what}"
        if suite == "mixed":
            rows, length = mixed_suite.batch_shape(s)
            what = (
                f"A in {{{', '.join(map(str, s.adapters))}}} x {', '.join(s.spreads)} "
                f"spread, {rows} rows x {length} tokens, {what}"
            )
        lines.append(f"  {suite}: {what}")
    threads = (
        f"{torch.get_num_threads()} torch threads"
        if s.threads is None
        else (f"{s.threads} torch thread{'s' * (s.threads > 1)}")
    )
    sizes = {
        "quick": "quick (a smoke test)",
        "full": "full (every kernel shape, full budgets)",
        "default": "default (a quarter of the kernel shapes, short budgets; --full for all)",
    }
    return "\n".join(
        [
            f"steer-fast bench: {s.spec.name}, {s.dtype_name}, batch {s.batch} x {s.seq_len}, "
            f"rank {s.rank}, {s.activation}{activation_note(s.activation)}, on {s.device} with "
            f"{threads}; size {sizes[s.size]}",
            *lines,
            f"  results: {s.out}/",
        ]
    )


# What a --quick report says first: its few repeats cannot rank methods a few percent apart.
QUICK_CAUTION = (
    "this is a --quick run (a smoke test): with 3 to 5 repeats per cell, differences of a few "
    "percent between methods are within the noise, so its ratios do not rank methods that "
    "close; the default or --full run has the repeats to"
)


def activation_note(activation: str) -> str:
    """What the report says after the steering activation: whether it is SteerConfig()'s."""
    if activation == DEFAULT_ACTIVATION:
        return " (SteerConfig()'s default, the published adapter)"
    return f" (--activation; SteerConfig() builds {DEFAULT_ACTIVATION})"


def run_notes(
    settings: BenchmarkSettings, host_allocator: str | None, machine: MachineCheck
) -> list[str]:
    """The report's notes on how the run was made."""
    timing = (
        "the methods of each suite (and the implementations of each kernel case) are "
        "timed in rounds, one repeat of each per round, in a rotating order"
        if settings.interleave
        else "methods timed one after another"
    )
    threads = (
        f"{settings.threads} torch intra-op thread{'s' * (settings.threads > 1)}"
        if settings.threads is not None
        else "torch's default intra-op threads"
    )
    if settings.device.type == "cpu" and settings.threads == CPU_THREADS:
        threads += " (the CPU default, as the committed CPU results; --threads to change)"
    notes = [f"- Host allocator: {host_allocator}"] if host_allocator else []
    # A run of the mixed suite without the training and inference suites has its own notes.
    model_notes = not (
        "mixed" in settings.suites and not {"training", "inference"} & set(settings.suites)
    )
    return notes + [
        f"- Threads: {threads}; size: {settings.size}",
        f"- Steering activation: {settings.activation}{activation_note(settings.activation)}",
        machine.note(),
        *(
            [
                f"- Training: AdamW(lr={LEARNING_RATE}, weight_decay=0) over each method's "
                "trainable parameters; LoRA alpha = r, no dropout; LoReFT, steer_fast and the "
                "forward hooks on every layer, every position, the hooks with steer_fast's "
                "adapters and weights",
                f"- Inference: prefill of the {settings.batch} x {settings.seq_len} prompt, then "
                f"{settings.decode_tokens} greedy tokens with the KV cache, time per token",
            ]
            if model_notes
            else []
        ),
        f"- Timing: medians over repeats after warm-ups; {timing}",
        f"- Peak memory: {MEASURES[settings.device.type]}",
        f"- Seed {settings.seed} for every method's weights and data",
        *(mixed_notes(settings) if "mixed" in settings.suites else []),
    ]


def peft_default_targets(model_type: str) -> str:
    """PEFT's default LoRA target modules for ``model_type`` (what LoraConfig uses without
    target_modules), as "q_proj, v_proj"."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError:
        return "unknown (peft is not installed)"
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    return ", ".join(targets) if targets else f"none known for {model_type}"


def mixed_notes(settings: BenchmarkSettings) -> list[str]:
    """The report's notes on the mixed suite: its batch, spreads, methods and checks."""
    rows, length = mixed_suite.batch_shape(settings)
    model_type = getattr(settings.spec.config, "model_type", "?")
    one_spread = (
        "; the skewed spread at A = 1 is the even one, run once"
        if 1 in settings.adapters and set(settings.spreads) == {"even", "skewed"}
        else ""
    )
    return [
        f"- Mixed: B = max(batch {settings.batch}, largest A {max(settings.adapters)}) = {rows} "
        f"rows of T = batch x seq_len / B = {length} tokens (as many prompt tokens as the "
        "inference suite), the same for every A and method, so that every adapter can have a "
        f"row; {settings.decode_tokens} greedy tokens decoded per row through the KV cache",
        "- Mixed spreads: even, row i -> adapter i mod A; skewed, every other row on one adapter "
        "and the rest round robin over the other A - 1 (at A >= B / 2 some adapters then have "
        f"no row){one_spread}",
        f'- Mixed methods: A adapters named "default", "a1", ... at rank {settings.rank}, '
        f"random weights (gain {INIT_GAIN}) so that none is the identity; steer_fast on every "
        f"layer with {settings.activation}; PEFT LoRA r = alpha = {settings.rank}, no dropout, "
        f"PEFT's default target modules for {model_type}: {peft_default_targets(model_type)}; "
        "one batch per adapter runs set_adapter, then that adapter's rows, adapter after "
        "adapter (decoding each adapter's rows to the end before the next); training: "
        f"AdamW(lr={LEARNING_RATE}, weight_decay=0) over the A adapters, one adapter at a time "
        "weighting each adapter's loss by its share of the rows, then one AdamW step",
        f"- Mixed checks before timing: the mixed batches' logits (every position of the first "
        f"{CHECK_TOKENS} tokens of each row, and one decoded token) must equal those of each "
        "adapter run alone on its rows, the mixed training step's gradients those of the "
        "adapters trained one at a time, and every steering method must change the base "
        "model's logits; a method that fails is reported failed",
    ]


def run_benchmarks(settings: BenchmarkSettings, progress: bool = True) -> BenchmarkRun:
    """Run ``settings.suites`` (training, inference, kernel order) and write the outputs. With
    ``progress``, the plan, the estimate and a progress bar go to stderr."""
    started = time.perf_counter()
    say = (
        (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    )
    host_allocator = keep_freed_host_memory() if settings.device.type == "cpu" else None
    threads_before = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    bar = None
    try:
        say(describe_run(settings))
        machine = MachineCheck.start(settings.device)
        for warning in machine.warnings():
            say(f"  warning: {warning}; timings will be noisy")
        context = RunContext(settings, environment(settings.device))
        suites = [name for name in SUITE_RUNNERS if name in settings.suites]
        probe = probe_model(settings) if {"training", "inference"} & set(suites) else None
        flops = machine.flops_per_s(settings.device)
        estimates = {name: SUITE_RUNNERS[name][1](context, probe, flops) for name in suites}
        say(
            f"  estimated time: about {format_duration(sum(estimates.values()))} ("
            + ", ".join(f"{name} {format_duration(s)}" for name, s in estimates.items())
            + ")"
        )
        bar = Progress(estimates, show=progress)
        context.describe, context.timing_left = bar.describe, bar.timing_left
        context.part_done = bar.part_done
        records: list[BenchmarkRecord] = []
        with warnings.catch_warnings():
            # PEFT calls a transformers property deprecated in 5.x on every step.
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
            )
            for name in suites:
                bar.start_suite(name)
                records.extend(SUITE_RUNNERS[name][0](context))
        machine.finish(settings.device)
    finally:
        if bar is not None:
            bar.close()
        torch.set_num_threads(threads_before)
    report = render_report(
        records,
        run_notes(settings, host_allocator, machine),
        warnings=machine.warnings(),
        cautions=[QUICK_CAUTION] if settings.size == "quick" else [],
    )
    out = Path(settings.out)
    save_records(out / "results.json", records)
    write_text_atomic(out / "report.md", report)
    files = [out / "results.json", out / "report.md"]
    if settings.plots:
        from .plots import write_plots  # matplotlib is optional: imported only for plots

        files += write_plots(records, out)
    return BenchmarkRun(records, report, out, files, time.perf_counter() - started)
