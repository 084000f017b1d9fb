"""Inference suite: prefill latency and decode time per token with the KV cache, per method.

Prefill: one forward over the [batch, seq_len] prompt with ``use_cache=True`` (and
``logits_to_keep=1`` where the model takes it, as ``generate`` does). Decode: from a fresh
prefill (not timed), ``decode_tokens`` greedy steps of one token each through the cache; the
time is reported per token. Everything runs under ``torch.inference_mode`` in eval mode, with
the same prompt for every method. Steering methods act on every position, decoded tokens
included (LoReFT too: each call intervenes on every position it is given). With
``settings.interleave`` the methods' prefills, then their decodes, are timed in rounds.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .context import RunContext
from .methods import Candidate
from .model_suite import ModelSuite, Phase
from .timing import Call


def takes_logits_to_keep(candidate: Candidate) -> bool:
    """Whether the wrapped transformers model accepts ``logits_to_keep``."""
    for module in candidate.module.modules():
        if hasattr(module, "generate") and hasattr(module, "config"):
            forward = getattr(type(module), "forward", None)
            if forward is not None and "logits_to_keep" in inspect.signature(forward).parameters:
                return True
    return False


def prepare_generation(
    ctx: RunContext, candidate: Candidate, prompt: torch.Tensor
) -> tuple[list[Phase], list[Any]]:
    """The prefill, and the decode steps from a fresh (untimed) prefill, to time."""
    candidate.module.eval()
    prefill_kwargs = {"logits_to_keep": 1} if takes_logits_to_keep(candidate) else {}
    steps = ctx.settings.decode_tokens

    def prefill():
        return candidate.forward(input_ids=prompt, use_cache=True, **prefill_kwargs)

    def decode(output):
        for _ in range(steps):
            token = output.logits[:, -1:].argmax(dim=-1)
            output = candidate.forward(
                input_ids=token, past_key_values=output.past_key_values, use_cache=True
            )
        return output

    phases = [
        Phase("prefill", Call(prefill), prompt.numel()),
        Phase("decode", Call(decode, setup=prefill), prompt.shape[0], steps),
    ]
    return phases, [candidate.module, prompt]


INFERENCE_SUITE = ModelSuite(
    "inference",
    ("prefill", "decode"),
    prepare_generation,
    lambda plans: plans.inference,
    mode=torch.inference_mode,
)
