"""The gather/grouped switch-point sweep (bench/dev/multi_adapter_switch.py) on tiny shapes: both
paths are checked against each other and timed, a wrong path is caught, and the switch point and
auto's wrong picks are read off the records as documented."""

import importlib.util
import sys
from pathlib import Path

import torch

from steer_fast.kernels import multi_adapter_steer as kernels
from steer_fast_bench.benchmark.timing import TimingPlan

from shared_setup import DEVICE

# A developer tool, not part of the installed package: loaded from the repository's bench/.
_PATH = Path(__file__).resolve().parents[1] / "dev" / "multi_adapter_switch.py"
_SPEC = importlib.util.spec_from_file_location("multi_adapter_switch", _PATH)
switch = sys.modules[_SPEC.name] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(switch)

ONE_REPEAT = TimingPlan(warmup=1, min_repeats=1, max_repeats=1, budget_s=0.01)


def test_cells_are_checked_and_timed():
    case_list = switch.cases([40], [5], [3], [1, 6], torch.float32)
    records = list(switch.run(case_list, DEVICE, ONE_REPEAT))
    assert [r["tokens"] for r in records] == [3, 18]
    for record in records:
        assert record["status"] == "ok", record
        assert record["gather_ms"] > 0 and record["grouped_ms"] > 0
        assert record["faster"] in ("gather", "grouped")
        assert record["auto"] == kernels.choose_path(record["tokens"], 4)


def test_every_adapter_gets_its_rows_and_slot_zero_none():
    case = switch.SwitchCase(24, 3, adapters=5, rows_per_adapter=4, dtype=torch.float32)
    index = switch.case_inputs(case, DEVICE)[6]
    assert torch.bincount(index.cpu(), minlength=6).tolist() == [0, 4, 4, 4, 4, 4]
    assert not torch.equal(index.cpu(), torch.sort(index.cpu()).values)  # shuffled


def test_a_wrong_path_is_reported_and_not_timed(monkeypatch):
    forward = kernels.multi_adapter_steer_forward

    def grouped_off_by_a_little(*args, path="auto", **kwargs):
        result = forward(*args, path=path, **kwargs)
        if path == "grouped":
            result.out.mul_(1.01)
        return result

    monkeypatch.setattr(kernels, "multi_adapter_steer_forward", grouped_off_by_a_little)
    case = switch.SwitchCase(40, 5, adapters=2, rows_per_adapter=3, dtype=torch.float32)
    record = switch.measure_case(case, DEVICE, ONE_REPEAT)
    assert record["status"].startswith("wrong")
    assert "gather_ms" not in record


def _record(m, gather_ms, grouped_ms, auto):
    return dict(
        hidden_size=64,
        rank=8,
        adapters=4,
        dtype="bfloat16",
        rows_per_adapter=m,
        tokens=4 * m,
        status="ok",
        gather_ms=gather_ms,
        grouped_ms=grouped_ms,
        auto=auto,
        gather_noisy=False,
        grouped_noisy=False,
        faster="grouped" if grouped_ms < gather_ms else "gather",
    )


def test_switch_point_is_where_grouped_wins_from_then_on():
    # Grouped wins once at m = 2 by chance, then for good from m = 16; auto switches at 32.
    records = [
        _record(1, 1.0, 2.0, "gather"),
        _record(2, 1.0, 0.9, "gather"),
        _record(8, 1.0, 1.1, "gather"),
        _record(16, 2.0, 1.5, "gather"),
        _record(32, 3.0, 2.0, "grouped"),
        _record(64, 5.0, 3.0, "grouped"),
    ]
    (row,) = switch.switch_points(records)
    assert row["switch_rows_per_adapter"] == 16
    assert row["auto_wrong"] == [2, 16]
    best = 1.0 + 0.9 + 1.0 + 1.5 + 2.0 + 3.0
    assert abs(row["auto_time_lost"] - (0.1 + 0.5) / best) < 1e-12


def test_no_switch_point_when_gather_wins_at_the_largest_count():
    records = [_record(1, 1.0, 2.0, "gather"), _record(64, 1.0, 1.2, "grouped")]
    (row,) = switch.switch_points(records)
    assert row["switch_rows_per_adapter"] is None
    assert row["auto_wrong"] == [64]
    assert "gather throughout" in switch.report(records, 32, "test")


def test_the_torch_paths_are_checked_and_timed():
    from steer_fast.ops import multi_adapter_steer_torch as multi_adapter_torch

    paths = switch.backend("torch")
    case_list = switch.cases([24], [4], [5], [1, 500], torch.float32)
    records = list(switch.run(case_list, DEVICE, ONE_REPEAT, paths))
    for record in records:
        assert record["status"] == "ok" and record["backend"] == "torch", record
        assert record["auto"] == multi_adapter_torch.choose_path(record["tokens"], 6, 4, 24)
    assert [r["auto"] for r in records] == ["gather", "grouped"]
