"""steer-fast bench --suites mixed: many adapters in one batch, on the tiny preset.

One quick run (module-scoped, A in {1, 4}, both spreads) is shared by the checks on its
outputs; the timings themselves are never asserted, only that they were measured. Then: the
correctness check fails a method whose mixed batch is routed wrongly, bad options fail before
anything runs, and the report's sentences and the plot render from made-up records.
"""

import dataclasses
import json
import math

import pytest
import torch

from steer_fast_bench.benchmark import (
    MIXED_METHODS,
    BenchmarkRecord,
    BenchmarkSettings,
    load_records,
)
from steer_fast_bench.benchmark import mixed_methods as mixed
from steer_fast_bench.benchmark.mixed_suite import batch_shape, cases, estimate_s
from steer_fast_bench.benchmark.plots import write_plots
from steer_fast_bench.benchmark.records import RunContext
from steer_fast_bench.benchmark.report import render_report
from steer_fast_bench.benchmark.runner import describe_run, run_benchmarks
from steer_fast_bench.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CASES = [(1, "even"), (4, "even"), (4, "skewed")]  # skewed at A = 1 is the even spread
INFERENCE = [m for m in MIXED_METHODS if not m.endswith("_train")]
TRAINING = [m for m in MIXED_METHODS if m.endswith("_train")]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "mixed"
    code = main(
        [
            "bench",
            "--suites",
            "mixed",
            "--preset",
            "tiny",
            "--quick",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--adapters",
            "1,4",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    rows = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return out, rows


def test_every_method_has_measured_rows_per_phase_count_and_spread(mixed_run):
    _, rows = mixed_run
    assert {r["suite"] for r in rows} == {"mixed"}
    expected = {
        (m, phase, count, spread)
        for count, spread in CASES
        for m, phases in ((m, ("prefill", "decode")) for m in INFERENCE)
        for phase in phases
    }
    expected |= {(m, "train", count, spread) for count, spread in CASES for m in TRAINING}
    assert {(r["method"], r["phase"], r["adapters"], r["spread"]) for r in rows} == expected
    assert len(rows) == len(expected)
    for row in rows:
        assert row["status"] == "ok", row
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0, row
        assert row["peak_mem_bytes"] > 0 and row["memory_measure"], row
        assert 0 < row["ms_min"] <= row["ms"] <= row["ms_max"], row
        assert (row["batch"], row["seq_len"]) == (4, 8)  # B = max(2, 4) rows, 2 x 16 / 4 tokens
        assert isinstance(row["noisy"], bool)
    steer = [r for r in rows if r["method"].startswith("steer")]
    assert all(r["backend"] == "torch" for r in steer)
    # The adapters' parameters: A x layers x (D + U), d = 64, r = 4, 2 layers; LoRA q, v.
    for r in rows:
        if r["method"] in ("steer_mixed", "steer_mixed_train"):
            assert r["trainable_params"] == r["adapters"] * 2 * 2 * 64 * 4
        if r["method"] == "base":
            assert r["trainable_params"] == 0


def test_the_run_writes_the_report_section_and_the_plot(mixed_run):
    out, rows = mixed_run
    assert (out / "mixed.png").read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.md").read_text(encoding="utf-8")
    for heading in (
        "## Mixed batches: many adapters, one batch",
        "### Mixed: prefill of the B x T prompt, tokens/s",
        "### Mixed: KV-cache decode, tokens/s",
        "### Mixed: training step",
        "### Mixed: peak memory",
    ):
        assert heading in report, heading
    assert "## Training step" not in report and "## Kernel" not in report
    assert "- A = 4, skewed: steer_fast mixed batch reaches " in report
    assert "the tokens/s of PEFT LoRA mixed batch" in report
    assert "- A = 4, even: steer_fast mixed-batch training reaches " in report
    assert "- Mixed: B = max(batch 2, largest A 4) = 4 rows of T" in report
    assert "PEFT's default target modules for llama: q_proj, v_proj" in report
    records = load_records(out / "results.json")
    assert {(r.adapters, r.spread) for r in records} == set(CASES)
    assert render_report(records).count("### Mixed:") == 4


def test_describe_run_says_what_the_mixed_suite_runs(tmp_path):
    settings = BenchmarkSettings.create(
        preset="tiny", suites=["mixed"], adapters=[4, 1, 4], out=tmp_path / "o", plots=False
    )
    assert settings.adapters == (1, 4) and settings.spreads == ("even", "skewed")
    assert "mixed: A in {1, 4} x even, skewed spread, 4 rows x 8 tokens, 7 methods" in (
        describe_run(settings)
    )
    # The estimate comes from a probe of this machine's speed: positive and finite, whatever
    # the machine's load (a bound in seconds would be a timed assertion).
    estimate = estimate_s(RunContext(settings, {}))
    assert 0 < estimate and math.isfinite(estimate)


def test_rows_spread_evenly_or_skewed():
    assert mixed.row_adapters(8, 4, "even") == [0, 1, 2, 3, 0, 1, 2, 3]
    assert mixed.row_adapters(8, 4, "skewed") == [0, 1, 0, 2, 0, 3, 0, 1]
    assert mixed.row_adapters(4, 1, "skewed") == [0, 0, 0, 0]
    assert mixed.adapter_names(3) == ["default", "a1", "a2"]


def test_defaults_and_shapes(tmp_path):
    default = BenchmarkSettings.create(
        preset="cpu-small", device="cpu", out=tmp_path / "o", plots=False
    )
    assert "mixed" not in default.suites  # the default run stays as it was
    assert default.adapters == (1, 4, 16, 64) and default.spreads == ("even", "skewed")
    assert batch_shape(default) == (64, 16)  # 4 x 256 prompt tokens as 64 rows
    quick = BenchmarkSettings.create(
        preset="cpu-small",
        device="cpu",
        quick=True,
        out=tmp_path / "o",
        plots=False,
        spread=["skewed"],
    )
    assert quick.adapters == (1, 4) and batch_shape(quick) == (4, 256)
    assert cases(quick) == [(1, "skewed"), (4, "skewed")]  # skewed alone runs at A = 1 too
    assert cases(default)[:3] == [(1, "even"), (4, "even"), (4, "skewed")]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--adapters", "0"], "adapters must be an integer >= 1, got 0"),
        (["--adapters", "x"], "adapters must be an integer >= 1, got 'x'"),
        (["--adapters", "4,-1"], "adapters must be an integer >= 1, got -1"),
        (
            ["--spread", "lopsided"],
            "spread must be drawn from ['even', 'skewed']; unknown: ['lopsided']",
        ),
        (["--suites", "mixed,speed"], "suites must be drawn from"),
    ],
)
def test_bad_mixed_options_fail_before_anything_runs(tmp_path, capsys, options, message):
    out = tmp_path / "run"
    assert (
        main(["bench", "--preset", "tiny", "--suites", "mixed", "--out", str(out), *options]) == 2
    )
    assert message in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match="adapters"):
        BenchmarkSettings.create(adapters=[], out=tmp_path / "o")


