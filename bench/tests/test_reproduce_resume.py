"""A results file of format 1 (written by the code before the selection rule: its structure
copied from a real one) is read, migrated and extended by today's code: its runs are kept as they
are, the later phases (LoReFT's last position, the joint runs at per-part rates, the seeds at
the chosen rates) are added to it, and it is written back as format 2."""

from __future__ import annotations

import argparse
import json

import pytest

from tiny_models import char_tokenizer, tiny_causal_lm

pytest.importorskip("peft")

from steer_fast_bench.reproduce import cli  # noqa: E402
from steer_fast_bench.reproduce import results as results_file  # noqa: E402
from steer_fast_bench.reproduce.tasks import make_task  # noqa: E402

TASK_SIZES = {"train_size": 8, "validation_size": 3, "test_size": 4}
# The sizes of test_reproduce_run.py's runs (the tests share no module: importlib mode).
SMALL = "--tasks listops --steps 3 --train-size 8 --validation-size 3 --test-size 4 "
SMALL += "--batch-size 2 --grad-accum 2 --listops-max-tokens 6 --eval-batch-size 4 "
SMALL += "--no-progress --no-memory --no-probe --threads 1"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama and the character tokenizer, saved to one folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_causal_lm("llama")
    model.config.max_position_embeddings = 512  # RoPE: prompts of ~150 characters
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.main(parser.parse_args(argv), argv)


def load(out) -> dict:
    return json.loads((out / results_file.RESULTS_FILE).read_text())


def _split(correct: int, total: int) -> dict:
    marks = [i < correct for i in range(total)]
    return {
        "accuracy": correct / total,
        "correct": correct,
        "marks": marks,
        "outputs": ["<answer>1</answer>" if m else "\nOutput:\n10" for m in marks],
        "seconds": 0.5,
        "stderr": (correct / total * (1 - correct / total) / total) ** 0.5,
        "total": total,
    }


def _record(method: str, seed, rate, validation: int | None, test: int, parameters: int) -> dict:
    """One run as format 1 wrote it (the keys of a real file's records)."""
    trained = rate is not None
    record = {
        "details": {"positions": "f7+l7", "rank": 8} if method == "loreft" else {},
        "learning_rate": rate,
        "method": method,
        "model_parameters": parameters,
        "seconds": 2.0,
        "seed": seed,
        "started": "2026-12-08T01:31:43",
        "task": "listops",
        "test": _split(test, 4),
        "train": None
        if not trained
        else {
            "epochs": 1.5,
            "learning_rates": [0.0, rate, rate / 2],
            "losses": [1.9, 1.5, 1.2],
            "peak_memory_bytes": None,
            "schedule": "linear",
            "seconds": 0.3,
            "seconds_per_step": 0.1,
            "step_seconds": [0.1, 0.1, 0.1],
            "steps": 3,
            "warmup_ratio": 0.03,
        },
        "trainable_parameters": parameters if method == "full" else (0 if not trained else 512),
        "trainable_percent": 100.0 if method == "full" else (0.0 if not trained else 1.9),
    }
    if validation is not None:
        record["validation"] = _split(validation, 3)
    return record


def format_1_results(model_dir) -> dict:
    """A format-1 results.json for SMALL's settings on the tiny model: base, a two-rate sweep of
    full and of steer_silu, one rate of lora and of loreft (f7+l7), all at seed 0."""
    parameters = sum(p.numel() for p in tiny_causal_lm("llama").parameters())
    splits = make_task("listops", **TASK_SIZES, seed=0, max_tokens=6)
    runs = [
        _record("base", None, None, None, 0, parameters),
        _record("full", 0, 1e-4, 1, 2, parameters),
        _record("full", 0, 1e-3, 2, 1, parameters),  # the validation-best, not the test-best
        _record("lora", 0, 1e-3, 1, 1, parameters),
        _record("loreft", 0, 1e-3, 1, 1, parameters),
        _record("steer_silu", 0, 1e-3, 0, 3, parameters),
        _record("steer_silu", 0, 4e-3, 2, 2, parameters),
    ]
    return {
        "commands": ["steer-fast reproduce --tasks listops --methods base full lora ..."],
        "environment": {
            "machine": {"cpu_count": 2, "gpu": None, "processor": "AMD EPYC", "torch_threads": 2},
            "versions": {"python": "3.11.7", "steer-fast": "0.1.0", "torch": "2.13.0+cpu"},
        },
        "format": 1,
        "model_parameters": parameters,
        "settings": {
            "batch_size": 2,
            "data_seed": 0,
            "epochs": 1.0,
            "grad_accum": 2,
            "listops_max_tokens": 6,
            "max_length": None,
            "model": str(model_dir),
            "orthogonality_frequency": 100,
            "steps": 3,
            "test_size": 4,
            "train_size": 8,
            "validation_size": 3,
        },
        "skipped": {},
        "tasks": {
            "listops": {
                "fingerprint": results_file.fingerprint(splits),
                "test": 4,
                "train": 8,
                "validation": 3,
            }
        },
        "runs": runs,
    }


