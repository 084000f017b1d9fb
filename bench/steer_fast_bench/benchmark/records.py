"""One benchmark measurement = one flat record; a run = a JSON list of them (long format).

Every record carries its context (suite, method, model, device, shapes, versions, the command
line), so a list of records from several runs and machines can be concatenated and compared.
A method that did not run still has a record: ``status`` is "skipped" (it cannot run here, e.g.
the Triton path without CUDA) or "failed" (it raised), and ``reason`` says why; its measured
fields are None. The suites make their records through the run's ``RunContext``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .methods import MethodUnavailable

if TYPE_CHECKING:
    from .settings import BenchmarkSettings


@dataclass
class BenchmarkRecord:
    """One row of results. Times are milliseconds: ``ms`` the median, ``ms_min``/``ms_max`` and
    the quartiles ``ms_p25``/``ms_p75`` the spread over ``repeats`` measured calls, with
    ``iqr_ratio`` (IQR / median) and ``max_min_ratio``; ``noisy`` is the noise rule's verdict
    on them and ``noise_reason`` why (``timing.Spread``). ``tokens_per_s`` counts the tokens
    the call processed (batch x seq_len for a training step or a prefill, batch per decoded token).
    ``peak_mem_bytes`` is measured as ``memory_measure`` says. Kernel rows also fill ``pass_``
    to ``roofline_pct`` (``gbps``: minimum bytes over the measured time); inference rows fill
    ``phase``; mixed-suite rows fill ``phase`` ("prefill", "decode" or "train"), ``adapters``
    (A, the adapters loaded) and ``spread`` (how the rows spread over them: "even" or
    "skewed"). Results written before these two fields existed load with them None."""

    suite: str
    method: str
    label: str
    model: str
    device: str
    device_name: str
    dtype: str
    batch: int
    seq_len: int
    rank: int | None
    activation: str | None
    status: str = "ok"  # "ok", "skipped" or "failed"
    reason: str | None = None
    ms: float | None = None
    ms_min: float | None = None
    ms_max: float | None = None
    repeats: int | None = None
    warmup: int | None = None
    ms_p25: float | None = None
    ms_p75: float | None = None
    iqr_ratio: float | None = None
    max_min_ratio: float | None = None
    noisy: bool | None = None
    noise_reason: str | None = None
    tokens_per_s: float | None = None
    peak_mem_bytes: int | None = None
    memory_measure: str | None = None
    trainable_params: int | None = None
    backend: str | None = None
    phase: str | None = None
    pass_: str | None = None
    tokens: int | None = None
    hidden_size: int | None = None
    residual: bool | None = None
    min_bytes: int | None = None
    gbps: float | None = None
    roofline_pct: float | None = None
    adapters: int | None = None
    spread: str | None = None
    torch_version: str = ""
    triton_version: str | None = None
    transformers_version: str | None = None
    peft_version: str | None = None
    pyreft_version: str | None = None
    steer_fast_version: str | None = None
    python_version: str = ""
    host: str = ""
    timestamp: str = ""
    command: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(BenchmarkRecord))


def device_name(device: torch.device) -> str:
    """The GPU's marketing name, or the CPU's model name and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next(
                (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                model,
            )
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, torch threads: {torch.get_num_threads()})"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, str | None]:
    """Where the numbers come from, as the record fields copied into every record."""
    versions = {
        f"{name}_version": package_version(name)
        for name in ("triton", "transformers", "peft", "pyreft", "steer_fast")
    }
    return dict(
        device=str(device),
        device_name=device_name(device),
        host=socket.gethostname(),
        python_version=sys.version.split()[0],
        torch_version=torch.__version__,
        **versions,
    )


@dataclass
class RunContext:
    settings: BenchmarkSettings
    environment: dict[str, Any]
    timestamp: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        )
    )
    # Progress reports (``progress.Progress``): what runs now, the seconds the timing block
    # running now still needs, the share of the suite done.
    describe: Callable[[str], None] = lambda text: None
    timing_left: Callable[[float], None] = lambda seconds: None
    part_done: Callable[[float], None] = lambda fraction: None

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
            **self.environment,
        )
        return BenchmarkRecord(**{**context, **fields})


def not_run(error: Exception) -> dict[str, str]:
    """The status and reason of the rows of a method that did not run: "skipped" when it cannot
    run here, else "failed" with the exception's type and the first line of its message."""
    if isinstance(error, MethodUnavailable):
        return dict(status="skipped", reason=str(error))
    message = str(error).strip().splitlines()
    return dict(
        status="failed",
        reason=f"{type(error).__name__}: {message[0] if message else ''}".rstrip(": "),
    )


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and a rename: never a half-written file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_records(path: Path, records: list[BenchmarkRecord]) -> None:
    write_text_atomic(path, json.dumps([asdict(r) for r in records], indent=1) + "\n")


def load_records(path: Path) -> list[BenchmarkRecord]:
    """The records of a results.json; fields this version does not know are dropped."""
    with open(path, encoding="utf-8") as handle:
        return [
            BenchmarkRecord(**{k: v for k, v in row.items() if k in RECORD_FIELDS})
            for row in json.load(handle)
        ]
