"""The baselines both the benchmark suites and the accuracy reproduction compare against, built
one way: PEFT LoRA, pyreft LoReFT and steer_fast's joint LoRA + steering model.

- ``lora_config(rank, target_modules)``: PEFT LoRA at rank r with alpha = r (a scale of 1), no
  dropout, no bias, for causal LM;
- ``loreft_model(model, rank)``: pyreft LoReFT at rank r on every decoder layer's block output
  (the positions it intervenes on are the caller's: the suites use every position, the
  reproduction the first and last 7 prompt tokens or the last one);
- ``joint_model(model, steer_config, rank, orthogonality)``: ``steer_fast.get_joint_model`` with
  LoRA at rank r on ``JOINT_LORA_TARGETS``.

A baseline whose package is missing raises ``MethodUnavailable`` with the reason, which the
suites record as a skipped row and the reproduction as a skipped method.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

from torch import nn

# LoRA of the joint method, as in the paper's joint runs: every attention and MLP projection of
# a Llama-style layer (the orthogonality constraints read the B of o_proj and down_proj).
JOINT_LORA_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


class MethodUnavailable(RuntimeError):
    """A method cannot run on this machine (a package or the hardware is missing); the message
    says why."""


def import_pyreft() -> Any:
    """pyreft (and pyvene, which prints a notice on import), or ``MethodUnavailable``."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import pyreft
    except Exception as error:  # pyreft pulls pyvene, datasets, ...: any failure counts
        message = f"pyreft cannot be imported: {type(error).__name__}: {error}"
        raise MethodUnavailable(message) from error
    return pyreft


def lora_config(rank: int, target_modules: Sequence[str] | str):
    """PEFT's LoraConfig at ``rank``: alpha = rank (scale 1), no dropout, no bias, causal LM."""
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise MethodUnavailable(f"peft is not installed: {error}") from error
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def lora_model(model: nn.Module, rank: int, target_modules: Sequence[str] | str) -> nn.Module:
    """``peft.get_peft_model`` of ``model`` with ``lora_config(rank, target_modules)``."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(rank, target_modules))


# Model classes pyvene has no module table for, and the class whose table fits them: Gemma 3's
# text model has Gemma 2's layout (model.layers[i] with self_attn and mlp, the same config names).
PYVENE_STAND_INS: dict[str, str] = {"Gemma3ForCausalLM": "Gemma2ForCausalLM"}


def register_pyvene_stand_in(model: nn.Module) -> None:
    """Give pyvene the module table of ``PYVENE_STAND_INS[type(model)]`` for ``model``'s class
    when it has none of its own (nothing happens otherwise)."""
    from pyvene.models import intervenable_modelcard as cards

    cls = type(model)
    stand_in = PYVENE_STAND_INS.get(cls.__name__)
    if cls in cards.type_to_module_mapping or stand_in is None:
        return
    known = {known_cls.__name__: known_cls for known_cls in cards.type_to_module_mapping}
    if stand_in in known:
        cards.type_to_module_mapping[cls] = cards.type_to_module_mapping[known[stand_in]]
        cards.type_to_dimension_mapping[cls] = cards.type_to_dimension_mapping[known[stand_in]]


def loreft_model(model: nn.Module, rank: int) -> Any:
    """pyreft's ReftModel of ``model``: one LoReFT intervention of ``rank`` (no dropout) on the
    block output of every decoder layer, in the model's dtype."""
    pyreft = import_pyreft()
    register_pyvene_stand_in(model)
    config = model.config
    representations = [
        {
            "layer": layer,
            "component": "block_output",
            "low_rank_dimension": rank,
            "intervention": pyreft.LoreftIntervention(
                embed_dim=config.hidden_size,
                low_rank_dimension=rank,
                dtype=model.dtype,
                dropout=0.0,
            ),
        }
        for layer in range(config.num_hidden_layers)
    ]
    return pyreft.get_reft_model(model, pyreft.ReftConfig(representations=representations))


def joint_model(
    model: nn.Module,
    steer_config: Any,
    rank: int,
    orthogonality: Any,
    targets: Sequence[str] = JOINT_LORA_TARGETS,
) -> nn.Module:
    """``steer_fast.get_joint_model``: LoRA at ``rank`` on ``targets`` and the steering
    ``steer_config``, kept apart by ``orthogonality``."""
    from steer_fast import get_joint_model  # imported on first use: it needs PEFT

    return get_joint_model(model, steer_config, lora_config(rank, targets), orthogonality)
