"""Accuracy by greedy generation, the same way for every method.

The prompts go in batches, left-padded (``data.encode_prompts``); each method generates at most
``tasks.MAX_NEW_TOKENS`` new tokens greedily; the new tokens are decoded without special tokens
and scored with ``tasks.is_correct`` (the first ``<answer>...</answer>`` against the gold
answer). Every accuracy comes with its binomial standard error sqrt(p (1 - p) / n).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .adapted import Adapted


def binomial_stderr(accuracy: float, n: int) -> float:
    """sqrt(p (1 - p) / n): the standard error of an accuracy p measured on n items (nan for
    n = 0)."""
    if n <= 0:
        return math.nan
    return math.sqrt(max(0.0, accuracy * (1.0 - accuracy)) / n)


@dataclass
class EvalResult:
    """The accuracy on one split.

    Attributes:
        correct: items answered correctly.
        total: items.
        seconds: wall time of the generation and scoring.
        outputs: the decoded generation of every item, in split order.
        marks: whether each item was correct, in split order.
    """

    correct: int
    total: int
    seconds: float
    outputs: list[str] = field(default_factory=list)
    marks: list[bool] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else math.nan

    @property
    def stderr(self) -> float:
        return binomial_stderr(self.accuracy, self.total)

    def to_dict(self) -> dict:
        """The JSON form stored in results.json."""
        return {
            "correct": self.correct,
            "total": self.total,
            "accuracy": self.accuracy,
            "stderr": self.stderr,
            "seconds": self.seconds,
            "outputs": self.outputs,
            "marks": self.marks,
        }


def evaluate(
    adapted: Adapted,
    examples: Sequence,
    tokenizer,
    *,
    batch_size: int,
    max_new_tokens: int | None = None,
    progress: bool = True,
    description: str = "eval",
) -> EvalResult:
    """Greedy generation on ``examples`` (``tasks.Example``) in batches of ``batch_size``,
    scored with ``tasks.is_correct``."""
    from .data import encode_prompts
    from .tasks import MAX_NEW_TOKENS, is_correct

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_new_tokens = MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    device = _device(adapted)
    result = EvalResult(0, len(examples), 0.0)
    bar = None
    if progress and examples:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(examples), desc=description, unit="item", leave=False, dynamic_ncols=True
        )
    start = time.perf_counter()
    adapted.module.eval()
    try:
        for first in range(0, len(examples), batch_size):
            chunk = examples[first : first + batch_size]
            prompts = encode_prompts(chunk, tokenizer)
            with torch.inference_mode():
                new_tokens = adapted.generate(
                    prompts["input_ids"].to(device),
                    prompts["attention_mask"].to(device),
                    max_new_tokens,
                )
            texts = tokenizer.batch_decode(new_tokens.cpu(), skip_special_tokens=True)
            for text, example in zip(texts, chunk):
                mark = bool(is_correct(text, example))
                result.outputs.append(text)
                result.marks.append(mark)
                result.correct += mark
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - start
    return result


def _device(adapted: Adapted) -> torch.device:
    for tensor in (*adapted.parameters, *adapted.module.parameters()):
        return tensor.device
    return torch.device("cpu")
