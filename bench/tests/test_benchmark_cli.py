"""The steer-fast command line: parsing, validation before anything runs, defaults by device,
the module form and the command line it records."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steer_fast_bench.benchmark import BenchmarkSettings
from steer_fast_bench.benchmark.models import PRESETS
from steer_fast_bench.benchmark.settings import KERNEL_GRIDS, invoked_as
from steer_fast_bench.cli import build_parser, main


def test_parser_reads_every_option():
    args = build_parser().parse_args(
        [
            "bench",
            "--suites",
            "training",
            "inference",
            "--methods",
            "lora_qv,floor",
            "--preset",
            "tiny",
            "--config",
            "MistralConfig",
            "--config-kwargs",
            '{"num_hidden_layers": 3}',
            "--dtype",
            "bfloat16",
            "--device",
            "cpu",
            "--batch",
            "3",
            "--seq-len",
            "24",
            "--rank",
            "8",
            "--activation",
            "silu",
            "--decode-tokens",
            "5",
            "--kernel-tokens",
            "64,128",
            "--kernel-hidden",
            "32",
            "--seed",
            "7",
            "--quick",
            "--warmup",
            "2",
            "--repeats",
            "4",
            "--threads",
            "1",
            "--full",
            "--out",
            "somewhere",
            "--overwrite",
            "--no-plots",
            "--no-progress",
        ]
    )
    assert args.command == "bench"
    assert args.suites == ["training", "inference"] and args.methods == ["lora_qv,floor"]
    assert args.config_kwargs == {"num_hidden_layers": 3}
    assert (args.batch, args.seq_len, args.rank, args.decode_tokens) == (3, 24, 8, 5)
    assert (args.warmup, args.repeats, args.threads) == (2, 4, 1)
    assert args.quick and args.full and args.overwrite and args.plots is False
    assert args.no_progress and args.device == "cpu"


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu", ""])
def test_device_is_checked_on_the_command_line(capsys, device):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["bench", "--device", device])
    assert exit_.value.code == 2
    assert "device must be cpu, cuda or cuda:N" in capsys.readouterr().err
    for good in ("cpu", "cuda", "cuda:1"):
        assert build_parser().parse_args(["bench", "--device", good]).device == good


def test_parser_rejects_bad_json_and_choices():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--config-kwargs", "{not json"])
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--config-kwargs", "[1, 2]"])
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--activation", "softmax"])


def test_settings_resolve_from_options(tmp_path):
    settings = BenchmarkSettings.create(
        preset="tiny",
        config="MistralConfig",
        config_kwargs={"num_hidden_layers": 3},
        suites=["kernel", "training"],
        rank=8,
        activation="silu",
        dtype="bfloat16",
        kernel_tokens=[64, 128],
        out=tmp_path / "run",
        device="cpu",
    )
    config = settings.spec.config
    assert type(config).__name__ == "MistralConfig"
    assert (
        config.num_hidden_layers == 3 and config.hidden_size == PRESETS["tiny"].sizes["hidden_size"]
    )
    assert settings.spec.dtype == torch.bfloat16 and settings.rank == 8
    assert settings.suites == ("kernel", "training")
    grid = settings.kernel_grid
    assert grid.tokens == (64, 128) and grid.ranks == (8,) and grid.activations == ("silu",)
    assert grid.dtypes == (torch.bfloat16,)
    assert settings.spec.name.startswith("MistralConfig[tiny]")


def test_defaults_follow_the_device(tmp_path):
    settings = BenchmarkSettings.create(out=tmp_path / "run")
    cuda = torch.cuda.is_available()
    assert settings.preset.name == ("llama-3.2-1b" if cuda else "cpu-small")
    assert settings.size == ("full" if cuda else "default")
    assert settings.threads == (None if cuda else 1)
    assert settings.kernel_grid == KERNEL_GRIDS[cuda, settings.size]
    full = BenchmarkSettings.create(out=tmp_path / "run", full=True, device="cpu")
    assert full.size == "full" and full.kernel_grid == KERNEL_GRIDS[False, "full"]
    assert full.timing["training"].budget_s > settings.timing["training"].budget_s or cuda
    assert BenchmarkSettings.create(out=tmp_path / "run", quick=True).size == "quick"
    assert BenchmarkSettings.create(out=tmp_path / "run", threads=2).threads == 2


def test_config_from_a_local_json_file(tmp_path):
    config_file = tmp_path / "config.json"
    config_file.write_text(
        '{"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, '
        '"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, '
        '"vocab_size": 100}',
        encoding="utf-8",
    )
    settings = BenchmarkSettings.create(config=str(tmp_path), preset="tiny", out=tmp_path / "o")
    assert type(settings.spec.config).__name__ == "Qwen2Config"
    assert settings.spec.vocab_size == 100


@pytest.mark.parametrize(
    "options, message",
    [
        (["--rank", "0"], "rank must be an integer >= 1"),
        (["--batch", "-2"], "batch must be an integer >= 1"),
        (["--suites", "speed"], "suites must be drawn from"),
        (["--methods", "lora_qv", "dora"], "unknown: ['dora']"),
        (["--config", "NotAConfig"], "config must name a transformers config class"),
        (["--config-kwargs", '{"hidden_size": "wide"}'], "hidden_size"),
        (["--kernel-tokens", "0"], "kernel_tokens must be an integer >= 1"),
        (["--repeats", "0"], "repeats must be an integer >= 1"),
        (["--quick", "--full"], "quick and full exclude each other"),
    ],
)
def test_bad_options_fail_before_anything_runs(tmp_path, capsys, options, message):
    out = tmp_path / "run"
    code = main(["bench", "--preset", "tiny", "--out", str(out), *options])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_existing_results_are_never_overwritten_unasked(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("[]", encoding="utf-8")
    code = main(["bench", "--preset", "tiny", "--out", str(out)])
    assert code == 2
    assert "already holds results.json" in capsys.readouterr().err
    assert (out / "results.json").read_text(encoding="utf-8") == "[]"


def test_default_out_never_reuses_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = BenchmarkSettings.create(preset="tiny").out
    first.mkdir(parents=True)
    second = BenchmarkSettings.create(preset="tiny").out
    assert first.parent == second.parent and first != second
    assert str(first).startswith("steer-fast-bench/cpu-") or torch.cuda.is_available()
    assert not first.is_absolute()  # under the current directory


def test_the_recorded_command_is_the_one_typed(monkeypatch):
    assert invoked_as(["bench", "--quick"], program="steer-fast") == "steer-fast bench --quick"
    assert invoked_as(["bench", "--config-kwargs", '{"a": 1}'], program="steer-fast") == (
        "steer-fast bench --config-kwargs '{\"a\": 1}'"
    )
    monkeypatch.setattr(sys, "argv", ["/venv/bin/steer-fast", "bench", "--full"])
    assert invoked_as() == "steer-fast bench --full"


def test_module_form_records_python_m(tmp_path):
    out = tmp_path / "run"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "steer_fast_bench",
            "bench",
            "--preset",
            "tiny",
            "--quick",
            "--suites",
            "training",
            "--methods",
            "floor",
            "--repeats",
            "1",
            "--out",
            str(out),
            "--no-plots",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    rows = json.loads((out / "results.json").read_text(encoding="utf-8"))
    interpreter = Path(sys.executable).name
    assert rows[0]["command"] == (
        f"{interpreter} -m steer_fast_bench bench --preset tiny --quick "
        f"--suites training --methods floor --repeats 1 --out {out} "
        "--no-plots --no-progress"
    )


def test_module_form_lists_presets_and_methods():
    done = subprocess.run(
        [sys.executable, "-m", "steer_fast_bench", "bench", "--list"],
        capture_output=True,
        text=True,
        check=True,
    )
    for name in ("cpu-small", "llama-3.2-1b", "steer_fast_fused", "loreft", "floor", "eager"):
        assert name in done.stdout


def test_reproduce_is_a_subcommand(capsys):
    """steer-fast reproduce reaches its own options and refuses bad input before any training."""
    assert main(["reproduce", "--list"]) == 0
    assert "steer_silu" in capsys.readouterr().out
    assert main(["reproduce", "--tasks", "no_such_task", "--no-progress"]) == 2
    assert "no_such_task" in capsys.readouterr().err
