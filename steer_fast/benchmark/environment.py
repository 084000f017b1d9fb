"""The machine and software a benchmark ran on: device names, library versions, the host."""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import re
import socket
import sys
from dataclasses import dataclass

import torch


def default_device() -> torch.device:
    """CUDA when a GPU is visible, the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    """The GPU's marketing name, or the CPU's model name and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({os.cpu_count()} cores, torch threads: {torch.get_num_threads()})"


def device_slug(device: torch.device) -> str:
    """A short file-name-safe tag for the device: "cpu", "cuda-nvidia-h100-80gb-hbm3"."""
    if device.type != "cuda":
        return device.type
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cuda-{name}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Environment:
    """Everything about where the numbers come from, copied into every record (the field names
    are the record's)."""

    device: str
    device_name: str
    host: str
    python_version: str
    torch_version: str
    triton_version: str | None
    transformers_version: str | None
    peft_version: str | None
    pyreft_version: str | None
    steer_fast_version: str | None

    @classmethod
    def capture(cls, device: torch.device) -> Environment:
        versions = {
            f"{name}_version": package_version(name)
            for name in ("triton", "transformers", "peft", "pyreft", "steer_fast")
        }
        return cls(
            device=str(device),
            device_name=device_name(device),
            host=socket.gethostname(),
            python_version=sys.version.split()[0],
            torch_version=torch.__version__,
            **versions,
        )


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit on 64-bit


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
        mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):
        return None
    if not (mmap_ok and trim_ok):
        return None
    return "glibc malloc keeps freed blocks up to 32 MiB (mmap and trim thresholds raised)"
