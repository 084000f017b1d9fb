"""report.md and the plots of ``steer-fast reproduce`` from a synthetic results.json (format 2):
rates chosen on validation (not test) for every method, the seeds at the chosen rate with their
standard error beside the binomial one, LoReFT's position choice, the joint rows, the published
ListOps numbers, the claims, grids of unequal size and the validation curve."""

from __future__ import annotations

import math

import pytest

from steer_fast_bench.reproduce import report, summary

N = 400


def run(
    method: str,
    accuracy: float,
    *,
    seed: int | None = 0,
    rate=9e-4,
    validation: float | None = 0.5,
    task: str = "listops",
    curve: list[tuple[int, float]] | None = None,
) -> dict:
    correct = round(accuracy * N)
    record = {
        "task": task,
        "method": method,
        "seed": seed,
        "learning_rate": rate,
        "options": {},
        "trainable_percent": {"full": 100.0, "base": 0.0}.get(method, 0.2),
        "test": {"correct": correct, "total": N, "accuracy": correct / N},
        "train": None
        if rate is None
        else {
            "steps": 144,
            "losses": [2.0, 1.5, 1.2],
            "seconds_per_step": 4.0,
            "peak_memory_bytes": 3 * 2**30,
        },
        "seconds": 100.0,
    }
    if rate is not None and validation is not None:
        record["validation"] = {"accuracy": validation, "total": 200}
    if curve:
        record["validation_curve"] = [
            {"step": s, "accuracy": a, "stderr": math.sqrt(a * (1 - a) / 200), "total": 200}
            for s, a in curve
        ]
    return record


def results(*runs: dict) -> dict:
    return {
        "format": 2,
        "settings": {
            "model": "m",
            "batch_size": 8,
            "grad_accum": 2,
            "selection_seed": 0,
            "listops_max_tokens": 32,
            "train_size": 2304,
            "validation_size": 200,
        },
        "commands": ["steer-fast reproduce --protocol paper"],
        "model_parameters": 1000,
        "environment": {"versions": {"torch": "2"}, "machine": {"processor": "cpu"}},
        "tasks": {"listops": {"train": 2304, "validation": 200, "test": N}},
        "skipped": {},
        "runs": list(runs),
    }


SYNTHETIC = results(
    run("base", 0.10, seed=None, rate=None),
    # full: the best validation rate (2e-5) is not the best test rate (1e-4); seeds 1 and 2 at it.
    run("full", 0.50, rate=5e-6, validation=0.40),
    run("full", 0.52, rate=2e-5, validation=0.55),
    run("full", 0.70, rate=1e-4, validation=0.45),
    run("full", 0.56, seed=1, rate=2e-5),
    run("full", 0.54, seed=2, rate=2e-5),
    run("lora", 0.30, rate=3e-4, validation=0.30),
    run("lora", 0.25, rate=1.5e-3, validation=0.20),
    # LoReFT: f7+l7 swept; the last position, at f7+l7's best rate, wins on validation.
    run("loreft", 0.40, rate=5e-4, validation=0.35),
    run("loreft", 0.20, rate=2e-3, validation=0.30),
    run("loreft_last", 0.45, rate=5e-4, validation=0.40),
    run("steer_silu", 0.50, rate=2e-3, validation=0.5, curve=[(48, 0.3), (96, 0.49), (144, 0.5)]),
    run("steer_silu", 0.40, rate=5e-3, validation=0.4),
    run("joint_orth", 0.51, rate={"lora": 3e-4, "steering": 2e-3}),
    run("joint_orth", 0.49, rate=2e-4),
)


def test_accuracy_table_with_the_validation_choice_and_seeds():
    text = report.build_report(SYNTHETIC)
    assert "| method | learning rate | chosen by | seeds | test accuracy +- binomial SE |" in text
    # full: the validation choice (2e-5), its three seeds' mean 54.0, binomial SE 2.5.
    seeds = [0.52, 0.56, 0.54]
    seed_se = 100 * (sum((s - 0.54) ** 2 for s in seeds) / 2) ** 0.5 / math.sqrt(3)
    assert (
        f"| full | 2e-05 | validation-best of 3 | 0, 1, 2 | 54.0 +- 2.5 | {seed_se:.1f} |" in text
    )
    assert (
        "| steer_silu | 0.002 | validation-best of 2 | 0 | 50.0 +- 2.5 | 1 seed: not measured"
        in text
    )
    row = summary.reported(summary.summarize(SYNTHETIC)["listops"], "full")
    assert row.accuracy == pytest.approx(0.54) and row.seed_stderr == pytest.approx(seed_se / 100)
    assert row.stderr == pytest.approx(math.hypot(row.binomial_stderr, row.seed_stderr))


