"""The benchmark's options: one dataclass, from which the command line is generated, and the
settings module that resolves them without importing any suite."""

import ast
import dataclasses
from pathlib import Path

import pytest

import steer_fast_bench.benchmark
from steer_fast_bench.benchmark import METHODS, SUITES, BenchmarkOptions, BenchmarkSettings
from steer_fast_bench.benchmark.settings import invoked_as
from steer_fast_bench.cli import build_parser, options_from_args

OPTIONS = [f for f in dataclasses.fields(BenchmarkOptions) if "help" in f.metadata]
BENCHMARK = Path(steer_fast_bench.benchmark.__file__).parent


def test_every_option_has_help_and_its_default_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for option in OPTIONS:
        prefix = "--no-" if option.default is True else "--"
        flag = option.metadata.get("flag") or prefix + option.name.replace("_", "-")
        assert flag in help_text, flag
        assert " ".join(option.metadata["help"].split()) in help_text, option.name
        if not isinstance(option.default, bool):
            shown = option.metadata["shown"] if option.default is None else option.default
            assert f"(default: {shown})" in help_text, option.name
    for flag in ("--batch", "--seq-len", "--decode-tokens", "--seed", "--kernel-tokens",
                 "--kernel-hidden", "--list", "--no-progress", "--quick", "--full"):  # fmt: skip
        assert flag in help_text
    assert "--device {cpu,cuda,cuda:N}" in help_text
    assert "(default: 1 on the CPU, as the committed CPU results" in help_text
    assert "(default: ./steer-fast-bench/<device>-<date>/ in the current directory" in help_text


def test_command_line_maps_onto_the_options():
    argv = ["bench", "--suites", "kernel,training", "--no-plots", "--no-interleave",
            "--kernel-hidden", "32", "64", "--kernel-tokens", "16,8", "--rank", "4"]  # fmt: skip
    options = options_from_args(
        build_parser().parse_args(argv), invoked_as(argv, program="steer-fast")
    )
    assert options.suites == ["kernel", "training"]
    assert options.plots is False and options.interleave is False and options.quick is False
    assert options.kernel_hidden_sizes == [32, 64] and options.kernel_tokens == [16, 8]
    assert options.rank == 4 and options.seed == 0 and options.preset is None
    assert options.command == "steer-fast bench --suites kernel,training --no-plots " + (
        "--no-interleave --kernel-hidden 32 64 --kernel-tokens 16,8 --rank 4"
    )


def test_create_takes_the_options_and_nothing_else(tmp_path):
    with pytest.raises(TypeError):
        BenchmarkSettings.create(out=tmp_path / "run", kernel_hidden=[32])
    settings = BenchmarkSettings.create(
        preset="tiny", out=tmp_path / "run", kernel_hidden_sizes=[32], plots=False
    )
    assert settings.kernel_grid.hidden_sizes == (32,) and settings.plots is False


def test_one_registry_names_every_suite_and_its_methods():
    assert SUITES == tuple(METHODS) == ("kernel", "training", "inference", "mixed")
    assert {"steer_fast_fused", "eager", "torch_compile"} <= set(METHODS["kernel"])
    assert {"lora_qv", "floor"} <= set(METHODS["training"])
    assert {"base", "lora_merged"} <= set(METHODS["inference"])
    assert {"steer_mixed", "peft_lora_mixed", "steer_mixed_train"} <= set(METHODS["mixed"])


def _package_imports(module: str) -> set[str]:
    """The benchmark modules ``module`` imports at module level (relative imports only)."""
    tree = ast.parse((BENCHMARK / f"{module}.py").read_text(encoding="utf-8"))
    return {
        node.module
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
    }


def test_settings_import_no_suite():
    seen, pending = set(), ["settings"]
    while pending:
        module = pending.pop()
        if module not in seen:
            seen.add(module)
            pending.extend(_package_imports(module))
    assert not {m for m in seen if m.endswith("suite") or m == "runner"}, seen