def test_list_names_the_mixed_methods(capsys):
    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "mixed methods:" in listed
    for name in MIXED_METHODS:
        assert f"  {name} " in listed


@pytest.fixture
def wrong_methods():
    """Two throwaway methods that route every row to the next row's adapter."""

    def shifted(setup):
        return setup.row_names[1:] + setup.row_names[:1]

    added = {
        "steer_mixed_shifted": lambda s: mixed.steer_mixed(s, row_names=shifted(s)),
        "steer_mixed_shifted_train": lambda s: mixed.steer_mixed_train(s, row_names=shifted(s)),
    }
    for name, setup in added.items():
        MIXED_METHODS.register(name, name.replace("_", " "))(setup)
    yield list(added)
    for name in added:
        MIXED_METHODS.pop(name)


def test_a_mixed_batch_whose_outputs_differ_fails(tmp_path, wrong_methods):
    settings = BenchmarkSettings.create(
        preset="tiny",
        quick=True,
        suites=["mixed"],
        adapters=[4],
        spread=["even"],
        methods=["steer_mixed", *wrong_methods],
        warmup=1,
        repeats=1,
        out=tmp_path / "o",
        plots=False,
    )
    records = run_benchmarks(settings, progress=False).records
    status = {(r.method, r.phase): (r.status, r.reason) for r in records}
    assert status["steer_mixed", "prefill"] == ("ok", None)
    for phase in ("prefill", "decode"):
        state, reason = status["steer_mixed_shifted", phase]
        assert state == "failed"
        assert "logits differ from each adapter run alone on its rows" in reason
    state, reason = status["steer_mixed_shifted_train", "train"]
    assert state == "failed" and "gradients differ from training each adapter" in reason


