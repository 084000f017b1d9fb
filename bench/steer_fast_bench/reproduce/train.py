"""The training loop every method of ``steer-fast reproduce`` goes through.

One optimizer step takes ``grad_accum`` micro-batches of ``batch_size`` examples; the loss of the
step is the mean over all supervised tokens of those micro-batches (each micro-batch's mean loss
weighted by its share of the tokens, as transformers' Trainer does when it knows the number of
items in the batch). Then the gradients are clipped to norm 1 (the Trainer's default), AdamW
(weight decay 0) steps and the scheduler (transformers' ``get_scheduler``, warmup
``ceil(warmup_ratio * steps)`` steps) moves the learning rate.

The data order depends on the seed only: a stream of permutations of the training set (a new
one per epoch, from a ``torch.Generator`` seeded with the seed) cut into micro-batches, so every
method sees the same examples in the same order at every step.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapted import Adapted, Rate

IGNORE_INDEX = -100
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class TrainSettings:
    """How one run trains.

    Attributes:
        steps: optimizer steps.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step.
        learning_rate: the peak learning rate: one number, or one per part of a joint model
            ({"lora": .., "steering": ..}, ``Adapted.optimizer_groups``).
        schedule: transformers' scheduler name ("linear", "cosine").
        warmup_ratio: the fraction of the steps used for warmup.
        seed: the data order's seed.
        measure_memory: measure the peak memory of one optimizer step (the second, or the only
            one) with the profiler; that step is left out of the median time when there are
            others.
    """

    steps: int
    batch_size: int
    grad_accum: int
    learning_rate: Rate
    schedule: str
    warmup_ratio: float
    seed: int
    measure_memory: bool = True


@dataclass
class StepPlan:
    """The micro-batches of one optimizer step (indices into the training set), and whether an
    epoch starts at it."""

    micro_batches: list[list[int]]
    epoch_start: bool


@dataclass
class TrainResult:
    """What a run's training produced.

    Attributes:
        losses: the loss of every optimizer step.
        step_seconds: the wall time of every optimizer step.
        seconds_per_step: the median of ``step_seconds`` (without the profiled step when there
            are others).
        peak_memory_bytes: the peak memory of the profiled step, or None.
        epochs: how many passes over the training set the steps made.
        learning_rates: the learning rate of every optimizer step; with one optimizer group per
            part, a list per part ({"lora": [...], "steering": [...]}).
    """

    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    seconds_per_step: float = math.nan
    peak_memory_bytes: int | None = None
    epochs: float = 0.0
    learning_rates: list[float] | dict[str, list[float]] = field(default_factory=list)


def data_order(n_examples: int, settings: TrainSettings) -> list[StepPlan]:
    """The micro-batches of every optimizer step, from the seed alone (see the module
    docstring)."""
    if n_examples < 1:
        raise ValueError(f"train_size must be >= 1 to train, got {n_examples}")
    generator = torch.Generator().manual_seed(settings.seed)
    stream: list[int] = []
    epoch_starts: set[int] = set()
    needed = settings.steps * settings.grad_accum * settings.batch_size
    while len(stream) < needed:
        epoch_starts.add(len(stream))
        stream += torch.randperm(n_examples, generator=generator).tolist()
    plans, per_step = [], settings.grad_accum * settings.batch_size
    for step in range(settings.steps):
        start = step * per_step
        batches = [
            stream[start + i * settings.batch_size : start + (i + 1) * settings.batch_size]
            for i in range(settings.grad_accum)
        ]
        starts = any(start <= s < start + per_step for s in epoch_starts)
        plans.append(StepPlan(batches, starts))
    return plans


def supervised_tokens(labels: torch.Tensor) -> int:
    """The tokens a causal LM loss averages over: labels after the shift that are not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def train(
    adapted: Adapted,
    examples: Sequence[dict[str, list[int]]],
    collate,
    settings: TrainSettings,
    *,
    progress: bool = True,
    description: str = "train",
    after_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``adapted`` on the encoded ``examples`` (``data.encode_example`` rows);
    ``collate(rows) -> batch`` pads them. ``after_step(steps done)`` is called after every
    optimizer step, outside the step's timing (the validation curve evaluates there; the
    module is put back in training mode after it). Returns the losses, times and peak
    memory."""
    from transformers import get_scheduler

    if not adapted.parameters:
        raise ValueError("the method has no trainable parameters")
    plans = data_order(len(examples), settings)
    groups = adapted.optimizer_groups(settings.learning_rate)
    optimizer = torch.optim.AdamW(groups, lr=_first_rate(settings.learning_rate), weight_decay=0.0)
    scheduler = get_scheduler(
        settings.schedule,
        optimizer,
        num_warmup_steps=math.ceil(settings.warmup_ratio * settings.steps),
        num_training_steps=settings.steps,
    )
    device = adapted.parameters[0].device
    profiled = min(1, settings.steps - 1) if settings.measure_memory else -1
    result = TrainResult(
        epochs=settings.steps * settings.grad_accum * settings.batch_size / len(examples)
    )
    adapted.module.train()

    def optimizer_step(plan: StepPlan) -> float:
        batches = [
            {k: v.to(device) for k, v in collate([examples[i] for i in b]).items()}
            for b in plan.micro_batches
        ]
        total_tokens = max(1, sum(supervised_tokens(b["labels"]) for b in batches))
        step_loss = 0.0
        for batch in batches:
            share = supervised_tokens(batch["labels"]) / total_tokens
            loss = adapted.loss(batch)
            if share > 0:
                (loss * share).backward()
                step_loss += float(loss.detach()) * share
        nn.utils.clip_grad_norm_(adapted.parameters, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return step_loss

    bar = _progress(settings.steps, description, progress)
    try:
        for step, plan in enumerate(plans):
            if adapted.before_step is not None:
                adapted.before_step(step, plan.epoch_start)
            _record_rates(result, groups, scheduler.get_last_lr())
            start = time.perf_counter()
            if step == profiled:
                from ..benchmark.memory import measure_peak_memory

                losses: list[float] = []
                result.peak_memory_bytes = measure_peak_memory(
                    functools.partial(lambda p, out: out.append(optimizer_step(p)), plan, losses),
                    device,
                    resident=[adapted.module, optimizer, *adapted.parameters],
                )
                loss = losses[0]
            else:
                loss = optimizer_step(plan)
            result.step_seconds.append(time.perf_counter() - start)
            result.losses.append(loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            if after_step is not None:
                after_step(step + 1)
                adapted.module.train()
    finally:
        if bar is not None:
            bar.close()
        adapted.module.eval()
    timed = [s for i, s in enumerate(result.step_seconds) if i != profiled] or result.step_seconds
    result.seconds_per_step = statistics.median(timed)
    return result


def _first_rate(rate: Rate) -> float:
    return rate if not isinstance(rate, dict) else next(iter(rate.values()))


def _record_rates(result: TrainResult, groups: list[dict], rates: list[float]) -> None:
    """Append this step's learning rate: one list for one group, a list per named group."""
    if len(groups) == 1:
        result.learning_rates.append(rates[0])
        return
    if not isinstance(result.learning_rates, dict):
        result.learning_rates = {}
    for index, (group, rate) in enumerate(zip(groups, rates)):
        result.learning_rates.setdefault(group.get("name", f"group {index}"), []).append(rate)


def _progress(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step", leave=False, dynamic_ncols=True)
