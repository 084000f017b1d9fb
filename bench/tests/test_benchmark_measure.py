"""Timing, noise flagging, the machine check, progress and peak memory of the benchmark
harness (on the CPU)."""

import random

import pytest
import torch
from torch import nn

from steer_fast_bench.benchmark.machine import MachineCheck
from steer_fast_bench.benchmark.memory import (
    MEASURES,
    cpu_allocator_events,
    measure_peak_memory,
    peak_running_sum,
    resident_tensor_bytes,
)
from steer_fast_bench.benchmark.progress import Progress
from steer_fast_bench.benchmark.timing import (
    Call,
    Timing,
    TimingPlan,
    measure,
    measure_interleaved,
    spread_of,
)

CPU = torch.device("cpu")
MiB = 2**20


def test_measure_runs_warmups_then_planned_repeats():
    calls, prepared = [], []

    def setup():
        prepared.append(len(prepared))
        return prepared[-1]

    timing = measure(
        calls.append, CPU, TimingPlan(warmup=2, min_repeats=4, max_repeats=4), setup=setup
    )
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
        CPU,
        plan,
    )
    assert order[:2] == ["a", "b"]  # one warm-up each
    assert order[2:] == ["a", "b", "b", "a", "a", "b"]  # rounds start one further each time
    assert results["a"].repeats == results["b"].repeats == 3
    assert isinstance(results["c"], RuntimeError)
    with pytest.raises(RuntimeError, match="third call fails"):
        measure(lambda: fails_on_third_call([2]), CPU, plan)


def test_rounds_report_the_time_they_still_need():
    reported = []
    plan = TimingPlan(warmup=1, min_repeats=4, max_repeats=4)
    measure_interleaved(
        {"a": Call(lambda: None), "b": Call(lambda: None)}, CPU, plan, on_round=reported.append
    )
    assert len(reported) == 5  # before the first round, then after each of the four
    assert reported[-1] == 0.0 and all(seconds >= 0 for seconds in reported)


def _jitter(center, n, seed=0, relative=0.02):
    generator = random.Random(seed)
    return [center * generator.uniform(1 - relative, 1 + relative) for _ in range(n)]


def test_a_quiet_series_is_not_noisy():
    spread = spread_of(_jitter(101.3, 20))
    assert not spread.noisy and spread.noise_reason is None
    assert spread.iqr_ratio < 0.05 and spread.max_min_ratio < 1.05
    assert spread.p25_ms <= spread.p75_ms


def test_one_outlier_is_not_noise_but_shows_in_the_spread():
    spread = spread_of(_jitter(101.3, 19) + [310.0])
    assert not spread.noisy
    assert spread.max_min_ratio > 3


def test_a_bimodal_series_is_noisy():
    spread = spread_of(_jitter(101.3, 10, seed=1) + _jitter(203.7, 10, seed=2))
    assert spread.noisy and "IQR" in spread.noise_reason


def test_a_series_slowed_all_along_but_once_is_noisy():
    # Most repeats slowed by another process, one fast: the median is inflated, the IQR is not.
    spread = spread_of(_jitter(7192.0, 11, seed=3, relative=0.01) + [1639.0])
    assert spread.noisy and "fastest" in spread.noise_reason
    assert spread.iqr_ratio < 0.02


def test_recurring_outliers_are_noisy():
    spread = spread_of(_jitter(50.3, 16, seed=4) + [161.0, 158.2, 170.9])
    assert spread.noisy and "3 of 19 repeats" in spread.noise_reason


def test_repeats_on_scheduler_time_slices_are_noisy():
    # Time-sliced by a competing process: every repeat a multiple of 8 ms, mostly the same one.
    samples = [32.02, 31.97, 32.05, 40.01, 31.99, 32.03, 32.0, 39.98, 32.01, 31.96]
    spread = spread_of(samples)
    assert spread.noisy and spread.noise_reason == (
        "repeats on multiples of 8 ms (scheduler time slices)"
    )
    assert spread.iqr_ratio < 0.2  # no other rule fires
    # A quiet cell near a multiple, jittering by more than the tolerance, is not quantised.
    assert not spread_of(_jitter(32.0, 10, seed=5, relative=0.03)).noisy


def test_timing_records_its_spread_scaled_like_its_times():
    timing = Timing.of([10.0, 12.0, 11.0, 30.0, 10.5], warmup=1)
    fields = timing.record_fields(0.5)
    assert fields["ms"] == 5.5 and fields["ms_min"] == 5.0 and fields["ms_max"] == 15.0
    assert fields["ms_p25"] == 5.25 and fields["ms_p75"] == 6.0
    assert fields["iqr_ratio"] == pytest.approx(1.5 / 11) and fields["max_min_ratio"] == 3.0
    assert fields["noisy"] is False and fields["noise_reason"] is None
    with pytest.raises(ValueError):
        spread_of([])


def test_machine_check_warns_on_load_and_drift():
    quiet = MachineCheck(2, 0.3, (100.0, 104.0), 1.1, (103.0, 101.0))
    assert quiet.warnings() == []
    assert "0.30 / 1.10" in quiet.note()
    busy = MachineCheck(2, 2.5, (100.0, 104.0))
    assert ["load average was 2.50 on 2 cores" in w for w in busy.warnings()] == [True]
    drifting = MachineCheck(2, 0.1, (100.0, 101.0), 0.5, (130.0, 131.0))
    assert ["31% apart" in w for w in drifting.warnings()] == [True]


def test_machine_check_times_its_loop_twice():
    check = MachineCheck.start(CPU)
    check.finish(CPU)
    assert len(check.calibration_before) == len(check.calibration_after) == 2
    assert min(check.calibration_before) > 0 and check.flops_per_s(CPU) > 0


def test_progress_counts_measured_time_left():
    progress = Progress({"training": 100.0, "kernel": 50.0}, show=False)
    progress.start_suite("training")
    assert 149 < progress.left_s() <= 150
    progress.timing_left(400.0)  # the timing block measured: it needs far longer
    assert 449 < progress.left_s() <= 450
    progress.describe("peak memory")  # the block is over: back to the estimate
    assert progress.left_s() <= 150
    progress.start_suite("kernel")
    progress.suite_started -= 10.0  # as if 10 s had passed in the kernel suite
    progress.part_done(0.25)
    assert progress.left_s() == pytest.approx(30, abs=0.5)  # 3 quarters at the measured pace


def test_repeats_fill_the_budget_within_bounds():
    plan = TimingPlan(warmup=1, min_repeats=3, max_repeats=50, budget_s=1.0)
    assert plan.repeats_for(0.1) == 10
    assert plan.repeats_for(10.0) == 3
    assert plan.repeats_for(1e-6) == 50


@pytest.mark.parametrize(
    "kwargs",
    [dict(warmup=0), dict(min_repeats=0), dict(min_repeats=5, max_repeats=4), dict(budget_s=0.0)],
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