def test_loreft_position_and_joint_rows():
    rows = summary.summarize(SYNTHETIC)["listops"]
    reft = summary.reported(rows, "loreft")
    assert reft.method == "loreft_last" and reft.rate == 5e-4 and reft.how == "loreft's"
    assert not next(r for r in rows if r.method == "loreft").chosen
    joint = summary.reported(rows, "joint_orth")
    assert joint.rate == {"lora": 3e-4, "steering": 2e-3}
    text = report.build_report(SYNTHETIC)
    assert "| (loreft) | 0.0005 |" in text and "| loreft_last | 0.0005 | loreft's |" in text
    assert "| joint_orth | lora 0.0003 + steering 0.002 | LoRA at lora's, steering at" in text
    assert "| (joint_orth at 0.0002) | 0.0002 | the paper's joint rate |" in text


def test_differences_use_both_standard_errors_and_call_noise():
    text = report.build_report(SYNTHETIC)
    rows = summary.summarize(SYNTHETIC)["listops"]
    silu, full = summary.reported(rows, "steer_silu"), summary.reported(rows, "full")
    delta, se = summary.difference(silu, full)
    assert se == pytest.approx(math.hypot(silu.stderr, full.stderr))
    assert f"{100 * delta:+.1f} +- {100 * se:.1f} (noise)" in text
    assert "| lora | 0.0003 | validation-best of 2 | 0 | 30.0 +- 2.3 |" in text
    assert "-24.0 +- 3.6 |" in text  # lora - full: beyond noise, no marker
    assert "not ranked" in text


def test_published_listops_numbers_and_claims():
    text = report.build_report(SYNTHETIC)
    published = text.split("## ListOps beside the published numbers")[1].split("## The paper")[0]
    assert "| full | 54.0 +- 2.7 | - | 66.2 | - | 65.8 | - |" in published
    assert (
        "| loreft_last | 45.0 +- 2.5 |" in published
        and "| 64.1 | -2.1 | 55.7 | -10.1 |" in published
    )
    assert "| steer_identity | - | - | 65.5 | -0.7 | 65.3 | -0.5 |" in published
    claims = text.split("## The paper's claims, as measured here")[1].split("## What still")[0]
    assert "| post-block steering outperforms LoRA (abstract) | +0.0 / -1.7 |" in claims
    assert "steer_silu - lora: +20.0 +- 3.4 points: higher beyond noise: supports it" in claims
    assert "steer_silu - full: -4.0 +- 3.7 points: within noise" in claims
    assert "linear post-block steering outperforms ReFT" in claims and "listops: not run" in claims
    low = results(run("full", 0.6, rate=1e-5), run("steer_silu", 0.4))
    assert "lower beyond noise: contradicts the claim here" in report.build_report(low)
    differences = text.split("## What still differs from the paper's setup")[1]
    assert "144 optimizer steps of 8 x 2 (2304 examples seen)" in differences
    assert "Llama-3.2-1B and gemma-3-1b" in differences


def test_sweeps_of_unequal_size_are_reported():
    text = report.build_report(SYNTHETIC)
    sweeps = text.split("## Learning-rate sweeps")[1].split("## Validation")[0]
    assert (
        "| listops | full | 5e-06: 40.0 (50.0), 2e-05: 55.0 (52.0), 0.0001: 45.0 (70.0) |" in sweeps
    )
    assert "the sweeps differ in size (full 3, lora 2, loreft 2, steer_silu 2 rates)" in sweeps
    tie = [run("lora", 0.3, rate=1e-3, validation=0.5), run("lora", 0.4, rate=1e-4, validation=0.5)]
    assert summary.task_rows(results(*tie), "listops")[0].rate == 1e-4  # the smaller on a tie


def test_validation_curve_and_its_plateau():
    text = report.build_report(SYNTHETIC)
    assert (
        "| listops | steer_silu | 0 | 0.002 | 48: 30.0, 96: 49.0, 144: 50.0 | levelled off" in text
    )
    point = lambda s, a: {"step": s, "accuracy": a, "stderr": math.sqrt(a * (1 - a) / 200)}  # noqa: E731
    assert summary.plateau([point(48, 0.3), point(96, 0.35), point(144, 0.6)]).startswith(
        "not levelled off (still rising over steps 96-144"
    )
    assert summary.plateau([point(144, 0.5)]) == "too few points to tell"


def test_write_report_writes_markdown_and_png(tmp_path):
    files = report.write_report(SYNTHETIC, tmp_path)
    assert [f.name for f in files] == ["report.md", "accuracy.png", "loss.png"]
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files[1:])
    assert (tmp_path / "report.md").read_text().startswith("# steer-fast reproduce")


def test_noise_helpers():
    assert summary.is_noise(0.05, 0.03) and not summary.is_noise(0.07, 0.03)
    assert summary.noise_points(400) == pytest.approx(7.07, abs=0.01)
