"""Encoding, batching and loading examples for steer-fast reproduce."""

from __future__ import annotations

import csv
import functools
import json

import pytest
import torch

from steer_fast_bench.reproduce.data import (
    SupervisedDataset,
    collate,
    encode_example,
    encode_prompts,
)
from steer_fast_bench.reproduce.tasks import (
    ARITHMETIC_PROMPT,
    BOOLEAN_PROMPT,
    LISTOPS_PROMPT,
    Example,
    load_task,
    make_task,
)

from tiny_models import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, char_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def examples():
    return make_task("listops", train_size=6, validation_size=0, test_size=1, seed=5).train


def test_encode_example_masks_exactly_the_prompt(tokenizer, examples):
    for example in examples:
        row = encode_example(example, tokenizer)
        prompt_ids = tokenizer(example.prompt)["input_ids"]
        n = len(prompt_ids)
        assert prompt_ids[0] == BOS_TOKEN_ID
        assert row["input_ids"][:n] == prompt_ids
        assert row["labels"][:n] == [-100] * n
        assert row["labels"][n:] == row["input_ids"][n:]
        assert -100 not in row["labels"][n:]
        assert row["input_ids"][-1] == EOS_TOKEN_ID
        assert tokenizer.decode(row["input_ids"][n:-1]) == example.completion
        assert BOS_TOKEN_ID not in row["input_ids"][n:]  # no special tokens on the completion
        assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_encode_example_errors(tokenizer, examples):
    length = len(encode_example(examples[0], tokenizer)["input_ids"])
    assert len(encode_example(examples[0], tokenizer, max_length=length)["input_ids"]) == length
    with pytest.raises(ValueError, match="max_length"):
        encode_example(examples[0], tokenizer, max_length=length - 1)
    no_eos = char_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="eos"):
        encode_example(examples[0], no_eos)


def test_dataset_keeps_order_and_returns_copies(tokenizer, examples):
    dataset = SupervisedDataset(examples, tokenizer)
    assert len(dataset) == len(examples)
    for i, example in enumerate(examples):
        assert dataset[i] == encode_example(example, tokenizer)
    dataset[0]["labels"].clear()
    assert dataset[0]["labels"]


def test_collate_right_pads(tokenizer, examples):
    dataset = SupervisedDataset(examples[:3], tokenizer)
    rows = [dataset[i] for i in range(3)]
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=3, collate_fn=functools.partial(collate, pad_token_id=PAD_TOKEN_ID)
    )
    batch = next(iter(loader))
    longest = max(len(row["input_ids"]) for row in rows)
    assert len({len(row["input_ids"]) for row in rows}) > 1  # the padding is exercised
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (3, longest) and batch[key].dtype == torch.long
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert batch["labels"][i, :n].tolist() == row["labels"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (longest - n)
        assert (batch["input_ids"][i, n:] == PAD_TOKEN_ID).all()
        assert (batch["labels"][i, n:] == -100).all()


def test_collate_errors(tokenizer, examples):
    row = encode_example(examples[0], tokenizer)
    with pytest.raises(ValueError, match="batch"):
        collate([], PAD_TOKEN_ID)
    with pytest.raises(ValueError, match="pad_token_id"):
        collate([row], None)
    with pytest.raises(ValueError, match="labels"):
        collate([{**row, "labels": row["labels"][:-1]}], PAD_TOKEN_ID)


def test_encode_prompts_left_pads(tokenizer, examples):
    batch = encode_prompts(examples[:3], tokenizer)
    encoded = [tokenizer(e.prompt)["input_ids"] for e in examples[:3]]
    longest = max(map(len, encoded))
    assert len(set(map(len, encoded))) > 1
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, longest)
    for i, ids in enumerate(encoded):
        pad = longest - len(ids)
        assert batch["input_ids"][i].tolist() == [PAD_TOKEN_ID] * pad + ids
        assert batch["attention_mask"][i].tolist() == [0] * pad + [1] * len(ids)
    assert encode_prompts([examples[0].prompt], tokenizer)["input_ids"][0].tolist() == encoded[0]


def test_left_padded_generation_matches_one_prompt_at_a_time(tokenizer, examples):
    model = tiny_causal_lm("llama")
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD_TOKEN_ID)
    batch = encode_prompts(examples[:3], tokenizer)
    with torch.no_grad():
        together = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1] :]
        for i, example in enumerate(examples[:3]):
            alone = encode_prompts([example], tokenizer)
            single = model.generate(**alone, **settings)[0, alone["input_ids"].shape[1] :]
            assert together[i].tolist() == single.tolist()


def test_encode_prompts_errors(tokenizer, examples):
    with pytest.raises(ValueError, match="examples"):
        encode_prompts([], tokenizer)
    no_pad = char_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="pad"):
        encode_prompts(examples[:1], no_pad)


# --- loading -----------------------------------------------------------------------------------


def listops_rows(count: int, start: int = 0) -> list[dict]:
    return [
        {
            "Source": f"[SM {i % 10} {i // 10 % 10} [MAX 1 {i % 7} ] ]",
            "Target": (i % 10 + i // 10 % 10 + max(1, i % 7)) % 10,
        }
        for i in range(start, start + count)
    ]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_csv(path, rows, delimiter=","):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)


