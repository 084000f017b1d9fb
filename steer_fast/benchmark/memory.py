"""Peak memory of one call, measured the same way for every method on a device.

peak = resident + peak increase during the call.

resident: the bytes of the tensors the method holds when the call starts, found by walking the
objects given as ``resident`` (every parameter, buffer and ``.grad`` of the modules, every tensor
in the optimizers' state, the input tensors), each storage counted once.

peak increase: the largest amount allocated on top of what was allocated when the call started.
On CUDA it is ``torch.cuda.max_memory_allocated`` (reset just before) minus
``torch.cuda.memory_allocated`` at the start: every byte the caching allocator handed out to
tensors, inside custom ops and Triton launches included. On the CPU it is rebuilt from PyTorch's
own allocator: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free
made through the CPU allocator (inside custom ops and autograd too) with a timestamp, and the
maximum of their running sum is the peak increase.

Counting the method's own resident tensors instead of everything allocated keeps the figure
right when other methods' models are alive at the same time (interleaved timing) and equals
``max_memory_allocated`` when the method is alone. Memory that libraries allocate outside
PyTorch's allocators (cuBLAS workspaces, oneDNN scratch space, Python objects) is not counted.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

_RESIDENT = (
    "the method's resident tensors at the start of the call (parameters, buffers, gradients, "
    "optimizer state, inputs) + the peak increase during the call"
)
CPU_MEASURE = (
    f"{_RESIDENT}, from the running sum of CPU allocator events recorded by "
    "torch.profiler(profile_memory=True)"
)
CUDA_MEASURE = (
    f"{_RESIDENT}, torch.cuda.max_memory_allocated (reset before the call) minus "
    "torch.cuda.memory_allocated at its start"
)


@dataclass(frozen=True)
class PeakMemory:
    """Peak bytes of one call and how they were measured."""

    peak_bytes: int
    measure: str


def memory_measure_name(device: torch.device) -> str:
    return CUDA_MEASURE if device.type == "cuda" else CPU_MEASURE


def measure_peak_memory(
    fn: Callable[[], Any], device: torch.device, resident: Iterable[Any] = ()
) -> PeakMemory:
    """Run ``fn()`` once and return the peak bytes it held (see the module docstring)."""
    gc.collect()
    resident_bytes = resident_tensor_bytes(resident)
    if device.type != "cuda":
        increase = peak_running_sum(cpu_allocator_events(fn))
        return PeakMemory(resident_bytes + increase, CPU_MEASURE)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    increase = torch.cuda.max_memory_allocated(device) - start
    return PeakMemory(resident_bytes + increase, CUDA_MEASURE)


def cpu_allocator_events(fn: Callable[[], Any]) -> list[tuple[float, int]]:
    """Run ``fn()`` under ``torch.profiler`` and return its CPU allocator events.

    Each event is (time in microseconds, bytes): positive bytes allocate, negative ones free.
    They are read from the profiler's Chrome trace (``export_chrome_trace``), whose "[memory]"
    events carry the bytes and the device of every allocation and free.
    """
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
            fn()
        p.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text(encoding="utf-8"))["traceEvents"]
    cpu = int(DeviceType.CPU)
    return [
        (event["ts"], event["args"]["Bytes"])
        for event in events
        if event.get("name") == "[memory]" and event["args"].get("Device Type") == cpu
    ]


def peak_running_sum(events: Iterable[tuple[float, int]]) -> int:
    """Largest running total of (time, bytes) allocator events, in time order (bytes > 0
    allocate, < 0 free); 0 when nothing stays allocated above the start."""
    total = peak = 0
    for _, nbytes in sorted(events, key=lambda event: event[0]):
        total += nbytes
        peak = max(peak, total)
    return peak


def resident_tensor_bytes(objects: Iterable[Any]) -> int:
    """Bytes of the distinct storages reachable from modules, optimizers and tensors."""
    seen: dict[int, int] = {}
    for tensor in _tensors(objects):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _tensors(objects: Iterable[Any]) -> Iterator[torch.Tensor]:
    for obj in objects:
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, nn.Module):
            # nn.Module's own methods, module by module: wrappers such as pyvene's
            # IntervenableModel override named_parameters() to hide the frozen base weights.
            for module in obj.modules():
                own = (
                    *nn.Module.named_parameters(module, recurse=False),
                    *nn.Module.named_buffers(module, recurse=False),
                )
                for _, tensor in own:
                    yield tensor
                    if tensor.grad is not None:
                        yield tensor.grad
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))
        elif isinstance(obj, (dict, list, tuple)):
            yield from _tensors(obj.values() if isinstance(obj, dict) else obj)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's start/stop lines, which its C++ side writes straight to fd 2."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
