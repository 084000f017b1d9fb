"""steer-fast bench end to end on the tiny preset: files, records, every method, failures.

One quick run of all three suites (module-scoped) is shared by the checks on its outputs. The
timings themselves are never asserted: only that they were measured and recorded.
"""

import dataclasses
import importlib.util
import json
import warnings

import pytest
import torch
from torch import nn

from steer_fast_bench.benchmark import (
    INFERENCE_METHODS,
    KERNEL_METHODS,
    PRESETS,
    RECORD_FIELDS,
    TRAINING_METHODS,
    BenchmarkRecord,
    BenchmarkSettings,
    Candidate,
    MethodContext,
    MethodUnavailable,
    load_records,
    run_benchmarks,
)
from steer_fast_bench.benchmark.kernel_suite import PASSES
from steer_fast_bench.benchmark.model_suite import prepare_generation
from steer_fast_bench.benchmark.models import build_spec, make_tokens
from steer_fast_bench.benchmark.plots import write_plots
from steer_fast_bench.benchmark.records import RunContext
from steer_fast_bench.benchmark.report import render_report
from steer_fast_bench.cli import main

REQUIRED_FIELDS = (
    "suite",
    "method",
    "model",
    "device",
    "dtype",
    "batch",
    "seq_len",
    "rank",
    "ms",
    "ms_min",
    "ms_max",
    "tokens_per_s",
    "peak_mem_bytes",
    "trainable_params",
    "torch_version",
    "triton_version",
    "transformers_version",
    "status",
    "reason",
    "timestamp",
    "host",
    "device_name",
    "command",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    code = main(
        [
            "bench",
            "--preset",
            "tiny",
            "--quick",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--kernel-tokens",
            "64",
            "--kernel-hidden",
            "32",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
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
    for heading in (
        "## Headline",
        "## Training step",
        "## Inference",
        "## Kernel",
        "### forward",
        "### forward+backward",
    ):
        assert heading in report
    for method in TRAINING_METHODS.values():
        assert method.label in report
    # A --quick run says first that its few repeats cannot rank methods a few percent apart,
    # and which activation it steered with.
    assert report.index("this is a --quick run") < report.index("## Headline")
    assert "Steering activation: silu (SteerConfig()'s default" in report


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
    for row in _rows(rows, "training", "steer_fast_torch") + _rows(
        rows, "inference", "steer_fast_torch"
    ):
        assert row["status"] == "ok" and row["backend"] == "torch", row
    fused = _rows(rows, "training", "steer_fast_fused") + _rows(
        rows, "inference", "steer_fast_fused"
    )
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
    counts = {
        r_["method"]: r_["trainable_params"]
        for r_ in _rows(rows, "training")
        if r_["status"] == "ok"
    }
    assert counts["steer_fast_torch"] == layers * 2 * d * r  # the published form: no biases
    assert counts["hooks_eager"] == counts["steer_fast_torch"]
    assert counts["lora_qv"] == layers * (r * (d + d) + r * (d + kv))
    if importlib.util.find_spec("pyreft") is not None:
        assert counts["loreft"] == layers * (2 * d * r + r)
    else:  # the LoReFT row says why it did not run
        assert [row["status"] for row in _rows(rows, "training", "loreft")] == ["failed"]
    # Joint: the steering adapters plus LoRA on q, k, v, o (d -> d or kv), gate and up
    # (d -> ffn) and down (ffn -> d): baselines.JOINT_LORA_TARGETS.
    ffn = sizes["intermediate_size"]
    attention = r * (d + d) + 2 * r * (d + kv) + r * (d + d)
    mlp = 3 * r * (d + ffn)
    assert counts["joint"] == counts["steer_fast_torch"] + layers * (attention + mlp)
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


def _tiny_context(activation="silu"):
    return MethodContext(build_spec(PRESETS["tiny"]), torch.device("cpu"), 4, activation, 0)


@pytest.mark.parametrize("activation", ["identity", "silu"])
def test_forward_hooks_match_steer_fast_exactly(activation):
    ctx = _tiny_context(activation)
    steer = TRAINING_METHODS["steer_fast_torch"].setup(ctx)
    hooks = TRAINING_METHODS["hooks_eager"].setup(ctx)
    assert len(hooks.trainable) == len(steer.trainable) == 2 * 2  # D and U on both layers
    for a, b in zip(steer.trainable, hooks.trainable, strict=True):
        assert torch.equal(a, b)  # the same weights, from the same seed
    # U starts at zero (the output is the base model's): give both the same non-zero weights.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a, b in zip(steer.trainable, hooks.trainable):
            b.copy_(a.copy_(0.3 * torch.randn(a.shape, generator=generator)))
    tokens = make_tokens(ctx.spec, 2, 16, ctx.device, 0)
    out_steer = steer.forward(input_ids=tokens, labels=tokens)
    out_hooks = hooks.forward(input_ids=tokens, labels=tokens)
    assert torch.equal(out_steer.logits, out_hooks.logits)
    out_steer.loss.backward()
    out_hooks.loss.backward()
    for a, b in zip(steer.trainable, hooks.trainable):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    frozen = [p for p in hooks.module.parameters() if not p.requires_grad]
    assert frozen and all(not p.requires_grad for p in hooks.module["model"].parameters())


def test_decoding_raises_no_deprecation_warning(tmp_path):
    settings = BenchmarkSettings.create(preset="tiny", quick=True, out=tmp_path / "o", plots=False)
    ctx = RunContext(settings, {})
    for method in ("base", "steer_fast_torch", "hooks_eager", "lora_unmerged"):
        candidate = INFERENCE_METHODS[method].setup(_tiny_context())
        prompt = make_tokens(settings.spec, 2, 8, settings.device, 0)
        phases, _ = prepare_generation(ctx, candidate, prompt)
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            phases[1].call.once()


def _record(method, label, ms, suite="training", **fields):
    return BenchmarkRecord(
        suite=suite,
        method=method,
        label=label,
        model="m",
        device="cpu",
        device_name="CPU",
        dtype="float32",
        batch=1,
        seq_len=8,
        rank=4,
        activation="silu",
        ms=ms,
        ms_min=ms,
        ms_max=ms,
        ms_p25=ms,
        ms_p75=ms,
        noisy=False,
        **fields,
    )


def _noisy(record, reason="IQR 45% of the median"):
    return dataclasses.replace(record, noisy=True, noise_reason=reason, ms_p75=record.ms * 1.5)


def test_report_opens_with_warnings_and_says_the_result():
    records = [
        _record(
            "steer_fast_fused",
            "fused",
            None,
            status="skipped",
            reason="the fused Triton kernels need CUDA; on the CPU ...",
        ),
        _record("steer_fast_torch", "steer_fast torch path", 2073.0),
        _record("hooks_eager", "forward hooks", 2027.0),
        _noisy(_record("lora_qv", "PEFT LoRA q,v", 3000.0)),
        _record("floor", "floor", 2500.0),
    ]
    report = render_report(records, ["- a note"], warnings=["the load average was 3.1"])
    lines = report.splitlines()
    assert lines[2] == "> **Warning:** the machine was busy: the load average was 3.1."
    assert lines[4].startswith("> **Warning:** 1 of 4 timing cells are noisy (1 training)")
    assert lines.index("- a note") > 4
    assert (
        "- steer_fast torch path takes 1.02x the time of forward hooks per training step "
        "(2073 vs 2027 ms): on par."
    ) in lines
    assert (
        "- steer_fast torch path takes 0.69x the time of PEFT LoRA q,v per training step "
        "(2073 vs 3000 ms): 31% faster; but PEFT LoRA q,v is noisy, so this comparison is "
        "not reliable."
    ) in lines
    assert "- steer_fast torch path takes 0.83x the time of floor per training step" in report
    assert "- fused did not run here (skipped: the fused Triton kernels need CUDA)" in report
    assert "| fused | skipped: the fused Triton kernels need CUDA | -" in report
    assert "| PEFT LoRA q,v | 3000 (noisy) |" in report
    assert "noisy: IQR 45% of the median" in report
    quiet = render_report([_record("floor", "floor", 10.0)])
    assert "Warning" not in quiet


def test_plots_mark_noise_and_name_every_kernel_point(tmp_path):
    kernel = [
        _record(
            method,
            label,
            ms,
            suite="kernel",
            pass_=pass_,
            tokens=64,
            hidden_size=32,
            residual=False,
            roofline_pct=50.0 / ms,
            min_bytes=1000,
        )
        for method, label in (("steer_fast_torch", "torch path"), ("eager", "eager"))
        for pass_, ms in (("forward", 0.5), ("forward+backward", 1.5))
    ]
    kernel.append(
        _record(
            "steer_fast_fused",
            "fused",
            None,
            suite="kernel",
            pass_="forward",
            tokens=64,
            hidden_size=32,
            residual=False,
            status="skipped",
            reason="needs CUDA",
        )
    )
    training = [
        _record("floor", "floor", 12.0, peak_mem_bytes=2**20),
        _noisy(_record("lora_qv", "LoRA", 14.0, peak_mem_bytes=2**20)),
        _record("fused", "fused", None, status="skipped", reason="needs CUDA"),
    ]
    kernel[0] = _noisy(kernel[0])
    files = write_plots(training + kernel, tmp_path)
    assert [f.name for f in files] == ["training.png", "kernel.png"]
    assert all(f.read_bytes()[:8] == PNG_MAGIC for f in files)


def test_saved_records_keep_the_spread(tiny_run):
    out, rows = tiny_run
    timed = [r for r in rows if r["status"] == "ok" and r["method"] not in ("roofline",)]
    for row in timed:
        assert row["ms_min"] <= row["ms_p25"] <= row["ms"] <= row["ms_p75"] <= row["ms_max"]
        assert row["iqr_ratio"] >= 0 and row["max_min_ratio"] >= 1
        assert isinstance(row["noisy"], bool)
        assert (row["noise_reason"] is None) != row["noisy"]
    records = load_records(out / "results.json")
    assert render_report(records).startswith("# steer_fast benchmarks")


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
    settings = BenchmarkSettings.create(
        preset="tiny",
        quick=True,
        suites=["training"],
        methods=methods,
        warmup=1,
        repeats=2,
        interleave=interleave,
        out=tmp_path / "out",
        plots=False,
    )
    return {r.method: r for r in run_benchmarks(settings, progress=False).records}


@pytest.mark.parametrize("interleave", [True, False], ids=["interleaved", "one-by-one"])
def test_a_method_that_fails_gets_a_row_that_says_why(tmp_path, extra_training_methods, interleave):
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