def test_load_prompt_completion_jsonl_round_trips_make_task(tmp_path):
    made = make_task("boolean_expressions", train_size=8, validation_size=3, test_size=4)
    for split in ("train", "validation", "test"):
        rows = [{"prompt": e.prompt, "completion": e.completion} for e in getattr(made, split)]
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    loaded = load_task(str(tmp_path))
    assert (loaded.train, loaded.validation, loaded.test) == (
        made.train,
        made.validation,
        made.test,
    )
    assert loaded.name == tmp_path.name


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_load_listops_source_target_file_carves_disjoint_splits(tmp_path, suffix, delimiter):
    rows = listops_rows(50)
    write_csv(tmp_path / f"listops{suffix}", rows, delimiter)
    loaded = load_task(str(tmp_path / f"listops{suffix}"), seed=2)
    assert (len(loaded.train), len(loaded.validation), len(loaded.test)) == (40, 5, 5)
    prompts = [
        {e.prompt for e in split} for split in (loaded.train, loaded.validation, loaded.test)
    ]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    by_source = {row["Source"]: str(row["Target"]) for row in rows}
    for example in loaded.train + loaded.test:
        source = example.prompt[len(LISTOPS_PROMPT.split("{")[0]) : -1]
        assert example.prompt == LISTOPS_PROMPT.format(expression=source)
        assert example.answer == by_source[source]
        assert example.completion == f"<answer>{example.answer}</answer>"
    sized = load_task(
        str(tmp_path / f"listops{suffix}"), train_size=10, validation_size=3, test_size=7, seed=2
    )
    assert (len(sized.train), len(sized.validation), len(sized.test)) == (10, 3, 7)
    assert sized == load_task(
        str(tmp_path / f"listops{suffix}"), train_size=10, validation_size=3, test_size=7, seed=2
    )
    assert sized != load_task(
        str(tmp_path / f"listops{suffix}"), train_size=10, validation_size=3, test_size=7, seed=3
    )


def test_load_big_bench_json_and_answer_from_completion(tmp_path):
    bbh = {
        "examples": [
            {"input": "not ( True ) and ( True ) is", "target": "False"},
            {"input": "((-1 + 2) * (3 - -4)) =", "target": "7"},
            {"input": "True or False is", "target": "True"},
        ]
    }
    (tmp_path / "bbh.json").write_text(json.dumps(bbh), encoding="utf-8")
    loaded = load_task(str(tmp_path / "bbh.json"), validation_size=1, test_size=1)
    examples = {e.answer: e for e in loaded.train + loaded.validation + loaded.test}
    assert examples["False"].prompt == BOOLEAN_PROMPT.format(expression="not ( True ) and ( True )")
    assert examples["7"].prompt == ARITHMETIC_PROMPT.format(expression="((-1 + 2) * (3 - -4))")
    write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "P", "completion": "<answer> 5 </answer>"}] * 3)
    assert (
        load_task(str(tmp_path / "pc.jsonl"), validation_size=0, test_size=0).train
        == (Example("P", "<answer> 5 </answer>", "5"),) * 3
    )


def test_load_hub_dataset_id(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config=None):
        calls.append((name, config))
        if name == "fengyang0317/listops-64":
            return {
                "train": listops_rows(20),
                "validation": listops_rows(4, 20),
                "test": listops_rows(6, 24),
            }
        return {
            "test": [
                {"input": f"{'not ' * i}True is", "target": str(i % 2 == 0)} for i in range(30)
            ]
        }

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    listops = load_task("fengyang0317/listops-64", train_size=12)
    assert (len(listops.train), len(listops.validation), len(listops.test)) == (12, 4, 6)
    assert listops.name == "fengyang0317/listops-64"
    bbh = load_task("lukaemon/bbh:boolean_expressions", test_size=5)
    assert calls == [("fengyang0317/listops-64", None), ("lukaemon/bbh", "boolean_expressions")]
    assert len(bbh.test) == 5 and len(bbh.validation) == 3  # 10% of the 30 rows
    assert bbh.test[0].prompt.startswith(BOOLEAN_PROMPT.split("{")[0])


def test_load_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    saved = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(listops_rows(10)),
            "validation": datasets.Dataset.from_list(listops_rows(3, 10)),
            "test": datasets.Dataset.from_list(listops_rows(4, 13)),
        }
    )
    saved.save_to_disk(str(tmp_path / "listops"))
    loaded = load_task(str(tmp_path / "listops"))
    assert (len(loaded.train), len(loaded.validation), len(loaded.test)) == (10, 3, 4)
    assert loaded.test[0].answer == str(listops_rows(1, 13)[0]["Target"])


@pytest.mark.parametrize(
    "make_source, kwargs, match",
    [
        (lambda p: str(p / "missing.jsonl"), {}, "source"),
        (lambda p: "./no/such/folder", {}, "source"),
        (lambda p: "not a dataset id!", {}, "source"),
        (lambda p: "", {}, "source"),
        (lambda p: str(p), {}, "source"),  # an empty folder
        (lambda p: str(p / "rows.jsonl"), {"train_size": 100}, "train_size"),
        (lambda p: str(p / "rows.jsonl"), {"test_size": -1}, "test_size"),
        (lambda p: str(p / "rows.jsonl"), {"validation_size": 19}, "validation_size"),
        (lambda p: str(p / "bad.jsonl"), {}, "keys"),
        (lambda p: str(p / "rows.txt"), {}, "format"),
    ],
)
def test_load_errors(tmp_path, make_source, kwargs, match):
    source = make_source(tmp_path)
    if source.startswith(str(tmp_path)) and source != str(tmp_path):
        write_jsonl(tmp_path / "rows.jsonl", listops_rows(20))
        write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "label": 1}])
        (tmp_path / "rows.txt").write_text("[MAX 1 2 ]\t2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_task(source, **kwargs)
