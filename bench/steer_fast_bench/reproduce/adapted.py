"""What every method of ``steer-fast reproduce`` builds: an ``Adapted`` model (the module to
train, its parameters and optimizer groups, a loss and a greedy generation), and the helpers the
builders share for transformers-style models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# A learning rate: one number, or one per part of a joint model ({"lora": .., "steering": ..}).
Rate = float | dict[str, float]


@dataclass
class Adapted:
    """A model prepared by a method.

    Attributes:
        module: what is trained (and deleted after the run).
        parameters: the trainable parameters, handed to the optimizer.
        loss: batch (input_ids, attention_mask, labels) -> the mean token loss.
        generate: (input_ids, attention_mask, max_new_tokens) of left-padded prompts -> the new
            token ids only, greedy.
        before_step: called at the start of every optimizer step with (global step, whether an
            epoch starts at it); the joint methods apply their constraint there.
        details: what the results record about the method's configuration.
        summary: called after training; extra figures for the results (the joint overlap).
        part_groups: (lora rate, steering rate) -> optimizer parameter groups, one per part,
            for a method whose parts train at their own rates (the joint methods).
    """

    module: nn.Module
    parameters: list[nn.Parameter]
    loss: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    generate: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
    before_step: Callable[[int, bool], None] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    summary: Callable[[], dict[str, Any]] | None = None
    part_groups: Callable[[float, float], list[dict[str, Any]]] | None = None

    @property
    def trainable_parameters(self) -> int:
        """The number of trainable values (shared tensors counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters}.values())

    def optimizer_groups(self, rate: Rate) -> list[dict[str, Any]]:
        """AdamW's parameter groups at ``rate``: one group, or one per part for a rate per part
        (ValueError for a rate per part on a method without parts)."""
        if isinstance(rate, dict):
            if self.part_groups is None:
                raise ValueError(f"a rate per part ({rate}) needs a method with parts")
            return self.part_groups(rate["lora"], rate["steering"])
        if self.part_groups is not None:
            return self.part_groups(rate, rate)
        return [{"params": self.parameters, "lr": rate}]


def greedy(model: nn.Module, pad_token_id: int, eos_token_id: int | None):
    """generate() for a transformers-style model: greedy, the new tokens only."""
    from transformers import GenerationConfig

    def generate(input_ids, attention_mask, max_new_tokens):
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
        )
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config
        )
        return output[:, input_ids.shape[1] :]

    return generate


def hf_loss(model: nn.Module):
    """The loss of a transformers-style model that takes labels."""

    def loss(batch):
        return model(**batch).loss

    return loss


def eos_id(model: nn.Module) -> int | None:
    """The model's end-of-sequence id (the first, when its config lists several)."""
    eos = getattr(model.config, "eos_token_id", None)
    return eos[0] if isinstance(eos, list) else eos


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` that require gradients."""
    return [p for p in module.parameters() if p.requires_grad]
