"""results.json of ``steer-fast reproduce``: what it records about the machine, how it is
written (atomically, after every run) and when an existing one may be resumed.

The file holds ``format``, the result ``settings`` (those that change what a run measures),
every ``commands`` line that added runs to it, the ``environment`` (versions of torch,
transformers, peft, pyreft, pyvene, accelerate and steer-fast; the processor, cores, torch
threads, memory and GPU), the ``tasks`` (split sizes and a fingerprint of their data), the
methods ``skipped`` with the reason, and the ``runs``, one record per (task, method, seed,
learning rate, options).

Format 2 (this version) against format 1: a run's ``learning_rate`` may be one rate per part of
a joint model (``{"lora": .., "steering": ..}``); every run records its per-run ``options``
(``{"orthogonality_frequency": N}`` for joint_orth, ``{}`` otherwise; absent reads as ``{}``),
which are part of its key, so that the constraint's frequency is no longer a setting of the
whole file; the settings hold ``selection_seed``, the seed the learning rates are chosen at; a
run may hold a ``validation_curve``. A format-1 file is migrated when it is read
(``migrate_format_1``): its runs are kept as they are (joint_orth runs gain the options format
1 ran them with), and it is written back, as format 2, only when runs are added to it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

RESULTS_FORMAT = 2
RESULTS_FILE = "results.json"
VERSIONED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "pyreft",
    "pyvene",
    "accelerate",
    "steer-fast",
)


def environment() -> dict[str, Any]:
    """Versions, machine and threads, for results.json."""
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    import torch

    machine = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _memory_bytes(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return {"versions": versions, "machine": machine}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def rate_key(rate: Any) -> Any:
    """A learning rate as a dict key: a number or None as it is, a rate per part as sorted
    (part, rate) pairs."""
    return tuple(sorted(rate.items())) if isinstance(rate, dict) else rate


def options_key(options: dict[str, Any] | None) -> tuple:
    """A run's options as a dict key: sorted (name, value) pairs."""
    return tuple(sorted((options or {}).items()))


def run_key(record: dict[str, Any]) -> tuple:
    """What identifies a run: (task, method, seed, learning rate, options)."""
    return (
        record["task"],
        record["method"],
        record["seed"],
        rate_key(record["learning_rate"]),
        options_key(record.get("options")),
    )


def migrate_format_1(results: dict[str, Any]) -> dict[str, Any]:
    """A format-1 results dict as format 2 (a new dict; the runs' measurements unchanged).

    Format 1 had one ``orthogonality_frequency`` for the whole file: it moves into the options
    of each joint_orth run. Format 1 chose a learning rate per seed; format 2 chooses it at
    ``selection_seed``, which becomes the smallest seed of the file's trained runs (0 when there
    are none): runs at other seeds are kept and count as repeats when they are at the chosen
    rate.
    """
    migrated = json.loads(json.dumps(results))  # a deep copy of plain JSON
    settings = migrated.setdefault("settings", {})
    frequency = settings.pop("orthogonality_frequency", 100)
    seeds = [r["seed"] for r in migrated.get("runs", []) if r.get("seed") is not None]
    settings["selection_seed"] = min(seeds, default=0)
    for record in migrated.get("runs", []):  # the others' key has no options: left as they are
        if record["method"] == "joint_orth":
            record["options"] = {"orthogonality_frequency": frequency}
    migrated["format"] = RESULTS_FORMAT
    migrated["migrated_from"] = 1
    return migrated


def read_results(path: Path) -> dict[str, Any]:
    """The results file at ``path`` in this version's format (format 1 is migrated); ValueError
    for a file that is not JSON or has another format."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"out: {path} is not valid JSON ({error}); use --overwrite to start again"
        ) from error
    if results.get("format") == 1:
        return migrate_format_1(results)
    if results.get("format") != RESULTS_FORMAT:
        raise ValueError(
            f"out: {path} has format {results.get('format')!r}, this version reads 1 and "
            f"{RESULTS_FORMAT}; use another --out or --overwrite"
        )
    return results


def fingerprint(splits) -> str:
    """A hash of a task's three splits (prompts and answers), to refuse resuming on other data."""
    digest = hashlib.sha256()
    for split in (splits.train, splits.validation, splits.test):
        for example in split:
            digest.update(
                f"{example.prompt}\x00{example.completion}\x00{example.answer}\x01".encode()
            )
        digest.update(b"\x02")
    return digest.hexdigest()[:16]


def write_json_atomic(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to a temporary file beside ``path`` and rename it into place."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(
        json.dumps(_finite(value), indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    os.replace(staging, path)


def _finite(value: Any) -> Any:
    """JSON has no NaN: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def load_results(out: Path, settings, overwrite: bool = False) -> dict:
    """The results file in ``out`` to resume (format 1 migrated, ``read_results``), or a new
    one, for ``settings`` (a ``settings.ReproduceSettings``). ValueError when the file was
    written with other result settings (unless ``overwrite``). Nothing is written here."""
    path = out / RESULTS_FILE
    if path.exists() and not overwrite:
        results = read_results(path)
        stored = results.get("settings", {})
        wanted = _finite(settings.result_settings())
        changed = [
            f"{k}: {stored.get(k)!r} there, {wanted[k]!r} now"
            for k in wanted
            if stored.get(k) != wanted[k]
        ]
        if changed:
            raise ValueError(
                f"out: {path} was written with other settings ({'; '.join(changed)})"
                "; use another --out, or --overwrite to start again"
            )
        return results
    return {
        "format": RESULTS_FORMAT,
        "settings": _finite(settings.result_settings()),
        "commands": [],
        "environment": {},
        "tasks": {},
        "skipped": {},
        "runs": [],
    }
