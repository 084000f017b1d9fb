"""Whether the machine was quiet enough to measure on: load average and a calibration loop.

Before the suites, ``MachineCheck.start`` reads the 1-minute load average and times a fixed
loop of matrix products twice; after them, ``finish`` does both again. A run on a busy machine
still runs, but its report opens with a warning when

- the load average before the run exceeds half the cores (with 2 cores: more than one
  runnable process besides this one, on average over the last minute), or
- the calibration loop's four times differ by more than 20% (the fastest against the slowest):
  the CPU or GPU this run had was not the same from start to end.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from .timing import synchronize

BUSY_LOAD_PER_CORE = 0.5
CALIBRATION_DRIFT = 0.2
# The calibration loop: products of two fixed 256 x 256 fp32 matrices, ~0.2 s on one CPU core.
_CALIBRATION_SIZE, _CALIBRATION_PRODUCTS = 256, 1000


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _products(device: torch.device) -> int:
    return _CALIBRATION_PRODUCTS * (10 if device.type == "cuda" else 1)


def calibration_ms(device: torch.device) -> float:
    """Milliseconds of the fixed calibration loop on ``device``, with the current thread count
    (on CUDA, many times the products, so that the loop is not all launch overhead)."""
    generator = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(_CALIBRATION_SIZE, _CALIBRATION_SIZE, generator=generator).to(device)
        for _ in range(2)
    )
    products = _products(device)
    torch.mm(a, b)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(products):
        torch.mm(a, b)
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


@dataclass
class MachineCheck:
    """The load average and calibration times before and after a run."""

    cores: int
    load_before: float | None
    calibration_before: tuple[float, ...]
    load_after: float | None = None
    calibration_after: tuple[float, ...] = field(default=())

    @classmethod
    def start(cls, device: torch.device) -> MachineCheck:
        load = load_average()  # read first: the calibration loop itself raises it
        return cls(os.cpu_count() or 1, load, (calibration_ms(device), calibration_ms(device)))

    def finish(self, device: torch.device) -> None:
        self.load_after = load_average()
        self.calibration_after = (calibration_ms(device), calibration_ms(device))

    def flops_per_s(self, device: torch.device) -> float:
        """The calibration loop's rate at its fastest (floating-point operations per second)."""
        flops = 2 * _CALIBRATION_SIZE**3 * _products(device)
        return flops / (min(self.calibration_before + self.calibration_after) * 1e-3)

    @property
    def drift(self) -> float:
        """Slowest over fastest calibration time, minus 1."""
        times = self.calibration_before + self.calibration_after
        return max(times) / min(times) - 1.0

    def warnings(self) -> list[str]:
        """One sentence per sign of a busy machine (none on a quiet one)."""
        found = []
        if self.load_before is not None and self.load_before > BUSY_LOAD_PER_CORE * self.cores:
            found.append(
                f"the 1-minute load average was {self.load_before:.2f} on {self.cores} "
                f"cores before the run (above {BUSY_LOAD_PER_CORE * self.cores:g}): "
                "other processes were competing for the CPU"
            )
        if self.drift > CALIBRATION_DRIFT:
            found.append(
                f"the calibration loop took {self._times()}: "
                f"{self.drift:.0%} apart (over {CALIBRATION_DRIFT:.0%}), so the machine's "
                "speed changed during the run"
            )
        return found

    def _times(self) -> str:
        before = " and ".join(f"{t:.0f}" for t in self.calibration_before)
        after = " and ".join(f"{t:.0f}" for t in self.calibration_after)
        return f"{before} ms at the start" + (f", {after} ms at the end" if after else "")

    def note(self) -> str:
        """The report's line on the machine's state."""
        loads = " / ".join(
            "n/a" if v is None else f"{v:.2f}" for v in (self.load_before, self.load_after)
        )
        return (
            f"- Machine check: 1-minute load average before / after the run {loads} "
            f"({self.cores} cores; the value after includes this run); calibration loop "
            f"(fixed matrix products) {self._times()}"
        )
