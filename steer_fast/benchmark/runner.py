"""Run the chosen suites, then write results.json, report.md and the PNG plots."""

from __future__ import annotations

import ctypes
import os
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from .kernel_suite import kernel_job_count, run_kernel_suite
from .memory import MEASURES
from .model_suite import INFERENCE_SUITE, LEARNING_RATE, TRAINING_SUITE
from .records import BenchmarkRecord, RunContext, environment, save_records, write_text_atomic
from .report import render_report
from .settings import BenchmarkSettings

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm comes with the [bench] extra; without it, no progress bar
    tqdm = None

# The suites in the order they run: (run, job count) by name.
SUITE_RUNNERS = {"training": (TRAINING_SUITE.run, TRAINING_SUITE.job_count),
                 "inference": (INFERENCE_SUITE.run, INFERENCE_SUITE.job_count),
                 "kernel": (run_kernel_suite, kernel_job_count)}


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


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def run_notes(settings: BenchmarkSettings, host_allocator: str | None, loads: tuple[str, str]
              ) -> list[str]:
    """The report's notes on how the run was made."""
    timing = ("the methods of each suite (and the implementations of each kernel case) are "
              "timed in rounds, one repeat of each per round, in a rotating order"
              if settings.interleave else "methods timed one after another")
    notes = [f"- Host allocator: {host_allocator}"] if host_allocator else []
    return notes + [
        f"- 1-minute load average before / after the run: {loads[0]} / {loads[1]} "
        f"({os.cpu_count()} CPUs); other work on the machine slows every method",
        f"- Training: AdamW(lr={LEARNING_RATE}, weight_decay=0) over each method's trainable "
        "parameters; LoRA alpha = r, no dropout; LoReFT and steer_fast on every layer, every "
        "position",
        f"- Inference: prefill of the {settings.batch} x {settings.seq_len} prompt, then "
        f"{settings.decode_tokens} greedy tokens with the KV cache, time per token",
        f"- Timing: medians over repeats after warm-ups; {timing}",
        f"- Peak memory: {MEASURES[settings.device.type]}",
        f"- Seed {settings.seed} for every method's weights and data"]


def run_benchmarks(settings: BenchmarkSettings, progress: bool = True) -> BenchmarkRun:
    """Run ``settings.suites`` (training, inference, kernel order) and write the outputs."""
    started, load_before = time.perf_counter(), load_average()
    host_allocator = keep_freed_host_memory() if settings.device.type == "cpu" else None
    threads_before = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    context = RunContext(settings, environment(settings.device))
    suites = [name for name in SUITE_RUNNERS if name in settings.suites]
    total = sum(SUITE_RUNNERS[name][1](context) for name in suites)
    bar = tqdm(total=total, unit="job", dynamic_ncols=True) if progress and tqdm else None
    started_jobs = 0

    def advance(description: str, count: bool = True) -> None:
        nonlocal started_jobs
        if count and started_jobs:
            bar.update(1)
        started_jobs += count
        bar.set_description_str(description[:70])

    if bar is not None:
        context.advance = advance
    records: list[BenchmarkRecord] = []
    try:
        with warnings.catch_warnings():
            # PEFT calls a transformers property deprecated in 5.x on every step.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            for name in suites:
                records.extend(SUITE_RUNNERS[name][0](context))
    finally:
        if bar is not None:
            bar.update(total - bar.n)
            bar.close()
        torch.set_num_threads(threads_before)
    report = render_report(records, run_notes(settings, host_allocator,
                                              (load_before, load_average())))
    out = Path(settings.out)
    save_records(out / "results.json", records)
    write_text_atomic(out / "report.md", report)
    files = [out / "results.json", out / "report.md"]
    if settings.plots:
        from .plots import write_plots  # matplotlib is optional: imported only for plots

        files += write_plots(records, out)
    return BenchmarkRun(records, report, out, files, time.perf_counter() - started)
