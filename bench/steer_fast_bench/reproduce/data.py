"""Examples from files and the hub, and examples as token ids: training rows, batches, prompts.

Training rows are ``prompt_ids + completion_ids + [eos]`` with the prompt masked out of the
labels (-100), the prompt encoded with the tokenizer's special tokens (as at generation) and the
completion without them. Batches are right-padded; prompts for generation are left-padded, so
that every prompt ends at the same column and generated tokens start right after it.

Files (``load_splits``): JSON Lines (``.jsonl``), JSON (``.json``: a list of rows, BIG-Bench's
``{"examples": [...]}``, or ``{"train": [...], "validation": [...], "test": [...]}``), CSV
(``.csv``) or TSV (``.tsv``), one row per example, in any of three forms:

- ``prompt`` and ``completion`` (and optionally ``answer``; otherwise the text inside the
  completion's ``<answer>`` tag);
- ``Source`` and ``Target``, the released ListOps data (e.g. ``fengyang0317/listops-64``),
  filled into the published ListOps template;
- ``input`` and ``target``, BIG-Bench Hard's form (a trailing ``is`` or ``=`` is dropped): the
  boolean template when the target is True or False, the arithmetic one when it is an integer.

A folder holds ``train``, ``validation`` (or ``valid`` / ``val`` / ``dev``) and ``test`` files in
those formats, or is a dataset saved with ``datasets``' ``save_to_disk``. Anything else that
looks like ``owner/name`` (or ``owner/name:config``) is a Hugging Face dataset id.

Missing splits are carved from train (or from the only split there is) with the seeded shuffle:
10% each for validation and test unless their sizes are given. A requested size takes a seeded
sample of that split.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .tasks import (
    ARITHMETIC_PROMPT,
    BOOLEAN_PROMPT,
    LISTOPS_PROMPT,
    Example,
    TaskSplits,
    extract_answer,
    make_example,
)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}
_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(:[\w.-]+)?")


# --- token ids ---------------------------------------------------------------------------------


def encode_example(
    example: Example, tokenizer, max_length: int | None = None
) -> dict[str, list[int]]:
    """Returns ``{"input_ids", "attention_mask", "labels"}`` for one training example.

    input_ids is prompt_ids + completion_ids + [eos]; labels is -100 over the prompt and equal to
    input_ids after it. ValueError when the tokenizer has no eos token or the row is longer than
    max_length (a truncated row would lose its answer).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; set tokenizer.eos_token")
    prompt_ids = list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])
    completion_ids = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
    input_ids = prompt_ids + completion_ids + [eos]
    if max_length is not None and len(input_ids) > max_length:
        raise ValueError(
            f"max_length={max_length} is shorter than an example of {len(input_ids)} tokens "
            f"(prompt ending {example.prompt[-40:]!r})"
        )
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [-100] * len(prompt_ids) + completion_ids + [eos],
    }


class SupervisedDataset(torch.utils.data.Dataset):
    """Encoded training rows (``encode_example``), in the order of ``examples``."""

    def __init__(self, examples: Iterable[Example], tokenizer, max_length: int | None = None):
        self.rows = [encode_example(example, tokenizer, max_length) for example in examples]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        """Returns a copy of row ``index``."""
        return {key: list(values) for key, values in self.rows[index].items()}


def collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Returns the rows right-padded to the longest: input_ids with pad_token_id,
    attention_mask with 0, labels with -100 (int64 tensors of shape (rows, longest))."""
    if not batch:
        raise ValueError("batch is empty")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise ValueError(f"pad_token_id must be an integer, got {pad_token_id!r}")
    longest = max(len(row["input_ids"]) for row in batch)
    fills = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
    out = {
        key: torch.full((len(batch), longest), fill, dtype=torch.long)
        for key, fill in fills.items()
    }
    for i, row in enumerate(batch):
        length = len(row["input_ids"])
        for key in fills:
            if len(row[key]) != length:
                raise ValueError(
                    f"batch row {i}: {key} has {len(row[key])} entries, input_ids {length}"
                )
            out[key][i, :length] = torch.tensor(row[key], dtype=torch.long)
    return out


def encode_prompts(examples: Sequence[Example | str], tokenizer) -> dict[str, torch.Tensor]:
    """Returns ``{"input_ids", "attention_mask"}`` for generation: each prompt encoded as in
    ``encode_example``, left-padded with the tokenizer's pad token (int64, (prompts, longest))."""
    if len(examples) == 0:
        raise ValueError("examples is empty")
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("tokenizer has no pad_token_id; set tokenizer.pad_token")
    encoded = [
        list(
            tokenizer(e.prompt if isinstance(e, Example) else e, add_special_tokens=True)[
                "input_ids"
            ]
        )
        for e in examples
    ]
    longest = max(map(len, encoded))
    input_ids = torch.full((len(encoded), longest), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for i, ids in enumerate(encoded):
        input_ids[i, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, longest - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# --- examples from files and the hub -----------------------------------------------------------


def row_to_example(row: dict[str, Any]) -> Example:
    """Returns the Example for one row in any of the module docstring's three forms."""
    fields = {str(key).lower(): value for key, value in row.items()}
    if "prompt" in fields and "completion" in fields:
        prompt, completion = str(fields["prompt"]), str(fields["completion"])
        answer = fields.get("answer")
        answer = extract_answer(completion) if answer in (None, "") else str(answer).strip()
        if not answer:
            raise ValueError(f"row has no answer and no <answer> tag in its completion: {row!r}")
        return Example(prompt, completion, answer)
    if "source" in fields and "target" in fields:
        return make_example(LISTOPS_PROMPT, str(fields["source"]).strip(), _answer(fields, row))
    if "input" in fields and "target" in fields:
        expression = re.sub(r"\s+(is|=)\s*$", "", str(fields["input"]).strip())
        answer = _answer(fields, row)
        if answer in ("True", "False"):
            return make_example(BOOLEAN_PROMPT, expression, answer)
        if re.fullmatch(r"-?[0-9]+", answer):
            return make_example(ARITHMETIC_PROMPT, expression, answer)
        raise ValueError(f"target {answer!r} is neither True/False nor an integer: {row!r}")
    raise ValueError(
        f"row has none of prompt+completion, Source+Target, input+target: keys {sorted(row)}"
    )


def _answer(fields: dict[str, Any], row: dict[str, Any]) -> str:
    target = fields["target"]
    if isinstance(target, float) and target.is_integer():
        target = int(target)
    answer = str(target).strip()
    if not answer:
        raise ValueError(f"row has an empty target: {row!r}")
    return answer


def read_rows(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Returns the rows of one file: ``{"train": rows}``, or its own splits for a JSON object
    with train/validation/test keys. ValueError for an unknown suffix or a malformed file."""
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict) and "examples" in data:
            data = data["examples"]
        if isinstance(data, dict):
            splits = {_SPLIT_ALIASES.get(key, key): value for key, value in data.items()}
            if not set(splits) & set(SPLITS):
                raise ValueError(f"{path}: a JSON object needs train/validation/test or examples")
            return {name: list(splits[name]) for name in SPLITS if name in splits}
        rows = data
    elif suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    else:
        raise ValueError(f"{path}: unknown format; use one of {', '.join(_FILE_SUFFIXES)}")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path}: expected one object per row")
    return {"train": rows}


def _read_source(source: str) -> dict[str, list[dict[str, Any]]]:
    """Returns the rows of each split the source has."""
    path = Path(source).expanduser()
    if path.is_file():
        return read_rows(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            import datasets

            return _dataset_rows(datasets.load_from_disk(str(path)))
        found: dict[str, list[dict[str, Any]]] = {}
        for file in sorted(path.iterdir()):
            split = _SPLIT_ALIASES.get(file.stem.lower(), file.stem.lower())
            if split in SPLITS and file.suffix.lower() in _FILE_SUFFIXES:
                if split in found:
                    raise ValueError(f"source={source!r} has two files for split {split!r}")
                found[split] = read_rows(file)["train"]
        if not found:
            raise ValueError(
                f"source={source!r}: no train/validation/test "
                f"{'/'.join(_FILE_SUFFIXES)} files in the folder"
            )
        return found
    if path.suffix.lower() in _FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise ValueError(f"source={source!r} does not exist")
    if not _HUB_ID.fullmatch(source):
        raise ValueError(
            f"source={source!r} is neither a file, a folder nor a Hugging Face "
            f"dataset id (owner/name or owner/name:config)"
        )
    import datasets

    name, _, config = source.partition(":")
    return _dataset_rows(datasets.load_dataset(name, config or None))


def _dataset_rows(dataset) -> dict[str, list[dict[str, Any]]]:
    """Returns the rows of each split of a datasets DatasetDict (or of one Dataset, as train)."""
    if not hasattr(dataset, "keys"):
        return {"train": [dict(row) for row in dataset]}
    rows = {}
    for key in dataset.keys():
        split = _SPLIT_ALIASES.get(key, key)
        if split in rows:
            raise ValueError(f"dataset has two splits for {split!r}")
        rows[split] = [dict(row) for row in dataset[key]]
    return rows


def load_splits(
    source: str,
    *,
    train_size: int | None = None,
    validation_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> TaskSplits:
    """Loads the source's examples into train, validation and test (module docstring).

    Returns the TaskSplits, named after the source. ValueError naming the argument for a source
    that does not exist or cannot be read, or a size that is negative or above what is there.
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"source must be a path or dataset id, got {source!r}")
    sizes = {"train": train_size, "validation": validation_size, "test": test_size}
    for split, size in sizes.items():
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ValueError(f"{split}_size must be None or an integer >= 0, got {size!r}")
    raw = _read_source(source)
    examples = {name: [row_to_example(row) for row in rows] for name, rows in raw.items()}
    rng = random.Random(f"load:{seed}")
    if "train" not in examples:
        if len(examples) != 1:
            raise ValueError(f"source={source!r} has splits {sorted(examples)} but no train")
        examples = {"train": next(iter(examples.values()))}
    default = max(1, len(set(examples["train"])) // 10)  # 10% of the distinct examples
    for split in ("test", "validation"):
        if split not in examples:
            count = default if sizes[split] is None else sizes[split]
            examples[split] = _carve(examples, split, count, rng)
    chosen = {}
    for split in SPLITS:
        pool, size = examples[split], sizes[split]
        if size is not None and size > len(pool):
            raise ValueError(
                f"{split}_size={size} but source={source!r} has {len(pool)} {split} examples"
            )
        chosen[split] = tuple(pool if size is None else rng.sample(pool, size))
    name = Path(source).stem if Path(source).expanduser().exists() else source
    return TaskSplits(name, chosen["train"], chosen["validation"], chosen["test"])


def _carve(
    examples: dict[str, list[Example]], split: str, count: int, rng: random.Random
) -> list[Example]:
    """Removes a seeded sample of ``count`` distinct examples from examples["train"] (with their
    duplicates) and returns it."""
    pool = list(dict.fromkeys(examples["train"]))  # distinct examples, first-seen order
    if count > len(pool) - 1:
        raise ValueError(
            f"{split}_size={count}: only {len(pool)} distinct train examples to "
            f"carve {split} from (and train needs one)"
        )
    carved = rng.sample(pool, count)
    taken = set(carved)
    examples["train"] = [example for example in examples["train"] if example not in taken]
    return carved
