"""Optimizer parameter groups, one per part of a joint model, each with its own learning rate
(``JointModel.parameter_groups``, which JointTrainer's per-part rates use)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .plan import check_learning_rate


def part_parameter_groups(
    parts: dict[str, tuple[float, list[tuple[str, nn.Parameter]]]],
    weight_decay: float = 0.0,
    decay_parameter_names: set[str] | None = None,
) -> list[dict[str, Any]]:
    """The groups of ``parts`` (part name -> (learning rate, its named parameters)).

    Frozen parameters are left out; each group has a "name" (its part's). With
    ``decay_parameter_names`` (the Trainer's ``get_decay_parameter_names``), each part is split
    into a group with ``weight_decay`` (those names) and one without; otherwise every group gets
    ``weight_decay``. ValueError naming the part for a learning rate that is not a finite number
    >= 0.
    """
    groups = []
    for name, (learning_rate, named) in parts.items():
        learning_rate = check_learning_rate(f"{name} learning rate", learning_rate)
        trainable = [(n, p) for n, p in named if p.requires_grad]
        if decay_parameter_names is None:
            splits = [(weight_decay, [p for _, p in trainable])]
        else:
            splits = [
                (weight_decay, [p for n, p in trainable if n in decay_parameter_names]),
                (0.0, [p for n, p in trainable if n not in decay_parameter_names]),
            ]
        for decay, params in splits:
            if params:
                groups.append(
                    {"params": params, "lr": learning_rate, "weight_decay": decay, "name": name}
                )
    return groups
