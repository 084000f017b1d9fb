"""Run the chosen suites, then write results.json, report.md and the PNG plots."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .context import RunContext
from .environment import Environment, keep_freed_host_memory
from .inference_suite import INFERENCE_SUITE
from .kernel_suite import kernel_job_count, run_kernel_suite
from .memory import memory_measure_name
from .records import BenchmarkRecord, save_records, write_text_atomic
from .report import render_report
from .settings import BenchmarkSettings
from .training_suite import LEARNING_RATE, TRAINING_SUITE

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm comes with the [bench] extra; without it, no progress bar
    tqdm = None

SuiteRunner = Callable[[RunContext], Iterator[BenchmarkRecord]]
# The suites in the order they run: (run, job count) by name.
SUITE_RUNNERS: dict[str, tuple[SuiteRunner, Callable[[RunContext], int]]] = {
    "training": (TRAINING_SUITE.run, TRAINING_SUITE.job_count),
    "inference": (INFERENCE_SUITE.run, INFERENCE_SUITE.job_count),
    "kernel": (run_kernel_suite, kernel_job_count),
}


@dataclass
class BenchmarkRun:
    """What a run produced: its records, the report and the files written."""

    records: list[BenchmarkRecord]
    report: str
    out: Path
    files: list[Path]
    seconds: float


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def run_notes(
    settings: BenchmarkSettings, host_allocator: str | None, loads: tuple[str, str]
) -> list[str]:
    """The report's notes on how the run was made."""
    rounds = (
        "the methods of each suite (and the implementations of each kernel case) are timed "
        "in rounds, one repeat of each per round, in a rotating order"
    )
    notes = [f"- Host allocator: {host_allocator}"] if host_allocator else []
    return notes + [
        f"- 1-minute load average before / after the run: {loads[0]} / {loads[1]} "
        f"({os.cpu_count()} CPUs); other work on the machine slows every method",
        f"- Training: AdamW(lr={LEARNING_RATE}, weight_decay=0) over each method's trainable "
        f"parameters; LoRA alpha = r, no dropout; LoReFT and steer_fast on every layer, "
        f"every position",
        f"- Inference: prefill of the {settings.batch} x {settings.seq_len} prompt, then "
        f"{settings.decode_tokens} greedy tokens with the KV cache, time per token",
        "- Timing: medians over repeats after warm-ups; "
        + (rounds if settings.interleave else "methods timed one after another"),
        f"- Peak memory: {memory_measure_name(settings.device)}",
        f"- Seed {settings.seed} for every method's weights and data",
    ]


def run_benchmarks(settings: BenchmarkSettings, progress: bool = True) -> BenchmarkRun:
    """Run ``settings.suites`` (training, inference, kernel order) and write the outputs."""
    started = time.perf_counter()
    load_before = load_average()
    host_allocator = keep_freed_host_memory() if settings.device.type == "cpu" else None
    threads_before = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    context = RunContext(settings, Environment.capture(settings.device))
    suites = [name for name in SUITE_RUNNERS if name in settings.suites]
    total = sum(SUITE_RUNNERS[name][1](context) for name in suites)
    bar = tqdm(total=total, unit="job", dynamic_ncols=True) if progress and tqdm else None
    jobs_started = 0

    def advance(description: str, count: bool = True) -> None:
        nonlocal jobs_started
        if count:
            if jobs_started and bar is not None:
                bar.update(1)
            jobs_started += 1
        if bar is not None:
            bar.set_description_str(description[:70])

    context.advance = advance
    records: list[BenchmarkRecord] = []
    try:
        with warnings.catch_warnings():
            # PEFT calls a transformers property deprecated in 5.x on every step.
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
            )
            for name in suites:
                records.extend(SUITE_RUNNERS[name][0](context))
    finally:
        if bar is not None:
            bar.update(total - bar.n)
            bar.close()
        torch.set_num_threads(threads_before)
    loads = (load_before, load_average())
    report = render_report(records, run_notes(settings, host_allocator, loads))
    files = write_outputs(settings, records, report)
    return BenchmarkRun(records, report, settings.out, files, time.perf_counter() - started)


def write_outputs(
    settings: BenchmarkSettings, records: list[BenchmarkRecord], report: str
) -> list[Path]:
    """results.json, report.md and (unless ``settings.plots`` is off) the PNG plots."""
    out = Path(settings.out)
    save_records(out / "results.json", records)
    write_text_atomic(out / "report.md", report)
    files = [out / "results.json", out / "report.md"]
    if settings.plots:
        from .plots import write_plots  # matplotlib is optional: imported only for plots

        files += write_plots(records, out)
    return files
