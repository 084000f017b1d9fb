"""Wall-clock timing of a callable: warm-ups, then the median of repeats and their spread.

On CUDA each repeat is bracketed by CUDA events and the device is synchronised once at the end
(the way ``triton.testing.do_bench`` does it); optionally the L2 cache is flushed before every
repeat by zeroing a buffer larger than it, so that small kernels are timed reading from DRAM. On
the CPU each repeat is timed with ``time.perf_counter``. The number of repeats fills
``budget_s`` of measured time, clamped to ``[min_repeats, max_repeats]``. Every timing keeps
its spread (``Spread``), which says whether the repeats look like a machine shared with other
work while they ran.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

_L2_FLUSH_BYTES = 256 * 1024 * 1024


# The noise rule's thresholds (see ``Spread``).
NOISY_IQR_RATIO = 0.2
NOISY_MEDIAN_MIN_RATIO = 1.5
OUTLIER_FACTOR, NOISY_OUTLIER_SHARE = 1.5, 0.1
TIME_SLICES_MS = (10.0, 8.0, 4.0)  # scheduler quanta, largest first
SLICE_TOLERANCE = 0.03  # of the quantum
NOISE_RULE = (
    f"its IQR exceeds {NOISY_IQR_RATIO:.0%} of its median, its median "
    f"{NOISY_MEDIAN_MIN_RATIO}x its fastest repeat, at least two repeats (and a tenth "
    f"of them) exceed {OUTLIER_FACTOR}x the median, or its repeats sit on multiples of "
    f"a scheduler time slice ({', '.join(f'{q:g}' for q in TIME_SLICES_MS)} ms)"
)


def _quantile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, interpolated linearly (numpy's default)."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _time_slice(samples: Sequence[float]) -> float | None:
    """The largest quantum of ``TIME_SLICES_MS`` whose multiples every sample sits on (within
    ``SLICE_TOLERANCE`` of the quantum), with at least two different multiples among four or
    more samples; None when there is none."""
    if len(samples) < 4:
        return None
    for quantum in TIME_SLICES_MS:
        multiples = [round(s / quantum) for s in samples]
        if (
            min(multiples) >= 1
            and len(set(multiples)) >= 2
            and all(
                abs(s - k * quantum) <= SLICE_TOLERANCE * quantum
                for s, k in zip(samples, multiples)
            )
        ):
            return quantum
    return None


@dataclass(frozen=True)
class Spread:
    """How the repeats of one timing cell spread, and whether they say the machine was shared.

    ``p25_ms``/``p75_ms`` are the quartiles, ``iqr_ratio`` = (p75 - p25) / median and
    ``max_min_ratio`` = max / min. The cell is ``noisy`` (``noise_reason`` says which rules
    fired) when any of:

    - spread: iqr_ratio > 0.2. The middle half of the repeats differs by more than a fifth of
      the median, so the median is uncertain by about as much.
    - slowed: median / min > 1.5. Most repeats took half as long again as the fastest one; code
      does not run faster by chance, so something else held the cores for most of the cell.
    - outliers: at least two repeats, and at least a tenth of them, took more than 1.5x the
      median. Other work came and went during the cell.
    - time slices: four or more repeats all sit on multiples of a scheduler quantum (10, 8 or
      4 ms, within 3% of it), at least two different multiples: the repeats measured the
      scheduler's time slices, not the code.

    A lone slow repeat is not noise by these rules (the median ignores it; ``max_min_ratio``
    still shows it), and ``max_min_ratio`` alone decides nothing, since the maximum of many
    repeats grows with their number (kernel cells of 200 repeats on a quiet 2-core CPU have max
    / min between 1.2 and 5.7). The thresholds sit between a quiet and a shared machine: in the
    default CPU run at a load average of 0.6 on 2 cores, model-level cells had an IQR of at most
    7% of the median and a median at most 1.06x the fastest repeat, kernel cells at most 26%
    and 1.2x (1 of 48 marked); at a load average of 4.4, typical model-level cells had an IQR
    of 11% to 107% and a median 1.6 to 2x the fastest, and 42 of 69 cells were marked.
    """

    p25_ms: float
    p75_ms: float
    iqr_ratio: float
    max_min_ratio: float
    noisy: bool
    noise_reason: str | None


def spread_of(samples_ms: Sequence[float]) -> Spread:
    """The spread of a cell's repeat times (milliseconds, at least one) and the noise rule's
    verdict on them (see ``Spread``)."""
    ordered = sorted(float(s) for s in samples_ms)
    if not ordered:
        raise ValueError("spread_of needs at least one sample")
    low, median, high = ordered[0], _quantile(ordered, 0.5), ordered[-1]
    p25, p75 = _quantile(ordered, 0.25), _quantile(ordered, 0.75)
    iqr_ratio = (p75 - p25) / median if median > 0 else 0.0
    reasons = []
    if iqr_ratio > NOISY_IQR_RATIO:
        reasons.append(f"IQR {iqr_ratio:.0%} of the median")
    if low > 0 and median / low > NOISY_MEDIAN_MIN_RATIO:
        reasons.append(f"median {median / low:.1f}x the fastest repeat")
    slow = sum(s > OUTLIER_FACTOR * median for s in ordered)
    if slow >= 2 and slow >= NOISY_OUTLIER_SHARE * len(ordered):
        reasons.append(f"{slow} of {len(ordered)} repeats over {OUTLIER_FACTOR}x the median")
    if (quantum := _time_slice(ordered)) is not None:
        reasons.append(f"repeats on multiples of {quantum:g} ms (scheduler time slices)")
    return Spread(
        p25,
        p75,
        iqr_ratio,
        high / low if low > 0 else float("inf"),
        bool(reasons),
        "; ".join(reasons) or None,
    )


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over ``repeats`` measured calls (after ``warmup`` unmeasured ones)."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    warmup: int
    spread: Spread

    @classmethod
    def of(cls, samples_ms: Sequence[float], warmup: int) -> Timing:
        """The timing of measured repeats (milliseconds each)."""
        return cls(
            statistics.median(samples_ms),
            min(samples_ms),
            max(samples_ms),
            len(samples_ms),
            warmup,
            spread_of(samples_ms),
        )

    def record_fields(self, scale: float = 1.0) -> dict[str, float | int | bool | str | None]:
        """A record's timing fields (``ms`` is the median), every time multiplied by ``scale``
        (e.g. 1 / tokens for a time per decoded token); the ratios and the verdict are the
        cell's own."""
        s = self.spread
        return dict(
            ms=self.median_ms * scale,
            ms_min=self.min_ms * scale,
            ms_max=self.max_ms * scale,
            repeats=self.repeats,
            warmup=self.warmup,
            ms_p25=s.p25_ms * scale,
            ms_p75=s.p75_ms * scale,
            iqr_ratio=s.iqr_ratio,
            max_min_ratio=s.max_min_ratio,
            noisy=s.noisy,
            noise_reason=s.noise_reason,
        )


