"""Wall-clock timing of a callable: warm-ups, then the median of repeats.

On CUDA each repeat is bracketed by CUDA events and the device is synchronised once at the end
(the way ``triton.testing.do_bench`` does it); optionally the L2 cache is flushed before every
repeat by zeroing a buffer larger than it, so that small kernels are timed reading from DRAM. On
the CPU each repeat is timed with ``time.perf_counter``.

The number of repeats adapts to the cost of one call: enough to fill ``budget_s`` of measured
time, clamped to ``[min_repeats, max_repeats]``. ``measure_interleaved`` times several calls
in rounds (one repeat of each per round), so that a slow spell of the machine falls on all of
them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

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

    @classmethod
    def from_samples(cls, samples_ms: list[float], warmup: int) -> Timing:
        median, low, high = statistics.median(samples_ms), min(samples_ms), max(samples_ms)
        return cls(median, low, high, repeats=len(samples_ms), warmup=warmup)

    def scaled(self, factor: float) -> Timing:
        """The same timing with every time multiplied by ``factor`` (e.g. per decoded token)."""
        times = self.median_ms * factor, self.min_ms * factor, self.max_ms * factor
        return replace(self, median_ms=times[0], min_ms=times[1], max_ms=times[2])

    def record_fields(self) -> dict[str, float | int]:
        """The timing fields of a benchmark record: ms (the median), ms_min, ms_max, repeats,
        warmup."""
        return dict(
            ms=self.median_ms,
            ms_min=self.min_ms,
            ms_max=self.max_ms,
            repeats=self.repeats,
            warmup=self.warmup,
        )


@dataclass(frozen=True)
class TimingPlan:
    """How much to run: warm-up calls, then repeats filling ``budget_s`` within the bounds."""

    warmup: int = 3
    min_repeats: int = 5
    max_repeats: int = 100
    budget_s: float = 1.0

    def __post_init__(self) -> None:
        if self.warmup < 1:
            raise ValueError(
                f"warmup must be >= 1 (the last warm-up call sizes the repeats), got {self.warmup}"
            )
        if not 1 <= self.min_repeats <= self.max_repeats:
            raise ValueError(
                f"need 1 <= min_repeats <= max_repeats, got {self.min_repeats}, {self.max_repeats}"
            )
        if self.budget_s <= 0:
            raise ValueError(f"budget_s must be > 0, got {self.budget_s}")

    def repeats_for(self, seconds_per_call: float) -> int:
        wanted = int(self.budget_s / max(seconds_per_call, 1e-9))
        return max(self.min_repeats, min(self.max_repeats, wanted))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Call:
    """One thing to time: ``fn()``, or ``fn(setup())`` with only ``fn`` timed."""

    fn: Callable[..., Any]
    setup: Callable[[], Any] | None = None

    def prepare(self) -> Any:
        return None if self.setup is None else self.setup()

    def invoke(self, argument: Any) -> Any:
        return self.fn() if self.setup is None else self.fn(argument)

    def once(self) -> Any:
        """One whole call, its setup included."""
        return self.invoke(self.prepare())


def measure(
    fn: Callable[..., Any],
    device: torch.device,
    plan: TimingPlan = TimingPlan(),
    flush_l2: bool = False,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Time ``fn()``: ``plan.warmup`` calls, then the planned repeats; returns their spread.

    ``fn`` runs exactly as it would in use; whatever it returns is dropped before the next
    call. With ``setup``, every call (warm-up or measured) is ``fn(setup())`` and only ``fn`` is
    timed: e.g. a fresh prefill before each timed decode. The repeat count is sized from the
    last warm-up call alone, so a first call that compiles does not shrink it. With
    ``flush_l2`` on CUDA a 256 MiB buffer is zeroed before every repeat, outside the timed
    region. Raises whatever ``fn`` raises.
    """
    result = measure_interleaved({"call": Call(fn, setup)}, device, plan, flush_l2)["call"]
    if isinstance(result, BaseException):
        raise result
    return result


def measure_interleaved(
    calls: dict[str, Call],
    device: torch.device,
    plan: TimingPlan = TimingPlan(),
    flush_l2: bool = False,
) -> dict[str, Timing | Exception]:
    """Time several calls in rounds, one repeat of each per round, in a rotating order.

    Whatever else slows the machine during the measurement (other processes, clock changes)
    then falls on every call alike instead of on whichever ran at that moment. Each call first
    gets ``plan.warmup`` unmeasured runs; the number of rounds fills ``plan.budget_s`` per call
    on average (sized from each call's last warm-up), within the plan's bounds. A call that
    raises is dropped from the rounds and its exception returned in its place.
    """
    results: dict[str, Timing | Exception] = {}
    last_warmup_s: dict[str, float] = {}
    for name, call in calls.items():
        try:
            for _ in range(plan.warmup - 1):
                call.once()
            argument = call.prepare()
            synchronize(device)
            start = time.perf_counter()
            call.invoke(argument)
            synchronize(device)
            last_warmup_s[name] = time.perf_counter() - start
            del argument
        except Exception as error:  # reported in the call's place, the others go on
            results[name] = error
    live = list(last_warmup_s)
    if live:
        timer = _RepeatTimer(device, flush_l2)
        for round_index in range(plan.repeats_for(sum(last_warmup_s.values()) / len(live))):
            shift = round_index % len(live)
            for name in live[shift:] + live[:shift]:
                if name not in results:
                    try:
                        timer.run(name, calls[name])
                    except Exception as error:
                        results[name] = error
        for name, samples in timer.samples_ms().items():
            if name not in results:
                results[name] = Timing.from_samples(samples, plan.warmup)
    return {name: results[name] for name in calls}


class _RepeatTimer:
    """Times one repeat at a time: CUDA events read after one synchronisation at the end, or
    ``time.perf_counter`` on the CPU."""

    def __init__(self, device: torch.device, flush_l2: bool) -> None:
        self.device, self.cuda = device, device.type == "cuda"
        self.flush = None
        if self.cuda and flush_l2:
            self.flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        self.samples: dict[str, list] = {}

    def run(self, name: str, call: Call) -> None:
        argument = call.prepare()
        if not self.cuda:
            start = time.perf_counter()
            call.invoke(argument)
            self.samples.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
            return
        if self.flush is not None:
            self.flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call.invoke(argument)
        end.record()
        self.samples.setdefault(name, []).append((start, end))

    def samples_ms(self) -> dict[str, list[float]]:
        if not self.cuda:
            return self.samples
        torch.cuda.synchronize(self.device)
        return {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in self.samples.items()}


@dataclass(frozen=True)
class Bandwidth:
    """A measured copy: ``bytes_moved`` (read + write) per call and its timing."""

    bytes_moved: int
    timing: Timing

    @property
    def bytes_per_s(self) -> float:
        return self.bytes_moved / (self.timing.median_ms * 1e-3)


def copy_bandwidth(
    device: torch.device, nbytes: int | None = None, plan: TimingPlan | None = None
) -> Bandwidth:
    """The bandwidth of a large device-to-device tensor copy (read + write), median.

    The memory roofline of a kernel is its minimum bytes divided by this. Defaults: 1 GiB on
    CUDA, 256 MiB on the CPU, each far larger than the caches.
    """
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    plan = plan or TimingPlan(warmup=2, min_repeats=5, max_repeats=50, budget_s=0.5)
    timing = measure(lambda: target.copy_(source), device, plan)
    return Bandwidth(bytes_moved=2 * source.numel() * source.element_size(), timing=timing)
