"""report.md and the plots of ``steer-fast reproduce`` from a synthetic results.json: the table's
columns, binomial standard errors, learning rates chosen on validation (not test), and the
wording of differences within the noise."""

from __future__ import annotations

import math

import pytest

from steer_fast_bench.reproduce import report

N = 400


def run(
    method: str,
    accuracy: float,
    *,
    seed: int | None = 0,
    rate: float | None = 9e-4,
    validation: float | None = None,
    task: str = "listops",
) -> dict:
    correct = round(accuracy * N)
    record = {
        "task": task,
        "method": method,
        "seed": seed,
        "learning_rate": rate,
        "trainable_percent": {"full": 100.0, "base": 0.0}.get(method, 0.2),
        "test": {"correct": correct, "total": N, "accuracy": correct / N},
        "train": None
        if rate is None
        else {
            "steps": 40,
            "losses": [2.0, 1.5, 1.2],
            "seconds_per_step": 4.0,
            "peak_memory_bytes": 3 * 2**30,
        },
        "seconds": 100.0,
    }
    if validation is not None:
        record["validation"] = {"accuracy": validation, "total": 100}
    return record


def results(*runs: dict) -> dict:
    return {
        "format": 1,
        "settings": {"model": "m", "batch_size": 8, "grad_accum": 2},
        "commands": ["steer-fast reproduce --tasks listops"],
        "model_parameters": 1000,
        "environment": {"versions": {"torch": "2"}, "machine": {"processor": "cpu"}},
        "tasks": {"listops": {"train": 640, "validation": 100, "test": N}},
        "skipped": {},
        "runs": list(runs),
    }


SYNTHETIC = results(
    run("base", 0.10, seed=None, rate=None),
    # full: the grid's best validation rate (3e-5) is not its best test rate (1e-4).
    run("full", 0.50, rate=1e-5, validation=0.40),
    run("full", 0.52, rate=3e-5, validation=0.55),
    run("full", 0.70, rate=1e-4, validation=0.45),
    run("lora", 0.30, rate=3e-4, validation=0.30),
    run("steer_silu", 0.50),
)


def test_accuracy_table_with_binomial_standard_errors():
    text = report.build_report(SYNTHETIC)
    assert "| method | trainable | listops |" in text
    se = 100 * math.sqrt(0.5 * 0.5 / N)  # 2.5 points
    assert f"| steer_silu | 0.2% | 50.0 +- {se:.1f} |" in text
    assert "| full | 100% | 52.0 +- 2.5 |" in text  # the validation choice, not the best test


def test_learning_rate_is_chosen_on_validation():
    summary = report.summarize(SYNTHETIC)["listops"]["full"]
    assert [r["learning_rate"] for r in summary.runs] == [3e-5]
    assert "seed 0: {1e-05: 40.0, 3e-05: 55.0, 0.0001: 45.0} -> 3e-05" in report.build_report(
        SYNTHETIC
    )
    tie = [run("lora", 0.3, rate=1e-3, validation=0.5), run("lora", 0.4, rate=1e-4, validation=0.5)]
    assert report.choose(tie)["learning_rate"] == 1e-4  # the smaller rate on a tie


def test_differences_within_two_standard_errors_are_called_noise():
    text = report.build_report(SYNTHETIC)
    # steer_silu - full = -2.0 points, SE of the difference sqrt(2.5^2 + 2.5^2) = 3.5: noise.
    assert "| steer_silu | -2.0 +- 3.5 (noise) |" in text
    # lora - full = -22 points: beyond noise, no marker.
    assert "| lora | -22.0 +- 3.4 |" in text
    assert "within 2 standard errors of the difference are noise" in text
    assert "about 7 points near 50% accuracy" in text  # 2 * sqrt(2 * 0.25 / 400)
    assert "not ranked" in text


def test_claims_are_shown_as_measured():
    text = report.build_report(SYNTHETIC)
    claims = text.split("## The paper's claims, as measured here")[1].split("## Cost")[0]
    assert "steer_silu - full: -2.0 +- 3.5 points: within noise" in claims
    assert "steer_silu - lora: +20.0 +- 3.4 points: higher beyond noise: as claimed" in claims
    assert "ReFT (LoReFT) | listops: not run" in claims
    low = results(run("full", 0.6, rate=1e-5), run("steer_silu", 0.4))
    assert "lower beyond noise: not reproduced here" in report.build_report(low)


def test_cost_columns_and_seeds():
    two_seeds = results(
        run("full", 0.5, rate=1e-5), run("full", 0.6, seed=1, rate=1e-5), run("steer_silu", 0.5)
    )
    text = report.build_report(two_seeds)
    assert "| task | method | s/step | peak memory | learning rate |" in text
    assert "| listops | full | 4.00 | 3.00 GiB | 1e-05 |" in text
    assert "| full | 100% | 55.0 +- 2.5 (seeds 50.0, 60.0) |" in text
    summary = report.summarize(two_seeds)["listops"]["full"]
    assert summary.accuracy == pytest.approx(0.55) and summary.n == N


def test_write_report_writes_markdown_and_png(tmp_path):
    files = report.write_report(SYNTHETIC, tmp_path)
    assert [f.name for f in files] == ["report.md", "accuracy.png", "loss.png"]
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files[1:])
    assert (tmp_path / "report.md").read_text().startswith("# steer-fast reproduce")


def test_noise_helpers():
    assert report.is_noise(0.05, 0.03) and not report.is_noise(0.07, 0.03)
    assert report.noise_points(400) == pytest.approx(7.07, abs=0.01)
