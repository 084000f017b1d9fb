"""The methods ``steer-fast reproduce`` compares, one row of ``METHODS`` each.

Every method turns a fresh copy of the base model into an ``Adapted``: the module to train, its
trainable parameters, a loss for a batch and a greedy generation for left-padded prompts. The
training loop (``train.py``) and the evaluation (``evaluate.py``) are the same for all of them.

Learning rates follow one rule for every trained method (``selection.py``): a method with a
``Grid`` sweeps the rates of the paper's grid for its kind (``PAPER_GRIDS``; 3 or all 5 points,
``--grid-points``) on the validation split and keeps the best; ``SameRateAs`` runs at another
method's validation-best rate (LoReFT's second position choice, as the paper swept positions
after choosing the rate); ``PartRates`` trains each part of a joint model at the
validation-best rate of the method that trains that part alone (LoRA at ``lora``'s, steering at
``steer_silu``'s), plus a reference run at the paper's single joint rate (2e-4). Weight decay is
0 for every method (the published setting; LoReFT needs it: AdamW's decay acts on the
unconstrained weight of its orthogonal parametrisation and pulls the rotation to zero).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from steer_fast import SteerConfig, get_steer_model

from ..baselines import MethodUnavailable, import_pyreft, lora_model
from .adapted import Adapted, eos_id, greedy, hf_loss, trainable
from .joint import build_joint
from .loreft import build_loreft

LORA_RANK = 8

# The paper's learning-rate grids (blog appendix, "Implementation details"): full fine-tuning,
# LoRA, and one grid shared by the activation methods (post-block steering and ReFT).
PAPER_GRIDS: dict[str, tuple[float, ...]] = {
    "full": (5e-6, 1e-5, 2e-5, 5e-5, 1e-4),
    "lora": (5e-5, 1e-4, 3e-4, 7e-4, 1.5e-3),
    "activation": (5e-4, 1e-3, 2e-3, 3e-3, 5e-3),
}
# Which points of a 5-point grid a smaller sweep takes: the ends and the middle for 3.
GRID_POINTS: dict[int, tuple[int, ...]] = {3: (0, 2, 4), 5: (0, 1, 2, 3, 4)}
JOINT_REFERENCE_RATE = 2e-4  # the paper's joint setting: one rate for both parts


@dataclass(frozen=True)
class Grid:
    """Sweep the paper's grid ``PAPER_GRIDS[kind]`` on the validation split."""

    kind: str

    def rates(self, points: int) -> tuple[float, ...]:
        """The ``points`` rates of the sweep (``GRID_POINTS``)."""
        return tuple(PAPER_GRIDS[self.kind][i] for i in GRID_POINTS[points])


@dataclass(frozen=True)
class SameRateAs:
    """Run at the validation-best rate of ``method`` (and be chosen against it on validation)."""

    method: str


@dataclass(frozen=True)
class PartRates:
    """Each part at the validation-best rate of the method that trains it alone, and a
    reference run at ``reference`` for both parts."""

    lora: str
    steering: str
    reference: float = JOINT_REFERENCE_RATE


RateRule = Grid | SameRateAs | PartRates


@dataclass(frozen=True)
class Method:
    """One method of the comparison.

    Attributes:
        name: the command-line value.
        description: one line for the report.
        rates: how its learning rate is chosen (``Grid``, ``SameRateAs``, ``PartRates``);
            None for a method that does not train.
        schedule: transformers' scheduler name ("linear", "cosine").
        warmup_ratio: the fraction of the steps used for warmup.
        build: (fresh model, pad token id, **options) -> Adapted.
        requires: the packages the method imports.
        options: the per-run options ``build`` takes as keyword arguments (recorded in each
            run's "options" and part of its key).
    """

    name: str
    description: str
    rates: RateRule | None
    schedule: str
    warmup_ratio: float
    build: Callable[..., Adapted]
    requires: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    @property
    def trains(self) -> bool:
        return self.rates is not None

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


def build_base(model: nn.Module, pad_token_id: int) -> Adapted:
    """The model as it is: nothing trained."""
    model.requires_grad_(False)
    return Adapted(model, [], hf_loss(model), greedy(model, pad_token_id, eos_id(model)))


def build_full(model: nn.Module, pad_token_id: int) -> Adapted:
    """Full fine-tuning: every parameter trained."""
    model.requires_grad_(True)
    return Adapted(
        model, trainable(model), hf_loss(model), greedy(model, pad_token_id, eos_id(model))
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
        trainable(peft_model),
        hf_loss(peft_model),
        greedy(peft_model, pad_token_id, eos_id(model)),
        details=details,
    )


def _steer(config_kwargs: dict[str, Any]) -> Callable[[nn.Module, int], Adapted]:
    def build(model: nn.Module, pad_token_id: int) -> Adapted:
        config = SteerConfig(**config_kwargs)
        steered = get_steer_model(model, config)
        details = {"steer_config": config.to_dict()}
        return Adapted(
            steered,
            trainable(steered),
            hf_loss(steered),
            greedy(steered, pad_token_id, eos_id(model)),
            details=details,
        )

    build.__doc__ = f"steer_fast.get_steer_model with SteerConfig({config_kwargs})."
    return build


def _method(name, description, rates, build, *, warmup=0.03, schedule="linear", **extra):
    return Method(name, description, rates, schedule, warmup, build, **extra)


_JOINT = PartRates(lora="lora", steering="steer_silu")
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _method("base", "the model as it is, no training", None, build_base, warmup=0.0),
        _method("full", "full fine-tuning, every parameter (AdamW)", Grid("full"), build_full),
        _method(
            "lora",
            "PEFT LoRA r=8 on all linear layers",
            Grid("lora"),
            build_lora,
            requires=("peft",),
        ),
        _method(
            "loreft",
            "pyreft LoReFT r=8, every layer's block output, positions f7+l7",
            Grid("activation"),
            build_loreft("f7+l7"),
            warmup=0.1,
            requires=("pyreft",),
        ),
        _method(
            "loreft_last",
            "pyreft LoReFT r=8, every layer's block output, the last prompt position "
            "(at loreft's rate)",
            SameRateAs("loreft"),
            build_loreft("last"),
            warmup=0.1,
            requires=("pyreft",),
        ),
        _method(
            "steer_silu",
            "steer_fast SteerConfig(): rank 8, SiLU, site block (published)",
            Grid("activation"),
            _steer({}),
        ),
        _method(
            "steer_identity",
            "steer_fast rank 8, identity activation (the paper's linear adapter)",
            Grid("activation"),
            _steer({"activation": "identity"}),
        ),
        _method(
            "steer_vector",
            "steer_fast rank 0: one steering vector per layer",
            Grid("activation"),
            _steer({"rank": 0}),
        ),
        _method(
            "steer_mlp",
            "steer_fast rank 8, SiLU, site mlp",
            Grid("activation"),
            _steer({"site": "mlp"}),
        ),
        _method(
            "steer_attn",
            "steer_fast rank 8, SiLU, site attn",
            Grid("activation"),
            _steer({"site": "attn"}),
        ),
        _method(
            "joint_orth",
            "LoRA r=8 + steering, the down-projection constraint (--orthogonality-frequency)",
            _JOINT,
            build_joint("down_projection"),
            schedule="cosine",
            warmup=0.06,
            requires=("peft",),
            options=("orthogonality_frequency",),
        ),
        _method(
            "joint_plain",
            "LoRA r=8 + steering, no constraint",
            _JOINT,
            build_joint("none"),
            schedule="cosine",
            warmup=0.06,
            requires=("peft",),
        ),
    )
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