def test_adapters_that_act_as_the_identity_fail_the_check():
    logits = [torch.ones(2, 3, 5)]
    with pytest.raises(RuntimeError, match="act as the identity"):
        mixed.check_steers("m", logits, [t.clone() for t in logits], torch.float32)
    mixed.check_steers("m", [t + 1 for t in logits], logits, torch.float32)
    with pytest.raises(RuntimeError, match="max \\|difference\\|"):
        mixed.check_same("m", [t + 0.01 for t in logits], logits, torch.float32)


def _record(method, label, tokens_per_s, phase, adapters, spread, **fields):
    ms = 1000.0 / tokens_per_s if tokens_per_s else None
    return BenchmarkRecord(
        suite="mixed",
        method=method,
        label=label,
        model="m",
        device="cpu",
        device_name="CPU",
        dtype="float32",
        batch=64,
        seq_len=16,
        rank=4,
        activation="silu",
        ms=ms,
        ms_min=ms,
        ms_max=ms,
        ms_p25=ms,
        ms_p75=ms,
        noisy=False,
        tokens_per_s=tokens_per_s,
        phase=phase,
        adapters=adapters,
        spread=spread,
        peak_mem_bytes=2**20,
        **fields,
    )


def _made_up_records():
    rows = []
    for count, spread in ((1, "even"), (16, "even"), (16, "skewed")):
        for phase in ("prefill", "decode"):
            rows += [
                _record("base", "base", 4000.0, phase, count, spread),
                _record("steer_single", "single", 3000.0, phase, count, spread),
                _record("steer_mixed", "mixed", 2000.0, phase, count, spread),
                _record("steer_separate", "separate", 500.0, phase, count, spread),
                _record("peft_lora_mixed", "PEFT mixed", 1000.0, phase, count, spread),
            ]
        rows += [
            _record("steer_mixed_train", "mixed training", 900.0, "train", count, spread),
            _record("steer_separate_train", "one at a time", 300.0, "train", count, spread),
        ]
    rows[7] = dataclasses.replace(rows[7], noisy=True, noise_reason="IQR 40% of the median")
    rows[9] = _record(
        "peft_lora_mixed",
        "PEFT mixed",
        None,
        "decode",
        1,
        "even",
        status="failed",
        reason="RuntimeError: no adapters",
    )
    return rows


def test_report_compares_mixed_batches_in_one_sentence_each():
    report = render_report(_made_up_records())
    lines = report.splitlines()
    assert (
        "- A = 16, even: mixed reaches 2.00x the tokens/s of PEFT mixed, 4.00x that of "
        "separate and 0.67x that of single (2k vs 1k, 500 and 3k tokens/s)."
    ) in lines
    assert (
        "- A = 1, even: mixed reaches 4.00x the tokens/s of separate and 0.67x that of "
        "single (2k vs 500 and 3k tokens/s); but mixed is noisy, so these ratios are not "
        "reliable; PEFT mixed not measured here (failed: RuntimeError: no adapters)."
    ) in lines
    assert (
        "- A = 16, skewed: mixed training reaches 3.00x the tokens/s of one at a time (900 "
        "vs 300 tokens/s)."
    ) in lines
    assert ("| 16 | even | 4k | 3k | 2k | 500 | 1k | 2.00x | 4.00x | 0.67x |") in lines
    assert "| 1 | even | 4k | 3k | 2k (noisy) | 500 | failed | - | 4.00x | 0.67x |" in lines
    assert "> **Warning:** 1 of 35 timing cells are noisy (1 mixed)" in report


def test_plot_draws_tokens_per_second_against_the_adapter_count(tmp_path):
    files = write_plots(_made_up_records(), tmp_path)
    assert [f.name for f in files] == ["mixed.png"]
    assert files[0].read_bytes()[:8] == PNG_MAGIC
