"""What one ``steer-fast reproduce`` call does: ``ReproduceSettings``, every option checked.

Bad values raise ValueError naming the option, before any data is built or model loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .joint import AUTO_FREQUENCY, FREQUENCY_WORDS, resolve_frequency
from .methods import GRID_POINTS, METHOD_NAMES, METHODS, Grid, PartRates, SameRateAs

# Settings that change what a run measures: a results file is resumed only when they match.
RESULT_SETTINGS = (
    "model",
    "steps",
    "epochs",
    "train_size",
    "validation_size",
    "test_size",
    "data_seed",
    "listops_max_tokens",
    "batch_size",
    "grad_accum",
    "max_length",
    "selection_seed",
)


def positive_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` when it is an int >= ``minimum``; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def learning_rate(name: str, value: object) -> float:
    """``value`` as a float when it is a finite number > 0; ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: a learning rate must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: a learning rate must be finite and > 0, got {value!r}")
    return float(value)


def _unique(values: Sequence) -> tuple:
    return tuple(dict.fromkeys(values))


def _no_duplicates(name: str, values: Sequence) -> tuple:
    repeated = sorted({v for v in values if list(values).count(v) > 1}, key=str)
    if repeated:
        raise ValueError(f"{name}: {', '.join(map(str, repeated))} given more than once")
    return tuple(values)


