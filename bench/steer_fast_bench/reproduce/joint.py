"""The joint methods of ``steer-fast reproduce``: LoRA and post-block steering trained together
(``steer_fast.get_joint_model``), each part in its own optimizer group
(``JointModel.parameter_groups``) so that each can train at its own learning rate.

``joint_orth`` keeps the parts apart with the paper's down-projection constraint, applied at the
start of optimizer steps 0, N, 2N, ... (``--orthogonality-frequency``; by default N is a sixth of
the run, so that the constraint acts five times after step 0, where LoRA's B is still zero and a
projection changes nothing); ``joint_plain`` trains both parts freely.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from steer_fast import OrthogonalityConfig, SteerConfig

from ..baselines import JOINT_LORA_TARGETS, joint_model
from .adapted import Adapted, eos_id, greedy, hf_loss, trainable

JOINT_LORA_RANK = 8
FREQUENCY_WORDS = ("step", "epoch", "init")  # the values besides a number of steps
AUTO_FREQUENCY = "auto"
AUTO_PROJECTIONS = 6  # "auto": the constraint is due this many times in a run, step 0 included


def resolve_frequency(frequency: int | str, steps: int) -> int | str:
    """``--orthogonality-frequency`` for a run of ``steps`` steps: "auto" becomes
    ceil(steps / 6) (at 144 steps: 24, projecting at 0, 24, ..., 120), anything else is
    returned as it is."""
    if frequency == AUTO_FREQUENCY:
        return max(1, math.ceil(steps / AUTO_PROJECTIONS))
    return frequency


def down_projection_due(config: OrthogonalityConfig, step: int, epoch_start: bool) -> bool:
    """Whether the down-projection constraint projects at the start of optimizer step ``step``
    (as ``steer_fast.JointTrainer`` does): every step, steps 0, N, 2N, ..., each epoch's start,
    or once at step 0."""
    if config.constraint != "down_projection":
        return False
    if isinstance(config.frequency, int):
        return step % config.frequency == 0
    return {"step": True, "epoch": epoch_start, "init": step == 0}[config.frequency]


def build_joint(constraint: str) -> Callable[..., Adapted]:
    """A builder of the joint model with ``constraint`` ("down_projection" or "none")."""

    def build(
        model: nn.Module, pad_token_id: int, *, orthogonality_frequency: int | str = 100
    ) -> Adapted:
        orthogonality = (
            OrthogonalityConfig(frequency=orthogonality_frequency)
            if constraint == "down_projection"
            else OrthogonalityConfig(constraint=constraint)
        )
        joint = joint_model(model, SteerConfig(), JOINT_LORA_RANK, orthogonality)
        projections: list[int] = []

        def before_step(step: int, epoch_start: bool) -> None:
            if down_projection_due(joint.orthogonality, step, epoch_start):
                joint.apply_orthogonality()
                projections.append(step)

        def summary() -> dict[str, Any]:
            """The overlap O after training, and the steps the constraint projected at (at
            step 0 LoRA's B is still zero, so that projection changes nothing)."""
            return {
                "down_projection_overlap": float(joint.down_projection_overlap()),
                "projection_steps": list(projections),
            }

        details = {
            "lora_rank": JOINT_LORA_RANK,
            "lora_targets": list(JOINT_LORA_TARGETS),
            "orthogonality": joint.orthogonality.to_dict(),
        }
        return Adapted(
            joint,
            trainable(joint),
            hf_loss(joint),
            greedy(joint, pad_token_id, eos_id(model)),
            before_step,
            details,
            summary,
            part_groups=joint.parameter_groups,
        )

    build.__doc__ = (
        f"steer_fast.get_joint_model: LoRA r=8 and SteerConfig(), constraint {constraint}."
    )
    return build
