"""What the suites share during a run: the settings, the environment, the record factory."""

from __future__ import annotations

import datetime
import gc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .environment import Environment
from .methods import MethodContext
from .records import BenchmarkRecord
from .settings import BenchmarkSettings


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunContext:
    settings: BenchmarkSettings
    environment: Environment
    timestamp: str = field(default_factory=_now)
    # advance(description, count=True): a new job starts (count=False: only a new description).
    advance: Callable[..., None] = lambda description, count=True: None

    @property
    def device(self) -> torch.device:
        return self.settings.device

    def method_context(self) -> MethodContext:
        s = self.settings
        return MethodContext(s.spec, s.device, s.rank, s.activation, s.seed)

    def record(self, suite: str, method: str, label: str, **fields: Any) -> BenchmarkRecord:
        """A record with the run's context filled in; ``fields`` set or override the rest."""
        s = self.settings
        context = dict(
            suite=suite,
            method=method,
            label=label,
            model=s.spec.name,
            dtype=s.dtype_name,
            batch=s.batch,
            seq_len=s.seq_len,
            rank=s.rank,
            activation=s.activation,
            timestamp=self.timestamp,
            command=s.command,
            **asdict(self.environment),
        )
        return BenchmarkRecord(**{**context, **fields})


def describe_error(error: BaseException) -> str:
    """One line for a failed row: the exception type and the first line of its message."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}".rstrip(": ")


def release_memory(device: torch.device) -> None:
    """Free what the last method left behind before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