def _write(out, results: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=1, sort_keys=True) + "\n"
    (out / results_file.RESULTS_FILE).write_text(text)
    return text


ARGS = [
    "--methods",
    "base",
    "full",
    "lora",
    "loreft",
    "loreft_last",
    "steer_silu",
    "joint_orth",
    "--lr-grid",
    "full=1e-4,1e-3",
    "lora=1e-3",
    "loreft=1e-3",
    "steer_silu=1e-3,4e-3",
    "--seeds",
    "0",
    "1",
    "--repeat-methods",
    "full",
    "steer_silu",
]


def test_migrating_format_1_keeps_every_run(tiny_model_dir):
    old = format_1_results(tiny_model_dir)
    old["runs"].append({**old["runs"][3], "method": "joint_orth"})
    new = results_file.migrate_format_1(old)
    assert new["format"] == 2 and new["migrated_from"] == 1
    assert "orthogonality_frequency" not in new["settings"]
    assert new["settings"]["selection_seed"] == 0
    assert new["runs"][:-1] == old["runs"][:-1]  # untouched, the old key as it was
    assert new["runs"][-1]["options"] == {"orthogonality_frequency": 100}
    assert results_file.run_key(new["runs"][1]) == ("listops", "full", 0, 1e-4, ())
    assert old["format"] == 1 and "options" not in old["runs"][-1]  # a copy, not in place


def test_a_format_1_file_is_resumed_with_the_later_phases(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    old = format_1_results(tiny_model_dir)
    text = _write(out, old)
    argv = [*SMALL.split(), "--model", str(tiny_model_dir), "--out", str(out), *ARGS]
    # The plan reads the file and writes nothing.
    assert run_cli([*argv, "--plan-only"]) == 0
    assert (out / results_file.RESULTS_FILE).read_text() == text
    assert run_cli(argv) == 0
    results = load(out)
    assert results["format"] == 2 and results["migrated_from"] == 1
    assert results["runs"][: len(old["runs"])] == old["runs"]
    assert results["commands"][0] == old["commands"][0] and len(results["commands"]) == 2
    added = [
        (r["method"], r["seed"], r["learning_rate"], r.get("options"))
        for r in results["runs"][len(old["runs"]) :]
    ]
    # full's rate is its validation-best (1e-3), steer_silu's 4e-3: the joint parts take them.
    assert added == [
        ("loreft_last", 0, 1e-3, {}),
        ("joint_orth", 0, {"lora": 1e-3, "steering": 4e-3}, {"orthogonality_frequency": 1}),
        ("joint_orth", 0, 2e-4, {"orthogonality_frequency": 1}),
        ("full", 1, 1e-3, {}),
        ("steer_silu", 1, 4e-3, {}),
    ]
    report = (out / "report.md").read_text()
    assert "| full | 0.001 | validation-best of 2 | 0, 1 |" in report
    assert "| joint_orth, orthogonality_frequency 1 | lora 0.001 + steering 0.004 |" in report
    # Resumed again: nothing left to run, the file as it was.
    before = (out / results_file.RESULTS_FILE).read_text()
    assert run_cli(argv) == 0
    assert (
        json.loads((out / results_file.RESULTS_FILE).read_text())["runs"]
        == json.loads(before)["runs"]
    )


def test_a_format_1_file_with_other_settings_is_refused_untouched(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    text = _write(out, format_1_results(tiny_model_dir))
    argv = [
        *SMALL.split(),
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
        *ARGS,
        "--steps",
        "4",
    ]
    assert run_cli(argv) == 2
    assert (out / results_file.RESULTS_FILE).read_text() == text


def test_an_unknown_format_is_refused(tmp_path):
    path = tmp_path / results_file.RESULTS_FILE
    path.write_text(json.dumps({"format": 7, "runs": []}))
    with pytest.raises(ValueError, match="format 7, this version reads 1 and 2"):
        results_file.read_results(path)
