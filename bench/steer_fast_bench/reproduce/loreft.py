"""LoReFT for ``steer-fast reproduce``, through pyreft's own model for training and generation.

pyreft's reasoning recipe (examples/loreft, math and commonsense): LoReFT on the block output of
every layer, rank 8, one intervention per layer shared by all the positions it acts on, no
dropout, warmup ratio 0.1. The positions are a hyperparameter, as in the ReFT paper: "f7+l7"
(the first 7 and the last 7 prompt tokens, ReFT's best for GSM8K; method ``loreft``) or "last"
(the last prompt token, ReFT's default; method ``loreft_last``). The paper being reproduced
sweeps both after choosing the learning rate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..baselines import loreft_model
from .adapted import Adapted, eos_id

LOREFT_RANK = 8
LOREFT_FIRST_POSITIONS = 7
LOREFT_LAST_POSITIONS = 7
POSITIONS = ("f7+l7", "last")


def loreft_positions(prompt_length: int, offset: int = 0, positions: str = "f7+l7") -> list[int]:
    """The positions LoReFT intervenes on in a prompt of ``prompt_length`` tokens that starts at
    ``offset`` (left padding).

    "last": the last prompt token. "f7+l7": the first 7 and the last 7, at most half the prompt
    each (as pyreft's ``get_intervention_locations`` clamps them), padded to 14 by repeating the
    last position (intervening twice on one position writes the same value).
    """
    if positions == "last":
        return [offset + prompt_length - 1]
    if positions != "f7+l7":
        raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    first = min(LOREFT_FIRST_POSITIONS, prompt_length // 2)
    last = min(LOREFT_LAST_POSITIONS, prompt_length // 2)
    chosen = list(range(first)) + list(range(prompt_length - last, prompt_length))
    chosen = chosen or [prompt_length - 1]
    chosen += [chosen[-1]] * (LOREFT_FIRST_POSITIONS + LOREFT_LAST_POSITIONS - len(chosen))
    return [offset + p for p in chosen]


def prompt_lengths(labels: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
    """Prompt tokens of each right-padded training row: those before the first label."""
    lengths = []
    for row_labels, row_mask in zip(labels.tolist(), attention_mask.tolist()):
        supervised = [i for i, label in enumerate(row_labels) if label != -100]
        lengths.append(supervised[0] if supervised else sum(row_mask))
    return lengths


def build_loreft(positions: str) -> Callable[[nn.Module, int], Adapted]:
    """A builder of pyreft LoReFT (see the module docstring) at ``positions``."""
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")

    def build(model: nn.Module, pad_token_id: int) -> Adapted:
        reft = loreft_model(model, LOREFT_RANK)
        n_interventions = len(reft.interventions)

        def locations(rows: list[list[int]]) -> dict:
            return {"sources->base": (None, [rows] * n_interventions)}

        def loss(batch):
            lengths = prompt_lengths(batch["labels"], batch["attention_mask"])
            rows = [loreft_positions(n, positions=positions) for n in lengths]
            _, output = reft(
                {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                unit_locations=locations(rows),
                labels=batch["labels"],
            )
            return output.loss

        def generate(input_ids, attention_mask, max_new_tokens):
            from transformers import GenerationConfig

            config = GenerationConfig(
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_token_id,
                eos_token_id=eos_id(model),
            )
            rows = []
            for mask in attention_mask.tolist():
                pads = len(mask) - sum(mask)  # left padding
                rows.append(loreft_positions(len(mask) - pads, offset=pads, positions=positions))
            _, output = reft.generate(
                {"input_ids": input_ids, "attention_mask": attention_mask},
                unit_locations=locations(rows),
                intervene_on_prompt=True,
                generation_config=config,
            )
            return output[:, input_ids.shape[1] :]

        parameters = [
            p
            for intervention in reft.interventions.values()
            for p in intervention.parameters()
            if p.requires_grad
        ]
        details = {
            "rank": LOREFT_RANK,
            "layers": "all",
            "component": "block_output",
            "positions": positions,
            "share_weights": True,
        }
        return Adapted(reft, parameters, loss, generate, details=details)

    build.__doc__ = f"pyreft LoReFT r={LOREFT_RANK} on every block output, positions {positions}."
    return build
