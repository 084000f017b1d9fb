"""Peak memory of one call, measured the same way for every method on a device.

peak = resident + peak increase during the call. Resident: the distinct storages the method
holds when the call starts (every parameter, buffer and ``.grad`` of its modules, the optimizer
state, the inputs). Peak increase: the largest amount allocated on top of what was allocated at
the start, through PyTorch's allocators (inside custom ops, Triton launches and autograd too):
on CUDA from ``torch.cuda.max_memory_allocated``, on the CPU the maximum running sum of the
allocations and frees that ``torch.profiler(profile_memory=True)`` records.

Counting the method's own resident tensors instead of everything allocated keeps the figure
right when other methods' models are alive at the same time (interleaved timing) and equals
``max_memory_allocated`` when the method is alone. Memory allocated outside PyTorch's allocators
(cuBLAS workspaces, oneDNN scratch space, Python objects) is not counted.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

_RESIDENT = (
    "the method's resident tensors at the start of the call (parameters, buffers, "
    "gradients, optimizer state, inputs) + the peak increase during the call"
)
# What a record's memory_measure says, by device type.
MEASURES = {
    "cpu": f"{_RESIDENT}, from the running sum of CPU allocator events recorded by "
    "torch.profiler(profile_memory=True)",
    "cuda": f"{_RESIDENT}, torch.cuda.max_memory_allocated (reset before the call) minus "
    "torch.cuda.memory_allocated at its start",
}


def measure_peak_memory(
    fn: Callable[[], Any], device: torch.device, resident: Iterable[Any] = ()
) -> int:
    """Run ``fn()`` once and return the peak bytes it held (see the module docstring)."""
    gc.collect()
    resident_bytes = resident_tensor_bytes(resident)
    if device.type != "cuda":
        return resident_bytes + peak_running_sum(cpu_allocator_events(fn))
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return resident_bytes + torch.cuda.max_memory_allocated(device) - start


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
        (e["ts"], e["args"]["Bytes"])
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type") == cpu
    ]


def peak_running_sum(events: Iterable[tuple[float, int]]) -> int:
    """Largest running total of (time, bytes) allocator events in time order; 0 when nothing
    stays allocated above the start."""
    in_order = sorted(events, key=lambda event: event[0])
    return max(itertools.accumulate((nbytes for _, nbytes in in_order), initial=0))


def resident_tensor_bytes(objects: Iterable[Any]) -> int:
    """Bytes of the distinct storages reachable from modules, optimizers and tensors."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _tensors(objects)
    }
    return sum(storages.values())


def _tensors(objects: Iterable[Any]) -> Iterator[torch.Tensor]:
    for obj in objects:
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, nn.Module):
            # nn.Module's own methods, module by module: wrappers such as pyvene's
            # IntervenableModel override named_parameters() to hide the frozen base weights.
            for module in obj.modules():
                for _, tensor in (
                    *nn.Module.named_parameters(module, recurse=False),
                    *nn.Module.named_buffers(module, recurse=False),
                ):
                    yield tensor
                    if tensor.grad is not None:
                        yield tensor.grad
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's start/stop lines, which its C++ side writes straight to fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def release_memory(device: torch.device) -> None:
    """Free what the last method left behind before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
