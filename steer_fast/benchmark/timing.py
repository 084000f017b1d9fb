"""Wall-clock timing of a callable: warm-ups, then the median of repeats.

On CUDA each repeat is bracketed by CUDA events and the device is synchronised once at the end
(the way ``triton.testing.do_bench`` does it); optionally the L2 cache is flushed before every
repeat by zeroing a buffer larger than it, so that small kernels are timed reading from DRAM. On
the CPU each repeat is timed with ``time.perf_counter``. The number of repeats fills
``budget_s`` of measured time, clamped to ``[min_repeats, max_repeats]``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

_L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over ``repeats`` measured calls (after ``warmup`` unmeasured ones)."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    warmup: int

    def record_fields(self, scale: float = 1.0) -> dict[str, float | int]:
        """A record's timing fields (``ms`` is the median), every time multiplied by ``scale``
        (e.g. 1 / tokens for a time per decoded token)."""
        return dict(ms=self.median_ms * scale, ms_min=self.min_ms * scale,
                    ms_max=self.max_ms * scale, repeats=self.repeats, warmup=self.warmup)


@dataclass(frozen=True)
class TimingPlan:
    """How much to run: warm-up calls, then repeats filling ``budget_s`` within the bounds."""

    warmup: int = 3
    min_repeats: int = 5
    max_repeats: int = 100
    budget_s: float = 1.0

    def __post_init__(self) -> None:
        if self.warmup < 1 or not 1 <= self.min_repeats <= self.max_repeats or self.budget_s <= 0:
            raise ValueError(f"need warmup >= 1 (the last warm-up call sizes the repeats), "
                             f"1 <= min_repeats <= max_repeats and budget_s > 0, got {self}")

    def repeats_for(self, seconds_per_call: float) -> int:
        wanted = int(self.budget_s / max(seconds_per_call, 1e-9))
        return max(self.min_repeats, min(self.max_repeats, wanted))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Call(NamedTuple):
    """One thing to time: ``fn()``, or ``fn(setup())`` with only ``fn`` timed."""

    fn: Callable[..., Any]
    setup: Callable[[], Any] | None = None

    def args(self) -> tuple:
        return () if self.setup is None else (self.setup(),)

    def once(self) -> Any:
        """One whole call, its setup included."""
        return self.fn(*self.args())


def measure(fn: Callable[..., Any], device: torch.device, plan: TimingPlan = TimingPlan(),
            flush_l2: bool = False, setup: Callable[[], Any] | None = None) -> Timing:
    """Time ``fn()`` alone (see ``measure_interleaved``); raises whatever ``fn`` raises. With
    ``setup``, every call is ``fn(setup())`` and only ``fn`` is timed: e.g. a fresh prefill
    before each timed decode."""
    return unwrap(measure_interleaved({"call": Call(fn, setup)}, device, plan, flush_l2)["call"])


def _now(cuda: bool) -> Any:
    """A time stamp: a recorded CUDA event, or ``time.perf_counter()`` on the CPU."""
    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def measure_interleaved(calls: dict[str, Call], device: torch.device,
                        plan: TimingPlan = TimingPlan(), flush_l2: bool = False
                        ) -> dict[str, Timing | Exception]:
    """Time several calls in rounds, one repeat of each per round, in a rotating order.

    Whatever else slows the machine during the measurement (other processes, clock changes)
    then falls on every call alike instead of on whichever ran at that moment. Each call first
    gets ``plan.warmup`` unmeasured runs; the number of rounds fills ``plan.budget_s`` per call
    on average, sized from each call's last warm-up alone (so that a first call that compiles
    does not shrink it). Whatever a call returns is dropped before the next; with ``flush_l2``
    on CUDA a 256 MiB buffer is zeroed before every repeat, outside the timed region. A call
    that raises is dropped from the rounds and its exception returned in its place.
    """
    results: dict[str, Timing | Exception] = {}
    last_warmup_s: dict[str, float] = {}
    for name, call in calls.items():
        try:
            for _ in range(plan.warmup - 1):
                call.once()
            args = call.args()
            synchronize(device)
            start = time.perf_counter()
            call.fn(*args)
            synchronize(device)
            last_warmup_s[name] = time.perf_counter() - start
            del args
        except Exception as error:  # reported in the call's place, the others go on
            results[name] = error
    live, cuda = list(last_warmup_s), device.type == "cuda"
    if not live:
        return results
    flush = (torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
             if cuda and flush_l2 else None)
    samples: dict[str, list[tuple[Any, Any]]] = {name: [] for name in live}
    for round_index in range(plan.repeats_for(sum(last_warmup_s.values()) / len(live))):
        shift = round_index % len(live)
        for name in live[shift:] + live[:shift]:
            if name not in results:
                try:
                    args = calls[name].args()
                    if flush is not None:
                        flush.zero_()
                    start = _now(cuda)
                    calls[name].fn(*args)
                    samples[name].append((start, _now(cuda)))
                except Exception as error:
                    results[name] = error
    synchronize(device)
    for name, stamps in samples.items():
        if name not in results:
            ms = [s.elapsed_time(e) if cuda else (e - s) * 1e3 for s, e in stamps]
            results[name] = Timing(statistics.median(ms), min(ms), max(ms), len(ms), plan.warmup)
    return {name: results[name] for name in calls}


def unwrap(value: Any) -> Any:
    """``value``, raised when it is the exception that a step returned in place of a result."""
    if isinstance(value, Exception):
        raise value
    return value


class Bandwidth(NamedTuple):
    """A measured copy: ``bytes_moved`` (read + write) per call and its timing."""

    bytes_moved: int
    timing: Timing

    @property
    def bytes_per_s(self) -> float:
        return self.bytes_moved / (self.timing.median_ms * 1e-3)


def copy_bandwidth(device: torch.device) -> Bandwidth:
    """The bandwidth of a large device-to-device tensor copy (read + write), median.

    The memory roofline of a kernel is its minimum bytes divided by this. 1 GiB on CUDA, 256 MiB
    on the CPU, each far larger than the caches.
    """
    elements = (1 << 30 if device.type == "cuda" else 256 << 20) // 4
    source = torch.empty(elements, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    timing = measure(lambda: target.copy_(source), device, TimingPlan(2, 5, 50, 0.5))
    return Bandwidth(2 * source.numel() * source.element_size(), timing)