@dataclass(frozen=True)
class TimingPlan:
    """How much to run: warm-up calls, then repeats filling ``budget_s`` within the bounds."""

    warmup: int = 3
    min_repeats: int = 5
    max_repeats: int = 100
    budget_s: float = 1.0

    def __post_init__(self) -> None:
        if self.warmup < 1 or not 1 <= self.min_repeats <= self.max_repeats or self.budget_s <= 0:
            raise ValueError(
                f"need warmup >= 1 (the last warm-up call sizes the repeats), "
                f"1 <= min_repeats <= max_repeats and budget_s > 0, got {self}"
            )

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


def measure(
    fn: Callable[..., Any],
    device: torch.device,
    plan: TimingPlan = TimingPlan(),
    flush_l2: bool = False,
    setup: Callable[[], Any] | None = None,
) -> Timing:
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


def measure_interleaved(
    calls: dict[str, Call],
    device: torch.device,
    plan: TimingPlan = TimingPlan(),
    flush_l2: bool = False,
    on_round: Callable[[float], None] | None = None,
) -> dict[str, Timing | Exception]:
    """Time several calls in rounds, one repeat of each per round, in a rotating order.

    Whatever else slows the machine during the measurement (other processes, clock changes)
    then falls on every call alike instead of on whichever ran at that moment. Each call first
    gets ``plan.warmup`` unmeasured runs; the number of rounds fills ``plan.budget_s`` per call
    on average, sized from each call's last warm-up alone (so that a first call that compiles
    does not shrink it). Whatever a call returns is dropped before the next; with ``flush_l2``
    on CUDA a 256 MiB buffer is zeroed before every repeat, outside the timed region. A call
    that raises is dropped from the rounds and its exception returned in its place.

    ``on_round(seconds)``, when given, is called before the first round and after every round
    with the time the remaining rounds should take: the rounds left times the mean wall time of
    the rounds so far (before the first, the sum of the last warm-ups).
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
    flush = (
        torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        if cuda and flush_l2
        else None
    )
    samples: dict[str, list[tuple[Any, Any]]] = {name: [] for name in live}
    rounds, started = plan.repeats_for(sum(last_warmup_s.values()) / len(live)), time.perf_counter()
    report = on_round or (lambda seconds: None)
    report(rounds * sum(last_warmup_s.values()))
    for round_index in range(rounds):
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
        report((rounds - round_index - 1) * (time.perf_counter() - started) / (round_index + 1))
    synchronize(device)
    for name, stamps in samples.items():
        if name not in results:
            ms = [s.elapsed_time(e) if cuda else (e - s) * 1e3 for s, e in stamps]
            results[name] = Timing.of(ms, plan.warmup)
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
