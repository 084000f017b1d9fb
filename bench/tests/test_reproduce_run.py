"""``steer-fast reproduce`` end to end on a tiny random Llama and a character tokenizer: every
method for 3 steps, resuming after an interrupted run, skipped methods, and bad input (exit code 2
before anything trains)."""

from __future__ import annotations

import argparse
import json
import math
import string
import subprocess
import sys

import pytest
import torch

from tiny_models import tiny_causal_lm

pytest.importorskip("peft")
from steer_fast_bench import baselines  # noqa: E402
from steer_fast_bench.reproduce import cli, methods, runner  # noqa: E402
from steer_fast_bench.reproduce.train import TrainSettings, data_order  # noqa: E402

# Methods whose model is the base model at initialisation (B = 0, U = 0, zero vectors): with the
# same data order their first training loss is the same number.
IDENTITY_AT_INIT = (
    "full",
    "lora",
    "steer_silu",
    "steer_identity",
    "steer_vector",
    "steer_mlp",
    "steer_attn",
    "joint_orth",
    "joint_plain",
)
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
]


def char_tokenizer():
    """A character-level fast tokenizer covering printable ASCII and the prompts' ellipsis, with
    the tiny models' pad, bos and eos ids (0, 1, 2); decoding gives back the text exactly."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as token_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for character in [c for c in string.printable if c not in "\t\r\x0b\x0c"] + ["…"]:
        vocab.setdefault(character, len(vocab))
    backend = Tokenizer(token_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


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
    return json.loads((out / runner.RESULTS_FILE).read_text())


def test_every_method_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    grid = ["--lr-grid", "full=1e-4,1e-3", "lora=1e-3", "loreft=1e-3,4e-3"]
    assert run_cli([*SMALL, "--model", str(tiny_model_dir), "--out", str(out), *grid]) == 0
    results = load(out)
    runs = {(r["method"], r["learning_rate"]): r for r in results["runs"]}
    expected = {
        ("base", None),
        ("full", 1e-4),
        ("full", 1e-3),
        ("lora", 1e-3),
        ("loreft", 1e-3),
        ("loreft", 4e-3),
    }
    expected |= {
        (m.name, m.learning_rates[0])
        for m in methods.METHODS.values()
        if m.trains and m.name not in ("full", "lora", "loreft")
    }
    assert set(runs) == expected
    assert not results["skipped"]
    for (method, _), run in runs.items():
        test = run["test"]
        assert test["total"] == 4 and len(test["outputs"]) == 4
        assert test["accuracy"] == sum(test["marks"]) / 4
        assert test["stderr"] == pytest.approx(
            math.sqrt(test["accuracy"] * (1 - test["accuracy"]) / 4)
        )
        if method == "base":
            assert run["train"] is None and run["trainable_parameters"] == 0
            continue
        train = run["train"]
        assert train["steps"] == 3 and len(train["losses"]) == 3
        assert all(math.isfinite(loss) for loss in train["losses"])
        assert train["seconds_per_step"] > 0 and train["peak_memory_bytes"] > 0
        assert (run.get("validation") is not None) == (method in ("full", "loreft"))
    # The same data order and a model that is the base model at init: the same first loss.
    first = [
        runs[
            (
                m,
                methods.METHODS[m].learning_rates[0]
                if m not in ("full", "lora")
                else {"full": 1e-4, "lora": 1e-3}[m],
            )
        ]["train"]["losses"][0]
        for m in IDENTITY_AT_INIT
    ]
    assert first == pytest.approx([first[0]] * len(first), rel=1e-5)
    share = {method: run["trainable_percent"] for (method, _), run in runs.items()}
    assert share["full"] == 100.0
    assert share["steer_vector"] < share["steer_silu"] < share["lora"] < share["joint_orth"] < 100
    # The paper's constraint projects at steps 0, 100, ...: at step 0 LoRA's B is zero, so in 3
    # steps it changes nothing and the constrained run is the unconstrained one.
    orth, plain = runs[("joint_orth", 2e-4)]["train"], runs[("joint_plain", 2e-4)]["train"]
    assert orth["projection_steps"] == [0] and plain["projection_steps"] == []
    assert orth["losses"] == plain["losses"]
    assert orth["down_projection_overlap"] > 0
    assert runs[("loreft", 1e-3)]["details"]["positions"] == "f7+l7"
    report = (out / "report.md").read_text()
    assert "joint_orth trains exactly as joint_plain does" in report
    assert "| method | trainable | listops |" in report
    assert "| task | method | s/step | peak memory | learning rate |" in report
    for png in ("accuracy.png", "loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    environment = results["environment"]
    assert set(environment["versions"]) >= {"torch", "transformers", "peft", "pyreft", "steer-fast"}
    assert environment["machine"]["cpu_count"] >= 1
    assert results["commands"][0].startswith("steer-fast --tasks listops")
    assert results["tasks"]["listops"]["test"] == 4


def test_resume_after_interruption(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = [
        *SMALL,
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
        "--no-memory",
        "--methods",
        "base",
        "steer_silu",
        "steer_vector",
    ]
    original = runner.run_one
    calls = []

    def interrupted(prepared, task, method, seed, rate, **kwargs):
        calls.append(method)
        if method == "steer_vector":
            raise KeyboardInterrupt
        return original(prepared, task, method, seed, rate, **kwargs)

    monkeypatch.setattr(runner, "run_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli(argv)
    first = load(out)
    assert [r["method"] for r in first["runs"]] == ["base", "steer_silu"]

    def counted(prepared, task, method, seed, rate, **kwargs):
        calls.append(method)
        return original(prepared, task, method, seed, rate, **kwargs)

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
    # Other result settings: refused, the file untouched.
    assert run_cli([*argv, "--steps", "4"]) == 2
    assert load(out)["runs"] == second["runs"]


def test_a_method_that_cannot_run_is_skipped_with_its_reason(tiny_model_dir, tmp_path, monkeypatch):
    def missing():
        raise baselines.MethodUnavailable(
            "pyreft cannot be imported: ImportError: No module named 'pyvene'"
        )

    monkeypatch.setattr(methods, "import_pyreft", missing)
    out = tmp_path / "out"
    argv = [
        *SMALL,
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
        "--no-memory",
        "--methods",
        "base",
        "loreft",
    ]
    assert run_cli(argv) == 0
    results = load(out)
    assert [r["method"] for r in results["runs"]] == ["base"]
    assert "No module named 'pyvene'" in results["skipped"]["loreft"]
    assert "loreft: pyreft cannot be imported" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "sudoku"], "tasks: unknown task 'sudoku'"),
        (["--methods", "steer_silu,dora"], "methods: unknown method 'dora'"),
        (["--lr-grid", "full=fast"], "lr_grid"),
        (["--lr-grid", "full"], "lr_grid: expected METHOD=LR"),
        (["--lr-grid", "full=-1e-4"], "lr_grid full: a learning rate must be finite and > 0"),
        (["--lr-grid", "dora=1e-4"], "lr_grid: unknown method 'dora'"),
        (["--lr-grid", "base=1e-4"], "lr_grid: base does not train"),
        (["--validation-size", "0"], "validation_size must be >= 1"),
        (["--steps", "0"], "steps must be an integer >= 1"),
        (["--seeds", "one"], "seeds must be integers"),
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


def test_orthogonality_frequency_reaches_the_joint_constraint(tiny_model_dir, tmp_path):
    """--orthogonality-frequency 1 projects before every step: the overlap O ends at zero and
    the run differs from the unconstrained one; it is a result setting, so resuming with
    another value is refused."""
    out = tmp_path / "out"
    argv = [
        *SMALL,
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
        "--methods",
        "joint_orth",
        "joint_plain",
    ]
    assert run_cli([*argv, "--orthogonality-frequency", "1"]) == 0
    results = load(out)
    runs = {r["method"]: r for r in results["runs"]}
    orth = runs["joint_orth"]
    assert orth["train"]["projection_steps"] == [0, 1, 2]
    assert orth["details"]["orthogonality"]["frequency"] == 1
    assert runs["joint_plain"]["details"]["orthogonality"]["constraint"] == "none"
    assert orth["train"]["losses"][2] != runs["joint_plain"]["train"]["losses"][2]
    assert results["settings"]["orthogonality_frequency"] == 1
    assert run_cli([*argv, "--orthogonality-frequency", "step"]) == 2


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
    config = methods.OrthogonalityConfig(frequency=frequency)
    steps = 25 if frequency != 100 else 201
    assert [s for s in range(steps) if methods.down_projection_due(config, s, s % 10 == 0)] == due
    none = methods.OrthogonalityConfig(constraint="none")
    assert not any(methods.down_projection_due(none, s, True) for s in range(5))


def test_loreft_positions_follow_pyreft():
    pyreft = pytest.importorskip("pyreft")
    for length in (3, 14, 40):
        ours = methods.loreft_positions(length)
        theirs = pyreft.get_intervention_locations(
            last_position=length, first_n=7, last_n=7, num_interventions=1, share_weights=True
        )[0]
        assert sorted(set(ours)) == sorted(set(p for p in theirs if p >= 0))
        assert len(ours) == 14
    assert methods.loreft_positions(40, offset=5) == [p + 5 for p in methods.loreft_positions(40)]


@pytest.mark.parametrize("name", [m.name for m in methods.METHODS.values() if m.trains])
def test_every_method_trains_its_own_parameters_only(name):
    """Two optimizer steps change every trainable tensor (the second reaches the LoRA A and the
    adapter D that see no gradient while B and U are zero) and no other."""
    from steer_fast_bench.reproduce.data import collate, encode_example
    from steer_fast_bench.reproduce.tasks import make_task
    from steer_fast_bench.reproduce.train import train

    if name == "loreft":
        pytest.importorskip("pyreft")
    model = tiny_causal_lm("llama")
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    adapted = methods.METHODS[name].build(model, tokenizer.pad_token_id)
    trainable = {id(p) for p in adapted.parameters}
    before = [p.detach().clone() for p in adapted.parameters]
    frozen = [(p, p.detach().clone()) for p in model.parameters() if id(p) not in trainable]
    assert adapted.trainable_parameters > 0 and (name == "full") == (not frozen)
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
    assert len(result.losses) == 2 and result.learning_rates[0] == 1e-2
    unchanged = [
        i
        for i, (p, old) in enumerate(zip(adapted.parameters, before))
        if torch.equal(p.detach(), old)
    ]
    assert not unchanged, f"{name}: trainable tensors {unchanged} did not change"
    assert all(torch.equal(p.detach(), old) for p, old in frozen)


def test_importing_steer_fast_does_not_import_reproduce():
    code = "import sys, steer_fast; assert 'steer_fast_bench.reproduce' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_loss_weights_micro_batches_by_their_tokens():
    from steer_fast_bench.reproduce.train import supervised_tokens

    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    assert supervised_tokens(labels) == 4  # the first position is never a target
