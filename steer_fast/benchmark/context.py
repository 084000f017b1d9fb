"""What the suites share during a run: the settings, the environment, the record factory."""

from __future__ import annotations

import datetime
import gc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .environment import Environment
from .methods import MethodContext
from .records import BenchmarkRecord
from .settings import BenchmarkSettings


@dataclass
class RunContext:
    settings: BenchmarkSettings
    environment: Environment
    timestamp: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        )
    )
    # advance(description, count=True): a new job starts (count=False: only a new description).
    advance: Callable[..., None] = lambda description, count=True: None

    @property
    def device(self) -> torch.device:
        return self.settings.device

    def method_context(self) -> MethodContext:
        s = self.settings
        return MethodContext(s.spec, s.device, s.rank, s.activation, s.seed)

    def record(self, suite: str, method: str, label: str, **fields) -> BenchmarkRecord:
        """A record with the run's context filled in; ``fields`` set or override the rest."""
        s, env = self.settings, self.environment
        context = dict(
            suite=suite,
            method=method,
            label=label,
            model=s.spec.name,
            device=env.device,
            device_name=env.device_name,
            dtype=s.dtype_name,
            batch=s.batch,
            seq_len=s.seq_len,
            rank=s.rank,
            activation=s.activation,
            torch_version=env.torch_version,
            triton_version=env.triton_version,
            transformers_version=env.transformers_version,
            peft_version=env.peft_version,
            pyreft_version=env.pyreft_version,
            steer_fast_version=env.steer_fast_version,
            python_version=env.python_version,
            host=env.host,
            timestamp=self.timestamp,
            command=s.command,
        )
        context.update(fields)
        return BenchmarkRecord(**context)


def describe_error(error: BaseException) -> str:
    """One line for a failed row: the exception type and the first line of its message."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}".rstrip(": ")


def release_memory(device: torch.device) -> None:
    """Free what the last method left behind before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
