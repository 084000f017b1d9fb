"""steer-fast bench end to end on the tiny preset: files, records, every method, failures.

One quick run of all three suites (module-scoped) is shared by the checks on its outputs. The
timings themselves are never asserted: only that they were measured and recorded.
"""

import importlib.util
import json

import pytest
import torch
from torch import nn

from steer_fast.benchmark import (
    INFERENCE_METHODS,
    KERNEL_METHODS,
    PRESETS,
    RECORD_FIELDS,
    TRAINING_METHODS,
    BenchmarkSettings,
    Candidate,
    MethodUnavailable,
    run_benchmarks,
)
from steer_fast.benchmark.kernel_suite import PASSES
from steer_fast.cli import main

REQUIRED_FIELDS = (
    "suite", "method", "model", "device", "dtype", "batch", "seq_len", "rank", "ms", "ms_min",
    "ms_max", "tokens_per_s", "peak_mem_bytes", "trainable_params", "torch_version",
    "triton_version", "transformers_version", "status", "reason", "timestamp", "host",
    "device_name", "command",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    code = main(["bench", "--preset", "tiny", "--quick", "--warmup", "1", "--repeats", "2",
                 "--kernel-tokens", "64", "--kernel-hidden", "32", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    with open(out / "results.json", encoding="utf-8") as handle:
        rows = json.load(handle)
    return out, rows


def _rows(rows, suite, method=None):
    return [r for r in rows if r["suite"] == suite and (method is None or r["method"] == method)]


def test_run_writes_json_markdown_and_plots(tiny_run):
    out, rows = tiny_run
    assert isinstance(rows, list) and rows
    for name in ("training.png", "inference.png", "kernel.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    report = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("## Headline", "## Training step", "## Inference", "## Kernel",
                    "### forward", "### forward+backward"):
        assert heading in report
    for method in TRAINING_METHODS.values():
        assert method.label in report


def test_records_have_every_field(tiny_run):
    _, rows = tiny_run
    for row in rows:
        assert set(REQUIRED_FIELDS) <= set(row), sorted(set(REQUIRED_FIELDS) - set(row))
        assert set(row) == set(RECORD_FIELDS)
        assert row["torch_version"] == torch.__version__
        assert row["command"].startswith("steer-fast bench --preset tiny")
        if row["status"] == "ok":
            assert row["reason"] is None
            assert 0 < row["ms_min"] <= row["ms"] <= row["ms_max"], row
            assert row["method"] == "copy" or row["tokens_per_s"] > 0
        else:
            assert row["reason"], row
            assert row["ms"] is None


def test_every_method_has_rows(tiny_run):
    _, rows = tiny_run
    assert [r["method"] for r in _rows(rows, "training")] == list(TRAINING_METHODS)
    inference = {(r["method"], r["phase"]) for r in _rows(rows, "inference")}
    assert inference == {(m, p) for m in INFERENCE_METHODS for p in ("prefill", "decode")}
    kernel = {(r["method"], r["pass_"]) for r in _rows(rows, "kernel")}
    expected = {(m, p) for m in (*KERNEL_METHODS, "roofline") for p in PASSES}
    assert kernel == expected | {("copy", None)}


def test_model_rows_that_ran_measured_memory(tiny_run):
    _, rows = tiny_run
    for row in _rows(rows, "training") + _rows(rows, "inference"):
        if row["status"] == "ok":
            assert row["peak_mem_bytes"] > 0 and row["memory_measure"]


def test_steer_fast_rows_name_the_backend_they_ran(tiny_run):
    _, rows = tiny_run
    for row in _rows(rows, "training", "steer_fast_torch") + _rows(rows, "inference",
                                                                     "steer_fast_torch"):
        assert row["status"] == "ok" and row["backend"] == "torch", row
    fused = _rows(rows, "training", "steer_fast_fused") + _rows(rows, "inference",
                                                                 "steer_fast_fused")
    for row in fused + _rows(rows, "kernel", "steer_fast_fused"):
        if torch.cuda.is_available():
            assert row["status"] == "ok", row
        else:
            assert row["status"] == "skipped" and "CUDA" in row["reason"], row


def test_trainable_parameter_counts(tiny_run):
    _, rows = tiny_run
    sizes = PRESETS["tiny"].sizes
    d, layers, r = sizes["hidden_size"], sizes["num_hidden_layers"], PRESETS["tiny"].rank
    kv = d // sizes["num_attention_heads"] * sizes["num_key_value_heads"]
    counts = {r_["method"]: r_["trainable_params"] for r_ in _rows(rows, "training")
              if r_["status"] == "ok"}
    assert counts["steer_fast_torch"] == layers * 2 * d * r  # the published form: no biases
    assert counts["lora_qv"] == layers * (r * (d + d) + r * (d + kv))
    if importlib.util.find_spec("pyreft") is not None:
        assert counts["loreft"] == layers * (2 * d * r + r)
    else:  # the LoReFT row says why it did not run
        assert [row["status"] for row in _rows(rows, "training", "loreft")] == ["failed"]
    # Joint: the steering adapters plus LoRA on q, v, o (d -> d or kv) and down (ffn -> d).
    ffn = sizes["intermediate_size"]
    lora_qvod = r * (d + d) + r * (d + kv) + r * (d + d) + r * (ffn + d)
    assert counts["joint"] == counts["steer_fast_torch"] + layers * lora_qvod
    assert counts["floor"] == 0
    assert counts["full_ft"] > counts["lora_all"] > counts["lora_qv"]


def test_kernel_rows_carry_roofline_figures(tiny_run):
    _, rows = tiny_run
    copy = _rows(rows, "kernel", "copy")[0]
    assert copy["status"] == "ok" and copy["gbps"] > 0
    for row in _rows(rows, "kernel"):
        if row["status"] == "ok" and row["method"] != "copy":
            assert row["min_bytes"] > 0 and row["gbps"] > 0 and row["roofline_pct"] > 0
            assert row["tokens"] == 64 and row["hidden_size"] == 32


@pytest.fixture
def extra_training_methods():
    """Register throwaway methods for one test and remove them afterwards."""
    added = []

    def register(name, setup):
        TRAINING_METHODS.register(name, name.replace("_", " "))(setup)
        added.append(name)

    yield register
    for name in added:
        TRAINING_METHODS.pop(name)


def _run_training(tmp_path, methods, interleave):
    settings = BenchmarkSettings.create(preset="tiny", quick=True, suites=["training"],
                                        methods=methods, warmup=1, repeats=2,
                                        interleave=interleave, out=tmp_path / "out",
                                        plots=False)
    return {r.method: r for r in run_benchmarks(settings, progress=False).records}


@pytest.mark.parametrize("interleave", [True, False], ids=["interleaved", "one-by-one"])
def test_a_method_that_fails_gets_a_row_that_says_why(
    tmp_path, extra_training_methods, interleave
):
    def raises(ctx):
        raise RuntimeError("adapter could not be attached")

    def unavailable(ctx):
        raise MethodUnavailable("needs hardware this machine lacks")

    def detached_parameter(ctx):
        model = ctx.fresh_model()
        model.requires_grad_(False)
        norm = model.get_decoder().norm.weight.requires_grad_(True)
        stray = nn.Parameter(torch.zeros(3, device=ctx.device))  # never used by the forward
        return Candidate(module=model, forward=model, trainable=[norm, stray])

    extra_training_methods("raises_in_setup", raises)
    extra_training_methods("unavailable_here", unavailable)
    extra_training_methods("trains_nothing", detached_parameter)
    records = _run_training(
        tmp_path, ["raises_in_setup", "unavailable_here", "trains_nothing", "floor"], interleave
    )
    assert records["raises_in_setup"].status == "failed"
    assert records["raises_in_setup"].reason == "RuntimeError: adapter could not be attached"
    assert records["unavailable_here"].status == "skipped"
    assert records["unavailable_here"].reason == "needs hardware this machine lacks"
    assert records["trains_nothing"].status == "failed"
    assert "1 trainable tensors got no gradient" in records["trains_nothing"].reason
    assert records["floor"].status == "ok"  # the others failing does not stop the run
    saved = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert [(row["method"], row["status"]) for row in saved] == [
        ("floor", "ok"),
        ("raises_in_setup", "failed"),
        ("unavailable_here", "skipped"),
        ("trains_nothing", "failed"),
    ]