@dataclass(frozen=True)
class ReproduceSettings:
    """Everything one ``steer-fast reproduce`` call does (the command-line options).

    ``tasks`` are names of ``tasks.TASK_NAMES`` or sources ``tasks.load_task`` reads. Every
    trained method's learning rate is chosen on the validation split at ``seeds[0]`` (the
    selection seed) from its sweep: ``grid_points`` points of the paper's grid for its kind, or
    the rates ``lr_grid`` gives it; the methods of ``repeat_methods`` (None: every selected
    trained method) are then run again at the chosen rate for each of the other ``seeds``.
    ``steps`` None trains for ``epochs`` passes over the training split.
    ``orthogonality_frequency`` is when joint_orth's constraint projects ("auto": a sixth of
    the run; N steps; "step", "epoch", "init"). ``validation_every`` N evaluates the
    validation split every N optimizer steps of each run (the validation curve), None never
    before the end.
    """

    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    model: str
    out: str
    train_size: int
    validation_size: int
    test_size: int
    steps: int | None = None
    epochs: float = 1.0
    seeds: tuple[int, ...] = (0,)
    repeat_methods: tuple[str, ...] | None = None
    data_seed: int = 0
    listops_max_tokens: int = 64
    batch_size: int = 8
    grad_accum: int = 2
    max_length: int | None = None
    grid_points: int = 3
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=dict)
    eval_batch_size: int = 32
    threads: int | None = None
    measure_memory: bool = True
    orthogonality_frequency: int | str = AUTO_FREQUENCY
    validation_every: int | None = None

    def __post_init__(self) -> None:
        from .models import check_model_name
        from .tasks import TASK_NAMES

        object.__setattr__(self, "tasks", _unique(self.tasks))
        object.__setattr__(self, "methods", _unique(self.methods))
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        for task in self.tasks:
            if task not in TASK_NAMES and not _is_task_source(task):
                raise ValueError(
                    f"tasks: unknown task {task!r}; known tasks: "
                    f"{', '.join(TASK_NAMES)} (or a local file or folder, or a "
                    "Hugging Face dataset id such as owner/name)"
                )
        self._check_methods()
        check_model_name(self.model)
        positive_int("train_size", self.train_size, 0)
        positive_int("validation_size", self.validation_size, 0)
        positive_int("test_size", self.test_size)
        if self.steps is not None:
            positive_int("steps", self.steps)
        if (
            isinstance(self.epochs, bool)
            or not isinstance(self.epochs, (int, float))
            or not (math.isfinite(self.epochs) and self.epochs > 0)
        ):
            raise ValueError(f"epochs must be a number > 0, got {self.epochs!r}")
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed")
        for seed in self.seeds:
            positive_int("seeds", seed, 0)
        object.__setattr__(self, "seeds", _no_duplicates("seeds", tuple(self.seeds)))
        positive_int("data_seed", self.data_seed, 0)
        for name in ("batch_size", "grad_accum", "eval_batch_size"):
            positive_int(name, getattr(self, name))
        positive_int("listops_max_tokens", self.listops_max_tokens)
        for name in ("max_length", "threads", "validation_every"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if self.grid_points not in GRID_POINTS:
            raise ValueError(
                f"grid_points must be one of {', '.join(map(str, GRID_POINTS))}, "
                f"got {self.grid_points!r}"
            )
        frequency = self.orthogonality_frequency
        if frequency not in (*FREQUENCY_WORDS, AUTO_FREQUENCY):
            positive_int("orthogonality_frequency", frequency)
        self._check_lr_grid()
        if any(m.trains for m in self.selected()):
            positive_int("train_size", self.train_size)
            if self.validation_size < 1:
                raise ValueError(
                    "validation_size must be >= 1: every trained method's learning rate is "
                    "chosen on the validation split"
                )

    def _check_methods(self) -> None:
        if not self.methods:
            raise ValueError("methods must name at least one method")
        for method in self.methods:
            if method not in METHODS:
                raise ValueError(
                    f"methods: unknown method {method!r}; known methods: {', '.join(METHOD_NAMES)}"
                )
        for method in self.selected():
            needed = ()
            if isinstance(method.rates, SameRateAs):
                needed = (method.rates.method,)
            elif isinstance(method.rates, PartRates):
                needed = (method.rates.lora, method.rates.steering)
            missing = [name for name in needed if name not in self.methods]
            if missing:
                raise ValueError(
                    f"methods: {method.name} runs at the validation-best rate of "
                    f"{' and '.join(needed)}: add {' '.join(missing)} to the methods"
                )
        if self.repeat_methods is not None:
            object.__setattr__(self, "repeat_methods", _unique(self.repeat_methods))
            for name in self.repeat_methods:
                if name not in self.methods or not METHODS[name].trains:
                    raise ValueError(
                        f"repeat_methods: {name!r} is not one of the trained methods selected "
                        f"({', '.join(m.name for m in self.selected() if m.trains)})"
                    )

    def _check_lr_grid(self) -> None:
        if not isinstance(self.lr_grid, dict):
            raise ValueError(f"lr_grid must map methods to learning rates, got {self.lr_grid!r}")
        grid = {}
        for method, rates in self.lr_grid.items():
            if method not in METHODS:
                raise ValueError(
                    f"lr_grid: unknown method {method!r}; known methods: {', '.join(METHOD_NAMES)}"
                )
            rule = METHODS[method].rates
            if rule is None:
                raise ValueError(f"lr_grid: {method} does not train, it takes no learning rate")
            if not isinstance(rule, Grid):
                raise ValueError(
                    f"lr_grid: {method} takes no grid of its own: it runs at the "
                    "validation-best rate of "
                    + (
                        rule.method
                        if isinstance(rule, SameRateAs)
                        else f"{rule.lora} (LoRA) and {rule.steering} (steering)"
                    )
                )
            if isinstance(rates, (int, float)):
                rates = (rates,)
            rates = tuple(learning_rate(f"lr_grid {method}", r) for r in rates)
            if not rates:
                raise ValueError(f"lr_grid: {method} needs at least one learning rate")
            grid[method] = _no_duplicates(f"lr_grid {method}", rates)
        object.__setattr__(self, "lr_grid", grid)

    @property
    def selection_seed(self) -> int:
        """The seed every learning rate is chosen at: the first of ``seeds``."""
        return self.seeds[0]

    def selected(self) -> list:
        """The selected ``methods.Method`` rows, in the order given."""
        return [METHODS[name] for name in self.methods]

    def sweep_rates(self, method: str) -> tuple[float, ...]:
        """The rates a method with a ``Grid`` sweeps: ``lr_grid``'s or ``grid_points`` points
        of its paper grid (empty for other methods)."""
        rule = METHODS[method].rates
        if not isinstance(rule, Grid):
            return ()
        return self.lr_grid.get(method, rule.rates(self.grid_points))

    def repeated(self, method: str) -> bool:
        """Whether ``method``'s chosen setting is run again at the other seeds."""
        if self.repeat_methods is None:
            return METHODS[method].trains
        return method in self.repeat_methods

    def total_steps(self, train_size: int) -> int:
        """Optimizer steps of a run on ``train_size`` examples: ``steps``, or ``epochs`` passes
        at the effective batch (rounded up)."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * train_size / (self.batch_size * self.grad_accum)))

    def run_options(self, method: str, steps: int) -> dict[str, Any]:
        """The per-run options of ``method`` for a run of ``steps`` steps (part of the run's
        key): the resolved orthogonality frequency for joint_orth, nothing for the others."""
        options = {}
        if "orthogonality_frequency" in METHODS[method].options:
            options["orthogonality_frequency"] = resolve_frequency(
                self.orthogonality_frequency, steps
            )
        return options

    def result_settings(self) -> dict[str, Any]:
        """The settings a results file must match to be resumed."""
        return {name: getattr(self, name) for name in RESULT_SETTINGS}


def _is_task_source(task: str) -> bool:
    return Path(task).exists() or ("/" in task and not task.startswith("/"))
