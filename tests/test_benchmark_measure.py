"""Timing and peak-memory measurement of the benchmark harness (on the CPU)."""

import pytest
import torch
from torch import nn

from steer_fast.benchmark.memory import (
    MEASURES,
    cpu_allocator_events,
    measure_peak_memory,
    peak_running_sum,
    resident_tensor_bytes,
)
from steer_fast.benchmark.timing import Call, TimingPlan, measure, measure_interleaved

CPU = torch.device("cpu")
MiB = 2**20


def test_measure_runs_warmups_then_planned_repeats():
    calls, prepared = [], []

    def setup():
        prepared.append(len(prepared))
        return prepared[-1]

    timing = measure(calls.append, CPU, TimingPlan(warmup=2, min_repeats=4, max_repeats=4),
                     setup=setup)
    assert calls == prepared == list(range(6))  # every timed call got its own fresh setup
    assert (timing.warmup, timing.repeats) == (2, 4)
    assert 0 <= timing.min_ms <= timing.median_ms <= timing.max_ms


def test_interleaved_rounds_rotate_and_isolate_a_failing_call():
    order = []

    def recorder(name):
        return lambda: order.append(name)

    def fails_on_third_call(counter=[0]):  # noqa: B006  (a call counter)
        counter[0] += 1
        if counter[0] == 3:
            raise RuntimeError("third call fails")

    plan = TimingPlan(warmup=1, min_repeats=3, max_repeats=3)
    results = measure_interleaved(
        {"a": Call(recorder("a")), "b": Call(recorder("b")), "c": Call(fails_on_third_call)},
        CPU, plan,
    )
    assert order[:2] == ["a", "b"]  # one warm-up each
    assert order[2:] == ["a", "b", "b", "a", "a", "b"]  # rounds start one further each time
    assert results["a"].repeats == results["b"].repeats == 3
    assert isinstance(results["c"], RuntimeError)
    with pytest.raises(RuntimeError, match="third call fails"):
        measure(lambda: fails_on_third_call([2]), CPU, plan)


def test_repeats_fill_the_budget_within_bounds():
    plan = TimingPlan(warmup=1, min_repeats=3, max_repeats=50, budget_s=1.0)
    assert plan.repeats_for(0.1) == 10
    assert plan.repeats_for(10.0) == 3
    assert plan.repeats_for(1e-6) == 50


@pytest.mark.parametrize(
    "kwargs", [dict(warmup=0), dict(min_repeats=0), dict(min_repeats=5, max_repeats=4),
               dict(budget_s=0.0)]
)
def test_timing_plan_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        TimingPlan(**kwargs)


def test_resident_bytes_count_each_storage_once():
    weights = torch.zeros(MiB // 4)  # 1 MiB
    module = nn.Linear(256, 256, bias=False)  # 256 KiB
    module.weight.grad = torch.zeros_like(module.weight)
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.ones(1, 256)).sum().backward()
    optimizer.step()  # two state tensors of 256 KiB and a step counter
    total = resident_tensor_bytes([weights, weights[10:], module, optimizer, None])
    assert total == MiB + 4 * 256 * 1024 + optimizer.state[module.weight]["step"].nbytes


def test_peak_running_sum_follows_allocations_and_frees():
    events = [(3, -50), (1, 100), (2, 30), (4, 200), (5, -280)]  # (time, bytes), out of order
    assert peak_running_sum(events) == 280
    assert peak_running_sum([]) == 0


def test_cpu_allocator_events_see_each_allocation_and_its_free():
    def step():
        temporary = torch.ones(4 * MiB // 4)  # 4 MiB, freed before the step returns
        return float(temporary.sum())

    events = cpu_allocator_events(step)
    sizes = [nbytes for _, nbytes in events]
    assert 4 * MiB in sizes and -4 * MiB in sizes
    assert all(isinstance(time, float | int) for time, _ in events)
    assert 4 * MiB <= peak_running_sum(events) < 5 * MiB


def test_cpu_peak_memory_sees_temporaries_and_the_resident_set():
    resident = torch.zeros(MiB // 4)

    def step():
        temporary = torch.ones(8 * MiB // 4)  # 8 MiB, freed before the step returns
        return float(temporary.sum())

    assert 9 * MiB <= measure_peak_memory(step, CPU, resident=[resident]) < 10 * MiB
    assert "torch.profiler" in MEASURES["cpu"]
