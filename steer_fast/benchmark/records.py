"""One benchmark measurement = one flat record; a run = a JSON list of them (long format).

Every record carries its context (suite, method, model, device, shapes, versions, the command
line), so a list of records from several runs and machines can be concatenated and compared.
A method that did not run still has a record: ``status`` is "skipped" (it cannot run here, e.g.
the Triton path without CUDA) or "failed" (it raised), and ``reason`` says why; its measured
fields are None.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

STATUSES = ("ok", "skipped", "failed")


@dataclass
class BenchmarkRecord:
    """One row of results.

    Times are milliseconds: ``ms`` the median, ``ms_min``/``ms_max`` the spread over ``repeats``
    measured calls. ``tokens_per_s`` counts the tokens the call processed (batch x seq_len for
    a training step or a prefill, batch per decoded token). ``peak_mem_bytes`` is measured as
    ``memory_measure`` says. Kernel-suite rows also fill ``pass_``, ``tokens``, ``hidden_size``,
    ``residual``, ``min_bytes``, ``gbps`` (minimum bytes over the measured time) and
    ``roofline_pct``; inference rows fill ``phase``.
    """

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
    status: str = "ok"
    reason: str | None = None
    ms: float | None = None
    ms_min: float | None = None
    ms_max: float | None = None
    repeats: int | None = None
    warmup: int | None = None
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

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.status != "ok" and not self.reason:
            raise ValueError(f"a record with status {self.status!r} needs a reason")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BenchmarkRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(BenchmarkRecord))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and a rename (never a half-written file), with
    the usual permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates files readable by the owner only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_records(path: Path, records: list[BenchmarkRecord]) -> None:
    """results.json: the records as a JSON list, written atomically."""
    write_text_atomic(path, json.dumps([r.as_dict() for r in records], indent=1) + "\n")


def load_records(path: Path) -> list[BenchmarkRecord]:
    with open(path, encoding="utf-8") as handle:
        return [BenchmarkRecord.from_dict(row) for row in json.load(handle)]
