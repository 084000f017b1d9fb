"""The methods ``steer-fast reproduce`` compares, one row of ``METHODS`` each.

Every method turns a fresh copy of the base model into an ``Adapted``: the module to train, its
trainable parameters, a loss for a batch and a greedy generation for left-padded prompts. The
training loop (``train.py``) and the evaluation (``evaluate.py``) are the same for all of them.

Learning rates: the steering variants use the published setting (9e-4, linear schedule, warmup
ratio 0.03), the joint runs the paper's joint setting (2e-4, cosine, warmup 0.06); full
fine-tuning, LoRA and LoReFT take the best value of a small grid, chosen on the validation split.
Weight decay is 0 for every method (the published setting; LoReFT needs it: AdamW's decay acts
on the unconstrained weight of its orthogonal parametrisation and pulls the rotation to zero).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from steer_fast import OrthogonalityConfig, SteerConfig, get_steer_model

from ..baselines import (
    JOINT_LORA_TARGETS,
    MethodUnavailable,
    import_pyreft,
    joint_model,
    lora_model,
    loreft_model,
)

# pyreft's reasoning recipe (examples/loreft, math and commonsense): LoReFT on the block output
# of every layer, rank 8, the first 7 and the last 7 prompt positions, one intervention per
# layer shared by both groups of positions, no dropout, warmup ratio 0.1.
LOREFT_RANK = 8
LOREFT_FIRST_POSITIONS = 7
LOREFT_LAST_POSITIONS = 7
LORA_RANK = 8


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
    """

    module: nn.Module
    parameters: list[nn.Parameter]
    loss: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    generate: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
    before_step: Callable[[int, bool], None] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    summary: Callable[[], dict[str, Any]] | None = None

    @property
    def trainable_parameters(self) -> int:
        """The number of trainable values (shared tensors counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters}.values())


@dataclass(frozen=True)
class Method:
    """One method of the comparison.

    Attributes:
        name: the command-line value.
        description: one line for the report.
        learning_rates: the default learning rates; more than one is a grid chosen on the
            validation split; empty for a method that does not train.
        schedule: transformers' scheduler name ("linear", "cosine").
        warmup_ratio: the fraction of the steps used for warmup.
        build: (fresh model, pad token id, **options) -> Adapted.
        requires: the packages the method imports.
        options: the ``runner.ReproduceSettings`` fields ``build`` takes as keyword arguments.
    """

    name: str
    description: str
    learning_rates: tuple[float, ...]
    schedule: str
    warmup_ratio: float
    build: Callable[..., Adapted]
    requires: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    @property
    def trains(self) -> bool:
        return bool(self.learning_rates)

    def unavailable_reason(self) -> str | None:
        """Why the method cannot run here (a missing package), or None."""
        for package in self.requires:
            if importlib.util.find_spec(package) is None:
                return f"{package} is not installed (pip install {package})"
        if "pyreft" in self.requires:
            try:
                import_pyreft()
            except MethodUnavailable as error:
                return str(error)
        return None


def _greedy(model: nn.Module, pad_token_id: int, eos_token_id: int | None):
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


def _hf_loss(model: nn.Module):
    def loss(batch):
        return model(**batch).loss

    return loss


def _eos(model: nn.Module) -> int | None:
    eos = getattr(model.config, "eos_token_id", None)
    return eos[0] if isinstance(eos, list) else eos


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def build_base(model: nn.Module, pad_token_id: int) -> Adapted:
    """The model as it is: nothing trained."""
    model.requires_grad_(False)
    return Adapted(model, [], _hf_loss(model), _greedy(model, pad_token_id, _eos(model)))


def build_full(model: nn.Module, pad_token_id: int) -> Adapted:
    """Full fine-tuning: every parameter trained."""
    model.requires_grad_(True)
    return Adapted(
        model, _trainable(model), _hf_loss(model), _greedy(model, pad_token_id, _eos(model))
    )


def build_lora(model: nn.Module, pad_token_id: int) -> Adapted:
    """PEFT LoRA, rank 8, on every linear layer but the output head (``baselines.lora_config``:
    alpha 8, no dropout, B = 0 at init)."""
    peft_model = lora_model(model, LORA_RANK, "all-linear")
    config = peft_model.peft_config["default"]
    details = {
        "rank": LORA_RANK,
        "target_modules": "all-linear",
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
    }
    return Adapted(
        peft_model,
        _trainable(peft_model),
        _hf_loss(peft_model),
        _greedy(peft_model, pad_token_id, _eos(model)),
        details=details,
    )


def _steer(config_kwargs: dict[str, Any]) -> Callable[[nn.Module, int], Adapted]:
    def build(model: nn.Module, pad_token_id: int) -> Adapted:
        config = SteerConfig(**config_kwargs)
        steered = get_steer_model(model, config)
        details = {"steer_config": config.to_dict()}
        return Adapted(
            steered,
            _trainable(steered),
            _hf_loss(steered),
            _greedy(steered, pad_token_id, _eos(model)),
            details=details,
        )

    build.__doc__ = f"steer_fast.get_steer_model with SteerConfig({config_kwargs})."
    return build


def down_projection_due(config: OrthogonalityConfig, step: int, epoch_start: bool) -> bool:
    """Whether the down-projection constraint projects at the start of optimizer step ``step``
    (as ``steer_fast.JointTrainer`` does): every step, steps 0, N, 2N, ..., each epoch's start,
    or once at step 0."""
    if config.constraint != "down_projection":
        return False
    if isinstance(config.frequency, int):
        return step % config.frequency == 0
    return {"step": True, "epoch": epoch_start, "init": step == 0}[config.frequency]


def _joint(constraint: str | None) -> Callable[..., Adapted]:
    def build(
        model: nn.Module, pad_token_id: int, *, orthogonality_frequency: int | str = 100
    ) -> Adapted:
        orthogonality = (
            OrthogonalityConfig(frequency=orthogonality_frequency)
            if (constraint is None)
            else OrthogonalityConfig(constraint=constraint)
        )
        joint = joint_model(model, SteerConfig(), LORA_RANK, orthogonality)

        projections = []

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
            "lora_rank": LORA_RANK,
            "lora_targets": list(JOINT_LORA_TARGETS),
            "orthogonality": joint.orthogonality.to_dict(),
        }
        return Adapted(
            joint,
            _trainable(joint),
            _hf_loss(joint),
            _greedy(joint, pad_token_id, _eos(model)),
            before_step,
            details,
            summary,
        )

    build.__doc__ = (
        f"steer_fast.get_joint_model: LoRA r=8 and SteerConfig(), constraint "
        f"{constraint or 'down_projection'}."
    )
    return build


def loreft_positions(prompt_length: int, offset: int = 0) -> list[int]:
    """The positions LoReFT intervenes on in a prompt of ``prompt_length`` tokens that starts at
    ``offset`` (left padding): the first 7 and the last 7, at most half the prompt each (as
    pyreft's ``get_intervention_locations`` clamps them), padded to 14 by repeating the last
    position (intervening twice on one position writes the same value)."""
    first = min(LOREFT_FIRST_POSITIONS, prompt_length // 2)
    last = min(LOREFT_LAST_POSITIONS, prompt_length // 2)
    positions = list(range(first)) + list(range(prompt_length - last, prompt_length))
    positions = positions or [prompt_length - 1]
    positions += [positions[-1]] * (LOREFT_FIRST_POSITIONS + LOREFT_LAST_POSITIONS - len(positions))
    return [offset + p for p in positions]


def _prompt_lengths(labels: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
    """Prompt tokens of each right-padded training row: those before the first label."""
    lengths = []
    for row_labels, row_mask in zip(labels.tolist(), attention_mask.tolist()):
        supervised = [i for i, label in enumerate(row_labels) if label != -100]
        lengths.append(supervised[0] if supervised else sum(row_mask))
    return lengths


def build_loreft(model: nn.Module, pad_token_id: int) -> Adapted:
    """pyreft LoReFT (pyreft's reasoning recipe, see LOREFT_*), through pyreft's own model for
    training and generation."""
    reft = loreft_model(model, LOREFT_RANK)
    n_interventions = len(reft.interventions)

    def locations(rows: list[list[int]]) -> dict:
        return {"sources->base": (None, [rows] * n_interventions)}

    def loss(batch):
        rows = [
            loreft_positions(n) for n in _prompt_lengths(batch["labels"], batch["attention_mask"])
        ]
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
            eos_token_id=_eos(model),
        )
        rows = []
        for mask in attention_mask.tolist():
            pads = len(mask) - sum(mask)  # left padding
            rows.append(loreft_positions(len(mask) - pads, offset=pads))
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
        "positions": f"f{LOREFT_FIRST_POSITIONS}+l{LOREFT_LAST_POSITIONS}",
        "share_weights": True,
    }
    return Adapted(reft, parameters, loss, generate, details=details)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("base", "the model as it is, no training", (), "linear", 0.0, build_base),
        Method(
            "full",
            "full fine-tuning, every parameter (AdamW)",
            (1e-5, 3e-5, 1e-4),
            "linear",
            0.03,
            build_full,
        ),
        Method(
            "lora",
            "PEFT LoRA r=8 on all linear layers",
            (1e-4, 3e-4, 1e-3),
            "linear",
            0.03,
            build_lora,
            ("peft",),
        ),
        Method(
            "loreft",
            "pyreft LoReFT r=8, every layer's block output, positions f7+l7",
            (3e-4, 9e-4, 4e-3),
            "linear",
            0.1,
            build_loreft,
            ("pyreft",),
        ),
        Method(
            "steer_silu",
            "steer_fast SteerConfig(): rank 8, SiLU, site block (published)",
            (9e-4,),
            "linear",
            0.03,
            _steer({}),
        ),
        Method(
            "steer_identity",
            "steer_fast rank 8, identity activation",
            (9e-4,),
            "linear",
            0.03,
            _steer({"activation": "identity"}),
        ),
        Method(
            "steer_vector",
            "steer_fast rank 0: one steering vector per layer",
            (9e-4,),
            "linear",
            0.03,
            _steer({"rank": 0}),
        ),
        Method(
            "steer_mlp",
            "steer_fast rank 8, SiLU, site mlp",
            (9e-4,),
            "linear",
            0.03,
            _steer({"site": "mlp"}),
        ),
        Method(
            "steer_attn",
            "steer_fast rank 8, SiLU, site attn",
            (9e-4,),
            "linear",
            0.03,
            _steer({"site": "attn"}),
        ),
        Method(
            "joint_orth",
            "LoRA r=8 + steering, the down-projection constraint (every 100 "
            "steps as published; --orthogonality-frequency)",
            (2e-4,),
            "cosine",
            0.06,
            _joint(None),
            ("peft",),
            ("orthogonality_frequency",),
        ),
        Method(
            "joint_plain",
            "LoRA r=8 + steering, no constraint",
            (2e-4,),
            "cosine",
            0.06,
            _joint("none"),
            ("peft",),
        ),
    )
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
