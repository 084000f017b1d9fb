"""The block-shape sweep (bench/dev/kernel_tuning.py, run by bench/dev/tune_kernels.py) on a tiny
shape: every candidate is checked against the launch heuristic's results and recorded; a wrong
result is caught."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from steer_fast.kernels import post_block_steer as kernels
from steer_fast_bench.benchmark.timing import TimingPlan

from shared_setup import DEVICE

# A developer tool, not part of the installed package: loaded from the repository's bench/.
_PATH = Path(__file__).resolve().parents[1] / "dev" / "kernel_tuning.py"
_SPEC = importlib.util.spec_from_file_location("kernel_tuning", _PATH)
kernel_tuning = sys.modules[_SPEC.name] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(kernel_tuning)

ONE_REPEAT = TimingPlan(warmup=1, min_repeats=1, max_repeats=1, budget_s=0.01)
SHAPE = kernel_tuning.TuningShape(tokens=45, hidden_size=40, rank=5, dtype=torch.float32)


@pytest.fixture(scope="module")
def records():
    return list(kernel_tuning.tune([SHAPE], DEVICE, ONE_REPEAT, quick=True))


def test_every_candidate_is_checked_and_timed(records):
    assert records[0]["kernel"] == "copy" and records[0]["gbps"] > 0
    tuned = records[1:]
    kinds = {record["kernel"] for record in tuned}
    assert kinds == {"forward", "backward rows", "backward cols"}
    for record in tuned:
        assert record["status"] == "ok", record
        assert record["ms"] > 0 and record["copy_fraction"] > 0
    # The heuristic's config is the first, marked, record of each kernel.
    for kind in kinds:
        assert [r["heuristic"] for r in tuned if r["kernel"] == kind][0] is True
    expected_forward = len(kernel_tuning.forward_candidates(SHAPE, quick=True)) + 1
    assert sum(r["kernel"] == "forward" for r in tuned) == expected_forward


def test_best_rows_pick_the_fastest_correct_candidate(records):
    for row in kernel_tuning.best_rows(records):
        group = [r for r in records[1:] if r["kernel"] == row["key"][-1]]
        assert row["best"]["ms"] == min(r["ms"] for r in group)
        assert row["heuristic"]["heuristic"]


def test_a_wrong_candidate_is_reported(monkeypatch):
    """A forward config whose results differ from the heuristic's is not timed."""
    plan_forward = kernels.plan_forward

    def off_by_a_little(*args, **kwargs):
        plan = plan_forward(*args, **kwargs)
        config = kwargs.get("config")
        if config is not None and config.block_m == 32:
            launch = plan.launches[0]

            def perturbed():
                launch()
                plan.result.out.mul_(1.01)

            plan.launches[0] = perturbed
        return plan

    monkeypatch.setattr(kernels, "plan_forward", off_by_a_little)
    rows = kernel_tuning.tune_shape(SHAPE, DEVICE, 1e9, ONE_REPEAT, quick=True)
    forward = [row for row in rows if row["kernel"] == "forward"]
    wrong = [row for row in forward if row["status"] == "wrong results"]
    assert wrong and all(row["config"]["block_m"] == 32 for row in wrong)
    assert all(row["status"] == "ok" for row in forward if row["config"]["block_m"] != 32)
