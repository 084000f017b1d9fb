"""``steer-fast reproduce`` end to end on a tiny random Llama and a character tokenizer: every
method through the phases of the protocol (sweep, LoReFT positions, joint at per-part rates,
seeds) for 3 steps, resuming after an interruption, skipped methods, and bad input (exit code 2
before anything trains)."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import pytest
import torch

from tiny_models import char_tokenizer, tiny_causal_lm

pytest.importorskip("peft")
from steer_fast_bench import baselines  # noqa: E402
from steer_fast_bench.reproduce import cli, methods, runner  # noqa: E402
from steer_fast_bench.reproduce.joint import down_projection_due, resolve_frequency  # noqa: E402
from steer_fast_bench.reproduce.loreft import loreft_positions  # noqa: E402
from steer_fast_bench.reproduce.train import TrainSettings, data_order  # noqa: E402

# Methods whose model is the base model at initialisation (B = 0, U = 0, zero vectors): with the
# same data order their first training loss is the same number.
IDENTITY_AT_INIT = ("full", "lora", "steer_silu", "steer_identity", "joint_orth", "joint_plain")
SMALL = [
    "--tasks",
    "listops",
    "--steps",
    "3",
    "--train-size",
    "8",
    "--validation-size",
    "3",
    "--test-size",
    "4",
    "--batch-size",
    "2",
    "--grad-accum",
    "2",
    "--listops-max-tokens",
    "6",
    "--eval-batch-size",
    "4",
    "--no-progress",
    "--no-memory",
    "--no-probe",
    "--threads",
    "1",  # tiny matrices: a second thread only adds synchronisation
]
# One or two rates per method keep the sweeps short.
GRID = [
    "--lr-grid",
    "full=1e-3",
    "lora=1e-3",
    "loreft=1e-3,4e-3",
    "steer_silu=1e-3,4e-3",
    "steer_identity=4e-3",
]
# The methods of the paper's protocol (the steering sites and the vector are built and trained
# by test_every_method_trains_its_own_parameters_only).
PROTOCOL_METHODS = [
    "base",
    "full",
    "lora",
    "loreft",
    "loreft_last",
    "steer_silu",
    "steer_identity",
    "joint_orth",
    "joint_plain",
]


def save_tiny_model(folder):
    """Save a tiny random Llama and the character tokenizer to ``folder``; returns it."""
    model = tiny_causal_lm("llama")
    model.config.max_position_embeddings = 512  # RoPE: prompts of ~150 characters
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama and the character tokenizer, saved to one folder."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.main(parser.parse_args(argv), argv)


def load(out) -> dict:
    return json.loads((out / runner.RESULTS_FILE).read_text())


def test_every_method_through_every_phase(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*SMALL, "--model", str(tiny_model_dir), "--out", str(out), *GRID]
    argv += ["--methods", *PROTOCOL_METHODS, "--seeds", "0", "1"]
    argv += ["--repeat-methods", "steer_silu", "loreft", "--validation-every", "2"]
    assert run_cli(argv) == 0
    plan = capsys.readouterr().err
    assert (
        "steer-fast reproduce: the plan" in plan
        and "sweep: base; full 0.001; lora 0.001; loreft 0.001, 0.004" in plan
    )
    assert "positions: loreft_last (rate chosen by the sweep)" in plan
    assert "the sweeps differ in size" in plan
    results = load(out)
    assert results["format"] == 2 and results["settings"]["selection_seed"] == 0
    runs = {(r["method"], r["seed"], json.dumps(r["learning_rate"])): r for r in results["runs"]}
    by_method = {}
    for record in results["runs"]:
        by_method.setdefault(record["method"], []).append(record)
    silu = max(
        by_method["steer_silu"][:2],
        key=lambda r: (r["validation"]["accuracy"], -r["learning_rate"]),
    )["learning_rate"]
    loreft = max(
        by_method["loreft"][:2], key=lambda r: (r["validation"]["accuracy"], -r["learning_rate"])
    )["learning_rate"]
    parts = {"lora": 1e-3, "steering": silu}
    # positions: loreft_last at loreft's rate; joint: per-part rates and 2e-4 for reference.
    assert [r["learning_rate"] for r in by_method["loreft_last"]] == [loreft]
    for name in ("joint_orth", "joint_plain"):
        assert [r["learning_rate"] for r in by_method[name]] == [parts, 2e-4]
    # seeds: steer_silu and the chosen LoReFT position again at seed 1, at the chosen rate.
    assert ("steer_silu", 1, json.dumps(silu)) in runs
    reft = [r for r in results["runs"] if r["method"].startswith("loreft") and r["seed"] == 1]
    assert len(reft) == 1 and reft[0]["learning_rate"] == loreft
    assert len(results["runs"]) == 1 + 1 + 1 + 2 + 2 + 1 + 1 + 4 + 2
    for run in results["runs"]:
        test = run["test"]
        assert test["total"] == 4 and test["accuracy"] == sum(test["marks"]) / 4
        assert test["stderr"] == pytest.approx(
            math.sqrt(test["accuracy"] * (1 - test["accuracy"]) / 4)
        )
        if run["method"] == "base":
            assert run["train"] is None and "validation" not in run
            continue
        assert run["train"]["steps"] == 3 and all(map(math.isfinite, run["train"]["losses"]))
        assert run["validation"]["total"] == 3
        assert [p["step"] for p in run["validation_curve"]] == [2, 3]
        assert run["validation_curve"][-1]["accuracy"] == run["validation"]["accuracy"]
    first = [by_method[m][0]["train"]["losses"][0] for m in IDENTITY_AT_INIT]
    assert first == pytest.approx([first[0]] * len(first), rel=1e-5)
    # Each part at its own rate: after the one warmup step the cosine schedule is at its peak.
    orth = by_method["joint_orth"][0]["train"]
    assert orth["learning_rates"]["lora"][1] == pytest.approx(1e-3)
    assert orth["learning_rates"]["steering"][1] == pytest.approx(silu)
    # "auto" frequency on 3 steps: every step, so the constraint acts twice after step 0.
    assert by_method["joint_orth"][0]["options"] == {"orthogonality_frequency": 1}
    assert orth["projection_steps"] == [0, 1, 2]
    assert by_method["joint_plain"][0]["train"]["projection_steps"] == []
    assert by_method["loreft_last"][0]["details"]["positions"] == "last"
    assert by_method["loreft"][0]["details"]["positions"] == "f7+l7"
    report = (out / "report.md").read_text()
    assert (
        "### listops" in report and "| joint_orth at 0.0002, orthogonality_frequency 1 |" in report
    )
    assert "## Validation accuracy during training" in report
    assert "## ListOps beside the published numbers" in report
    assert "the sweeps differ in size" in report
    for png in ("accuracy.png", "loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_after_interruption(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = [*SMALL, "--model", str(tiny_model_dir), "--out", str(out)]
    argv += ["--methods", "base", "steer_silu", "steer_vector", "--lr-grid", "steer_silu=1e-3"]
    argv += ["steer_vector=1e-3"]
    original = runner.run_one
    calls = []

    def interrupted(prepared, run, **kwargs):
        calls.append(run.method)
        if run.method == "steer_vector":
            raise KeyboardInterrupt
        return original(prepared, run, **kwargs)

    monkeypatch.setattr(runner, "run_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli(argv)
    first = load(out)
    assert [r["method"] for r in first["runs"]] == ["base", "steer_silu"]

    def counted(prepared, run, **kwargs):
        calls.append(run.method)
        return original(prepared, run, **kwargs)

    monkeypatch.setattr(runner, "run_one", counted)
    calls.clear()
    assert run_cli(argv) == 0
    assert calls == ["steer_vector"]  # base and steer_silu are not run again
    second = load(out)
    assert [r["method"] for r in second["runs"]] == ["base", "steer_silu", "steer_vector"]
    assert second["runs"][:2] == first["runs"]
    assert len(second["commands"]) == 2
    calls.clear()
    assert run_cli(argv) == 0 and calls == []  # everything done: nothing runs
    assert run_cli([*argv, "--steps", "4"]) == 2  # other result settings: refused
    assert run_cli([*argv, "--seeds", "1"]) == 2  # another selection seed: refused
    assert load(out)["runs"] == second["runs"]


def test_a_method_that_cannot_run_is_skipped_with_its_reason(tiny_model_dir, tmp_path, monkeypatch):
    def missing():
        raise baselines.MethodUnavailable(
            "pyreft cannot be imported: ImportError: No module named 'pyvene'"
        )

    monkeypatch.setattr(methods, "import_pyreft", missing)
    out = tmp_path / "out"
    argv = [*SMALL, "--model", str(tiny_model_dir), "--out", str(out)]
    assert run_cli([*argv, "--methods", "base", "loreft", "loreft_last"]) == 0
    results = load(out)
    assert [r["method"] for r in results["runs"]] == ["base"]
    assert "No module named 'pyvene'" in results["skipped"]["loreft"]
    assert "loreft: pyreft cannot be imported" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "sudoku"], "tasks: unknown task 'sudoku'"),
        (["--methods", "steer_silu,dora"], "methods: unknown method 'dora'"),
        (["--model", "gemma-9-9b"], "model='gemma-9-9b' is not a known model"),
        (["--lr-grid", "full=fast"], "lr_grid"),
        (["--lr-grid", "full"], "lr_grid: expected METHOD=LR"),
        (["--lr-grid", "full=-1e-4"], "lr_grid full: a learning rate must be finite and > 0"),
        (["--lr-grid", "full=0"], "lr_grid full: a learning rate must be finite and > 0"),
        (["--lr-grid", "full=nan"], "lr_grid full: a learning rate must be finite and > 0"),
        (["--lr-grid", "full=1e-4,inf"], "lr_grid full: a learning rate must be finite and > 0"),
        (["--lr-grid", "full=1e-4,1e-4"], "lr_grid full: 0.0001 given more than once"),
        (["--lr-grid", "full=1e-4", "full=1e-3"], "lr_grid: full given more than once"),
        (["--lr-grid", "dora=1e-4"], "lr_grid: unknown method 'dora'"),
        (["--lr-grid", "base=1e-4"], "lr_grid: base does not train"),
        (
            ["--methods", "loreft", "loreft_last", "--lr-grid", "loreft_last=1e-3"],
            "lr_grid: loreft_last takes no grid",
        ),
        (
            ["--methods", "lora", "joint_orth"],
            "methods: joint_orth runs at the validation-best rate of lora and steer_silu: add "
            "steer_silu",
        ),
        (["--seeds", "0", "1", "0"], "seeds: 0 given more than once"),
        (["--seeds", "one"], "seeds must be integers"),
        (["--repeat-methods", "joint_orth"], "repeat_methods: 'joint_orth' is not one of"),
        (["--grid-points", "4"], "grid_points must be one of 3, 5"),
        (["--validation-size", "0"], "validation_size must be >= 1"),
        (["--validation-every", "0"], "validation_every must be an integer >= 1"),
        (["--steps", "0"], "steps must be an integer >= 1"),
        (["--max-length", "10"], "max_length=10 is shorter than an example"),
        (["--orthogonality-frequency", "0"], "orthogonality_frequency must be an integer >= 1"),
        (["--orthogonality-frequency", "often"], "orthogonality_frequency must be an integer >= 1"),
    ],
)
def test_bad_options_exit_2_before_anything_runs(argv, message, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli([*SMALL, "--model", str(tiny_model_dir), "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_orthogonality_frequency_is_a_per_run_option(tiny_model_dir, tmp_path):
    """--orthogonality-frequency 1 projects before every step (the overlap O of the parts ends
    below the unconstrained run's); another frequency in the same folder is another joint_orth
    run (the option is part of the run's key), not a refusal; "auto" on 3 steps is 1: nothing
    new."""
    out = tmp_path / "out"
    argv = [*SMALL, "--model", str(tiny_model_dir), "--out", str(out)]
    argv += ["--methods", "lora", "steer_silu", "joint_orth", "joint_plain"]
    argv += ["--lr-grid", "lora=1e-3", "steer_silu=1e-3"]

    def joint(name):
        return [r for r in load(out)["runs"] if r["method"] == name]

    assert run_cli([*argv, "--orthogonality-frequency", "1"]) == 0
    orth, plain = joint("joint_orth"), joint("joint_plain")
    assert [r["train"]["projection_steps"] for r in orth] == [[0, 1, 2], [0, 1, 2]]
    assert orth[0]["details"]["orthogonality"]["frequency"] == 1
    overlap = "down_projection_overlap"
    assert orth[0]["train"][overlap] < plain[0]["train"][overlap]
    assert run_cli([*argv, "--orthogonality-frequency", "2"]) == 0
    assert [r["train"]["projection_steps"] for r in joint("joint_orth")[2:]] == [[0, 2], [0, 2]]
    assert run_cli(argv) == 0  # auto
    assert [r["options"]["orthogonality_frequency"] for r in joint("joint_orth")] == [1, 1, 2, 2]
    assert len(joint("joint_plain")) == 2


def test_the_plan_probes_step_times_and_plan_only_trains_nothing(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    from steer_fast_bench.reproduce import plan as plan_module

    monkeypatch.setattr(plan_module.os, "getloadavg", lambda: (512.0, 0.0, 0.0))
    out = tmp_path / "out"
    argv = [a for a in SMALL if a != "--no-probe"]
    argv += ["--model", str(tiny_model_dir), "--out", str(out), "--methods", "base", "lora"]
    assert run_cli([*argv, "--plan-only"]) == 0
    captured = capsys.readouterr()
    plan = captured.out  # the plan is the command's output; the probing notes go to stderr
    assert "probing the step time of lora" in captured.err
    assert "estimated time: about" in plan and "lora " in plan and "(probed)" in plan
    assert "lora 5e-05, 0.0003, 0.0015" in plan  # the 3-point paper grid
    assert "warning: load average 512.0" in plan  # probed under competition: said so
    assert not out.exists()


def test_bad_model_exits_2_before_anything_trains(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: pytest.fail("a run started"))
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a GGUF file")
    for model in (str(tmp_path / "no-such-model"), str(fake)):
        out = tmp_path / "out"
        assert run_cli([*SMALL, "--model", model, "--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert error.startswith("steer-fast reproduce: error:") and model in error
        assert not out.exists()


def test_data_order_depends_on_the_seed_only():
    settings = TrainSettings(
        steps=5,
        batch_size=3,
        grad_accum=2,
        learning_rate=1e-3,
        schedule="linear",
        warmup_ratio=0.0,
        seed=7,
    )
    order = data_order(10, settings)
    assert order == data_order(10, settings)
    assert order != data_order(10, TrainSettings(**{**vars(settings), "seed": 8}))
    stream = [i for plan in order for batch in plan.micro_batches for i in batch]
    assert len(stream) == 30 and all(len(b) == 3 for p in order for b in p.micro_batches)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert [p.epoch_start for p in order] == [True, True, False, True, False]


@pytest.mark.parametrize(
    "frequency, due",
    [
        (100, [0, 100, 200]),
        (2, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24]),
        ("step", list(range(25))),
        ("init", [0]),
        ("epoch", [0, 10, 20]),
    ],
)
def test_down_projection_is_due_as_the_joint_trainer_applies_it(frequency, due):
    from steer_fast import OrthogonalityConfig

    config = OrthogonalityConfig(frequency=frequency)
    steps = 25 if frequency != 100 else 201
    assert [s for s in range(steps) if down_projection_due(config, s, s % 10 == 0)] == due
    none = OrthogonalityConfig(constraint="none")
    assert not any(down_projection_due(none, s, True) for s in range(5))


def test_auto_frequency_acts_five_times_after_step_0():
    assert resolve_frequency("auto", 144) == 24  # 0, 24, ..., 120
    assert resolve_frequency("auto", 16) == 3 and resolve_frequency("auto", 3) == 1
    assert resolve_frequency(100, 144) == 100 and resolve_frequency("epoch", 144) == "epoch"


def test_loreft_positions_follow_pyreft():
    pyreft = pytest.importorskip("pyreft")
    for length in (3, 14, 40):
        ours = loreft_positions(length)
        theirs = pyreft.get_intervention_locations(
            last_position=length, first_n=7, last_n=7, num_interventions=1, share_weights=True
        )[0]
        assert sorted(set(ours)) == sorted(set(p for p in theirs if p >= 0))
        assert len(ours) == 14
        assert loreft_positions(length, positions="last") == [length - 1]
    assert loreft_positions(40, offset=5) == [p + 5 for p in loreft_positions(40)]
    with pytest.raises(ValueError, match="positions"):
        loreft_positions(5, positions="middle")


@pytest.mark.parametrize("name", [m.name for m in methods.METHODS.values() if m.trains])
def test_every_method_trains_its_own_parameters_only(name):
    """Two optimizer steps change every trainable tensor (the second reaches the LoRA A and the
    adapter D that see no gradient while B and U are zero) and no other."""
    from steer_fast_bench.reproduce.data import collate, encode_example
    from steer_fast_bench.reproduce.tasks import make_task
    from steer_fast_bench.reproduce.train import train

    if name.startswith("loreft"):
        pytest.importorskip("pyreft")
    model = tiny_causal_lm("llama")
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    adapted = methods.METHODS[name].build(model, tokenizer.pad_token_id)
    trainable = {id(p) for p in adapted.parameters}
    before = [p.detach().clone() for p in adapted.parameters]
    frozen = [(p, p.detach().clone()) for p in model.parameters() if id(p) not in trainable]
    assert adapted.trainable_parameters > 0 and (name == "full") == (not frozen)
    # The optimizer groups hold exactly the trainable parameters (one group per joint part).
    grouped = [p for group in adapted.optimizer_groups(1e-2) for p in group["params"]]
    assert sorted(map(id, grouped)) == sorted(trainable)
    examples = make_task(
        "listops", train_size=4, validation_size=0, test_size=1, max_tokens=6
    ).train
    rows = [encode_example(e, tokenizer) for e in examples]
    settings = TrainSettings(
        steps=2,
        batch_size=2,
        grad_accum=1,
        learning_rate=1e-2,
        schedule="linear",
        warmup_ratio=0.0,
        seed=0,
        measure_memory=False,
    )
    result = train(
        adapted,
        rows,
        lambda batch: collate(batch, tokenizer.pad_token_id),
        settings,
        progress=False,
    )
    assert len(result.losses) == 2
    unchanged = [
        i
        for i, (p, old) in enumerate(zip(adapted.parameters, before))
        if torch.equal(p.detach(), old)
    ]
    assert not unchanged, f"{name}: trainable tensors {unchanged} did not change"
    assert all(torch.equal(p.detach(), old) for p, old in frozen)


def test_a_rate_per_part_needs_a_method_with_parts():
    adapted = methods.build_full(tiny_causal_lm("llama"), 0)
    with pytest.raises(ValueError, match="a rate per part"):
        adapted.optimizer_groups({"lora": 1e-3, "steering": 1e-3})


def test_importing_steer_fast_does_not_import_reproduce():
    code = "import sys, steer_fast; assert 'steer_fast_bench.reproduce' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_loss_weights_micro_batches_by_their_tokens():
    from steer_fast_bench.reproduce.train import supervised_tokens

    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    assert supervised_tokens(labels) == 4  # the first position is never a target


@pytest.mark.parametrize("name", ["loreft", "loreft_last"])
def test_loreft_runs_on_gemma3_through_its_stand_in(name):
    """pyvene has no module table for Gemma 3: baselines gives it Gemma 2's (the same layout);
    LoReFT then trains (its rotation moves) and generates on a tiny Gemma3ForCausalLM."""
    pytest.importorskip("pyreft")
    from steer_fast_bench.reproduce.data import collate, encode_example, encode_prompts
    from steer_fast_bench.reproduce.tasks import make_task
    from steer_fast_bench.reproduce.train import train

    model = tiny_causal_lm("gemma3_text")
    model.config.max_position_embeddings = 512
    tokenizer = char_tokenizer()
    adapted = methods.METHODS[name].build(model, tokenizer.pad_token_id)
    before = [p.detach().clone() for p in adapted.parameters]
    splits = make_task("listops", train_size=4, validation_size=0, test_size=2, max_tokens=6)
    settings = TrainSettings(
        steps=1,
        batch_size=2,
        grad_accum=1,
        learning_rate=1e-2,
        schedule="constant",
        warmup_ratio=0.0,
        seed=0,
        measure_memory=False,
    )
    rows = [encode_example(e, tokenizer) for e in splits.train]
    train(adapted, rows, lambda b: collate(b, tokenizer.pad_token_id), settings, progress=False)
    assert any(not torch.equal(p.detach(), old) for p, old in zip(adapted.parameters, before))
    prompts = encode_prompts(splits.test, tokenizer)
    with torch.inference_mode():
        new = adapted.generate(prompts["input_ids"], prompts["attention_mask"], 3)
    assert new.shape == (2, 3)
