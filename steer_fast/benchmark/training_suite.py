"""Training-step suite: forward, backward and AdamW on the same model and batch, per method.

One step is ``loss = model(input_ids, labels=input_ids).loss``, ``loss.backward()``,
``optimizer.step()``, ``optimizer.zero_grad(set_to_none=True)``. The optimizer is
``AdamW(trainable, lr=1e-4, weight_decay=0.0)`` for every method. Weight decay is off because
pyreft's LoReFT keeps the diagonal of its orthogonal parametrization at +-1 through an integer
cast: decoupled weight decay shrinks it below 1 and turns the rotation into zeros after the
first step (Hugging Face's Trainer, which pyreft trains with, defaults to weight_decay=0 too).

Before timing, one step checks that every trainable parameter receives a finite gradient, so
a method that silently stopped training fails its row instead of posting a fast time.
"""

from __future__ import annotations

from typing import Any

import torch

from .context import RunContext
from .methods import Candidate
from .model_suite import ModelSuite, Phase
from .timing import Call

LEARNING_RATE = 1e-4


def make_optimizer(parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
    """AdamW over the trainable parameters, or None when there are none (the floor)."""
    if not parameters:
        return None
    return torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=0.0)


def check_gradients(candidate: Candidate, tokens: torch.Tensor) -> None:
    """One forward and backward; every trainable parameter must get a finite gradient.

    Raises:
        RuntimeError: naming how many trainable tensors got none or a non-finite one.
    """
    output = candidate.forward(input_ids=tokens, labels=tokens, use_cache=False)
    if not torch.isfinite(output.loss):
        raise RuntimeError(f"the loss is not finite: {output.loss.item()}")
    output.loss.backward()
    missing = sum(p.grad is None for p in candidate.trainable)
    broken = sum(
        p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in candidate.trainable
    )
    for parameter in candidate.trainable:
        parameter.grad = None
    if missing or broken:
        raise RuntimeError(
            f"{missing} trainable tensors got no gradient and {broken} a non-finite one"
        )


def prepare_step(
    ctx: RunContext, candidate: Candidate, tokens: torch.Tensor
) -> tuple[list[Phase], list[Any]]:
    """The training step to time, after the gradient check."""
    candidate.module.train()
    optimizer = make_optimizer(candidate.trainable)
    check_gradients(candidate, tokens)

    def step() -> None:
        output = candidate.forward(input_ids=tokens, labels=tokens, use_cache=False)
        output.loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return [Phase(None, Call(step), tokens.numel())], [candidate.module, optimizer, tokens]


TRAINING_SUITE = ModelSuite("training", (None,), prepare_step, lambda plans: plans.step)
