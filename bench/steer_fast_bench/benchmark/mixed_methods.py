"""The mixed suite's methods: A adapters loaded on one model, one batch whose rows name them.

Every method of the mixed suite (``MIXED_METHODS`` in ``methods.py``) takes a ``MixedSetup``:
the model under test, A (the adapters loaded), the spread of the B rows over them (``spread``:
"even", row i -> adapter i mod A; "skewed", every other row on adapter 0 and the rest round
robin over the other A - 1), the tokens, and a ``ModelCache`` that builds each model once per A
for every method that shares it. It returns a ``MixedCandidate``: per phase ("prefill" and
"decode" for inference, "train" for a training step) the call to time, after a correctness
check that raises when the method's outputs are wrong:

- the mixed batch (steer_fast's and PEFT's) must give the logits of each adapter run alone on
  its own rows (prefill at every position of a short prompt, and one decoded token), and the
  mixed training step the gradients of the adapters trained one after another;
- every steering method must change the base model's logits: the adapters are randomly
  initialised, so none is the identity.

A method whose name ends in "_train" is a training method (phase "train"); the others are
inference methods (phases "prefill" and "decode"). The suite builds the models
(``ModelCache.prebuild``) before it enters ``torch.inference_mode`` for the inference methods:
a SteerModel's mixed batch keys its cached weight stacks by the parameters' version counters,
which inference tensors (parameters created under inference mode) do not have.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from steer_fast import SteerConfig, get_steer_model
from steer_fast.ops import triton_available

from .models import ModelSpec, build_model, forward_parameters
from .timing import Call

SPREADS: tuple[str, ...] = ("even", "skewed")
DEFAULT_ADAPTER = "default"  # the first adapter's name, in steer_fast and PEFT alike
INFERENCE_PHASES: tuple[str, ...] = ("prefill", "decode")
TRAINING_PHASES: tuple[str, ...] = ("train",)
# Tokens of each row that the correctness check runs (every position's logits are compared).
CHECK_TOKENS = 8
# Largest |difference| the correctness check allows, as a share of the largest |logit| (or
# gradient): fp32 agrees to rounding; half precision through different kernels and batch shapes
# to a few units in the last place of each layer.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}
# Random adapter weights: N(0, (gain / sqrt(fan_in))^2) for matrices, N(0, gain^2 / 10) for
# vectors, so that every adapter changes the model's outputs by a sizeable amount.
INIT_GAIN = 0.5


def model_kind(method: str) -> str:
    """The model of ``ModelCache`` a method runs on: "base", "peft" or "steer"."""
    return "base" if method == "base" else "peft" if method.startswith("peft") else "steer"


def adapter_names(count: int) -> list[str]:
    """The names of ``count`` adapters: "default", "a1", "a2", ..."""
    return [DEFAULT_ADAPTER, *(f"a{i}" for i in range(1, count))]


def row_adapters(rows: int, count: int, spread: str) -> list[int]:
    """The adapter index of each of ``rows`` rows over ``count`` adapters: "even", row i ->
    adapter i mod count; "skewed", the even rows (half) on adapter 0 and the odd ones round
    robin over adapters 1..count-1 (with one adapter, every row on it)."""
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")
    if spread == "even" or count == 1:
        return [i % count for i in range(rows)]
    return [0 if i % 2 == 0 else 1 + (i // 2) % (count - 1) for i in range(rows)]


def steer_backend(device: torch.device) -> str:
    """The fused kernels where they run (CUDA with Triton), the torch path elsewhere."""
    return "triton" if device.type == "cuda" and triton_available() else "torch"


def randomize(parameters: Sequence[nn.Parameter], seed: int) -> None:
    """Overwrite ``parameters`` with random values (see ``INIT_GAIN``), in their order."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            values = torch.randn(parameter.shape, generator=generator)
            scale = parameter.shape[-1] ** -0.5 if parameter.dim() > 1 else 0.1**0.5
            parameter.copy_(values * (INIT_GAIN * scale))


@dataclass
class ModelCache:
    """The models of one adapter count, each built on first use and shared by the methods."""

    spec: ModelSpec
    device: torch.device
    rank: int
    activation: str
    seed: int
    adapters: int
    built: dict[str, nn.Module | Exception] = field(default_factory=dict)

    def get(self, kind: str) -> nn.Module:
        """The "base" model, the "steer" SteerModel or the "peft" PeftModel, with A adapters;
        a build that failed raises its error again."""
        if kind not in self.built:
            build = {"base": self._base, "steer": self._steer, "peft": self._peft}[kind]
            try:
                self.built[kind] = build()
            except Exception as error:  # kept, so that every method sharing it says why
                self.built[kind] = error
        built = self.built[kind]
        if isinstance(built, Exception):
            raise built
        return built

    def prebuild(self, kinds: Sequence[str]) -> None:
        """Build the models of ``kinds`` now (a failure is raised to the first method using it)."""
        for kind in kinds:
            with contextlib.suppress(Exception):
                self.get(kind)

    def _base(self) -> nn.Module:
        return build_model(self.spec, self.device, self.seed).requires_grad_(False).eval()

    def _steer(self) -> nn.Module:
        config = lambda: SteerConfig(
            rank=self.rank, activation=self.activation, backend=steer_backend(self.device)
        )
        model = get_steer_model(build_model(self.spec, self.device, self.seed), config())
        for name in adapter_names(self.adapters)[1:]:
            model.add_adapter(name, config())
        randomize(
            [p for _, p in sorted(model.named_parameters()) if p.requires_grad], self.seed + 1
        )
        return model.eval()

    def _peft(self) -> nn.Module:
        """PEFT LoRA at the rank, r = alpha (scale 1), no dropout, PEFT's default target modules
        for the model type (target_modules=None), adapters "default", "a1", ..."""
        from peft import LoraConfig, get_peft_model  # imported on first use

        config = lambda: LoraConfig(
            r=self.rank, lora_alpha=self.rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"
        )
        model = get_peft_model(build_model(self.spec, self.device, self.seed), config())
        for name in adapter_names(self.adapters)[1:]:
            model.add_adapter(name, config())
        randomize(
            [p for name, p in sorted(model.named_parameters()) if "lora_" in name], self.seed + 2
        )
        return model.eval()


@dataclass
class MixedSetup:
    """What every mixed method's setup receives: A adapters, the spread of the rows over them,
    the tokens ([B, T]: the prompt, or the training batch), the decode length and the models."""

    adapters: int
    spread: str
    tokens: torch.Tensor
    decode_tokens: int
    learning_rate: float
    models: ModelCache
    checked: dict[str, Any] = field(default_factory=dict)  # references the methods share

    @property
    def names(self) -> list[str]:
        return adapter_names(self.adapters)

    @property
    def row_names(self) -> list[str]:
        """Each row's adapter name."""
        names = self.names
        return [names[i] for i in row_adapters(self.tokens.shape[0], self.adapters, self.spread)]

    @property
    def dtype(self) -> torch.dtype:
        return self.models.spec.dtype

    def groups(self) -> dict[str, torch.Tensor]:
        """Adapter name -> the indices of its rows, for the adapters that have rows."""
        rows: dict[str, list[int]] = {}
        for index, name in enumerate(self.row_names):
            rows.setdefault(name, []).append(index)
        return {
            name: torch.tensor(rows[name], device=self.tokens.device)
            for name in self.names
            if name in rows
        }


class Part(NamedTuple):
    """One sub-batch a method runs: its rows (None: all), their tokens, what to call before
    running them (e.g. ``set_adapter``), extra forward arguments (e.g. ``adapter_names``) and
    the weight of its loss in a training step (its share of the rows)."""

    rows: torch.Tensor | None
    tokens: torch.Tensor
    before: Callable[[], Any]
    kwargs: dict[str, Any]
    weight: float = 1.0


class Timed(NamedTuple):
    """A phase's call, the tokens it processes, and the steps its time is divided by."""

    call: Call
    tokens: int
    steps: int = 1


@dataclass
class MixedCandidate:
    """A prepared mixed method: ``module`` and ``resident`` hold its tensors (memory accounting),
    ``phases`` its calls by phase; ``adapter_params`` the parameters of its loaded adapters."""

    module: nn.Module
    phases: dict[str, Timed]
    adapter_params: int = 0
    backend: str | None = None
    resident: list[Any] = field(default_factory=list)


def _nothing() -> None:
    return None


def whole(setup: MixedSetup, before: Callable[[], Any] = _nothing, **kwargs: Any) -> list[Part]:
    """Every row in one sub-batch."""
    return [Part(None, setup.tokens, before, kwargs)]


def per_adapter(setup: MixedSetup, set_adapter: Callable[[str], Any]) -> list[Part]:
    """One sub-batch per adapter that has rows, its adapter set before it runs."""
    rows = setup.tokens.shape[0]
    return [
        Part(
            index, setup.tokens[index], functools.partial(set_adapter, name), {}, len(index) / rows
        )
        for name, index in setup.groups().items()
    ]


def cache_argument(module: nn.Module) -> tuple[str, dict[str, Any]]:
    """The name the model takes its KV cache by ("cache" in transformers >= 5.24, else
    "past_key_values"), and the prefill's extra arguments (``logits_to_keep=1`` where taken)."""
    parameters = forward_parameters(module)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    return ("cache" if "cache" in parameters else "past_key_values"), keep


def prefill(forward: Callable[..., Any], parts: list[Part], keep: dict[str, Any]) -> list[Any]:
    """Each sub-batch's prefill with the KV cache, one after another."""
    outputs = []
    for part in parts:
        part.before()
        outputs.append(forward(input_ids=part.tokens, use_cache=True, **keep, **part.kwargs))
    return outputs


def decode(
    forward: Callable[..., Any], parts: list[Part], cache: str, steps: int, outputs: list[Any]
) -> Any:
    """Greedy decoding of ``steps`` tokens through the cache, sub-batch after sub-batch."""
    output = None
    for part, output in zip(parts, outputs):
        part.before()
        for _ in range(steps):
            token = output.logits[:, -1:].argmax(dim=-1)
            output = forward(
                input_ids=token, use_cache=True, **{cache: getattr(output, cache)}, **part.kwargs
            )
    return output


def train_step(
    forward: Callable[..., Any], parts: list[Part], optimizer: torch.optim.Optimizer | None
) -> None:
    """Forward and backward of each sub-batch (its loss weighted by its share of the rows, so
    that the gradients are those of the whole batch's mean loss), then one AdamW step."""
    output = None
    for part in parts:
        part.before()
        output = forward(input_ids=part.tokens, labels=part.tokens, use_cache=False, **part.kwargs)
        (output.loss if part.weight == 1.0 else output.loss * part.weight).backward()
    if optimizer is not None:  # the last output (logits included) stays alive through the update
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    del output


def inference_phases(
    setup: MixedSetup, module: nn.Module, forward: Callable[..., Any], parts: list[Part]
) -> dict[str, Timed]:
    """The prefill of the [B, T] prompt, and the greedy decode of ``setup.decode_tokens``
    tokens per row from a fresh (untimed) prefill."""
    cache, keep = cache_argument(module)
    rows, steps = setup.tokens.shape[0], setup.decode_tokens
    start = functools.partial(prefill, forward, parts, keep)
    return {
        "prefill": Timed(Call(start), setup.tokens.numel()),
        "decode": Timed(
            Call(functools.partial(decode, forward, parts, cache, steps), setup=start), rows, steps
        ),
    }


def check_logits(
    module: nn.Module, forward: Callable[..., Any], parts: list[Part], rows: int
) -> list[torch.Tensor]:
    """What the correctness check compares, in row order: the logits at every position of each
    row's first ``CHECK_TOKENS`` tokens, and those of one more token decoded through the cache."""
    cache, _ = cache_argument(module)
    prefills, steps, order = [], [], []
    for part in parts:
        part.before()
        tokens = part.tokens[:, :CHECK_TOKENS]
        output = forward(input_ids=tokens, use_cache=True, **part.kwargs)
        step = forward(
            input_ids=tokens[:, :1],
            use_cache=True,
            **{cache: getattr(output, cache)},
            **part.kwargs,
        )
        prefills.append(output.logits.float())
        steps.append(step.logits.float())
        order.append(torch.arange(rows, device=tokens.device) if part.rows is None else part.rows)
    inverse = torch.cat(order).argsort()
    return [torch.cat(prefills)[inverse], torch.cat(steps)[inverse]]


def largest(tensors: Sequence[torch.Tensor]) -> float:
    return max(float(t.abs().max()) for t in tensors)


def check_same(
    what: str,
    got: Sequence[torch.Tensor],
    expected: Sequence[torch.Tensor],
    dtype: torch.dtype,
    floor: float = 1.0,
) -> None:
    """Raise RuntimeError when ``got`` differs from ``expected`` by more than ``TOLERANCE``
    times the largest |expected| value (or ``floor``, if larger)."""
    error = max(
        float((g.float() - e.float()).abs().max()) for g, e in zip(got, expected, strict=True)
    )
    tolerance = TOLERANCE[dtype] * max(largest(expected), floor)
    if not error <= tolerance:  # NaN fails too
        raise RuntimeError(
            f"{what}: max |difference| {error:.3g} over the tolerance {tolerance:.3g}"
        )


def check_steers(
    what: str, steered: Sequence[torch.Tensor], base: Sequence[torch.Tensor], dtype: torch.dtype
) -> None:
    """Raise RuntimeError unless ``steered`` is finite and differs from ``base`` by more than
    twice the tolerance: adapters that act as the identity would time nothing."""
    if not all(bool(torch.isfinite(t).all()) for t in steered):
        raise RuntimeError(f"{what}: the logits are not finite")
    change = max(float((s - b).abs().max()) for s, b in zip(steered, base, strict=True))
    tolerance = TOLERANCE[dtype] * max(largest(base), 1.0)
    if not change > 2 * tolerance:
        raise RuntimeError(
            f"{what}: the adapters leave the logits unchanged (max |change| "
            f"{change:.3g}); they act as the identity"
        )


def _adapter_params(module: nn.Module, is_adapter: Callable[[str], bool]) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if is_adapter(name))


def _steered(setup: MixedSetup) -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    """The SteerModel, the logits of each row run with its own adapter one adapter at a time
    (the reference), and the base model's logits (computed once per setup)."""
    model = setup.models.get("steer")
    if "steer" not in setup.checked:
        rows = setup.tokens.shape[0]
        with torch.no_grad():
            reference = check_logits(model, model, per_adapter(setup, model.set_adapter), rows)
            with model.disable_adapter():
                base = check_logits(model, model, whole(setup), rows)
        model.set_adapter(DEFAULT_ADAPTER)
        setup.checked["steer"] = reference, base
    return model, *setup.checked["steer"]


def _steer_candidate(setup: MixedSetup, model: nn.Module, parts: list[Part]) -> MixedCandidate:
    return MixedCandidate(
        model,
        inference_phases(setup, model, model, parts),
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        steer_backend(setup.models.device),
        [model, setup.tokens],
    )


def base_method(setup: MixedSetup) -> MixedCandidate:
    """The frozen model without adapters: the floor."""
    model = setup.models.get("base")
    return MixedCandidate(
        model, inference_phases(setup, model, model, whole(setup)), resident=[model, setup.tokens]
    )


def steer_mixed(setup: MixedSetup, row_names: Sequence[str] | None = None) -> MixedCandidate:
    """The SteerModel with A adapters, one call with ``adapter_names`` (``row_names``, by
    default the setup's: another list is checked against the setup's and fails)."""
    model, reference, base = _steered(setup)
    names = list(setup.row_names if row_names is None else row_names)
    parts = whole(setup, adapter_names=names)
    with torch.no_grad():
        got = check_logits(model, model, parts, setup.tokens.shape[0])
    check_steers("steer_fast mixed batch", got, base, setup.dtype)
    check_same(
        "the mixed batch's logits differ from each adapter run alone on its rows",
        got,
        reference,
        setup.dtype,
    )
    return _steer_candidate(setup, model, parts)


def steer_separate(setup: MixedSetup) -> MixedCandidate:
    """The same SteerModel, each adapter's rows as their own batch (``set_adapter``, then the
    forward or the decode), one adapter after another: no mixed batches."""
    model, reference, base = _steered(setup)
    check_steers("steer_fast one batch per adapter", reference, base, setup.dtype)
    return _steer_candidate(setup, model, per_adapter(setup, model.set_adapter))


def steer_single(setup: MixedSetup) -> MixedCandidate:
    """The same SteerModel, every row on the default adapter, no ``adapter_names``: the
    single-adapter path, the floor of what a mixed batch can cost."""
    model, _, base = _steered(setup)
    parts = whole(setup, functools.partial(model.set_adapter, DEFAULT_ADAPTER))
    with torch.no_grad():
        got = check_logits(model, model, parts, setup.tokens.shape[0])
    check_steers("steer_fast one adapter for every row", got, base, setup.dtype)
    return _steer_candidate(setup, model, parts)


def peft_lora_mixed(setup: MixedSetup) -> MixedCandidate:
    """PEFT LoRA with A adapters (PEFT's default target modules, r = alpha = rank, no dropout),
    one call with ``adapter_names``."""
    model = setup.models.get("peft")
    rows = setup.tokens.shape[0]
    parts = whole(setup, adapter_names=setup.row_names)
    with torch.no_grad():
        reference = check_logits(model, model, per_adapter(setup, model.set_adapter), rows)
        model.set_adapter(DEFAULT_ADAPTER)
        with model.disable_adapter():
            base = check_logits(model, model, whole(setup), rows)
        got = check_logits(model, model, parts, rows)
    check_steers("PEFT LoRA mixed batch", got, base, setup.dtype)
    check_same(
        "PEFT's mixed batch's logits differ from each adapter run alone on its rows",
        got,
        reference,
        setup.dtype,
    )
    return MixedCandidate(
        model,
        inference_phases(setup, model, model, parts),
        _adapter_params(model, lambda name: "lora_" in name),
        None,
        [model, setup.tokens],
    )


def _gradients(model: nn.Module, parts: list[Part]) -> list[torch.Tensor]:
    """The adapters' gradients of one forward and backward over ``parts`` (zeros for an adapter
    that got none), then cleared."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    train_step(model, parts, None)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in trainable]
    for parameter in trainable:
        parameter.grad = None
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        raise RuntimeError("the adapters' gradients are not finite")
    return grads


def _training(setup: MixedSetup, parts: list[Part]) -> MixedCandidate:
    model = setup.models.get("steer")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=setup.learning_rate, weight_decay=0.0)
    model.train()
    step = functools.partial(train_step, model, parts, optimizer)
    return MixedCandidate(
        model,
        {"train": Timed(Call(step), setup.tokens.numel())},
        sum(p.numel() for p in trainable),
        steer_backend(setup.models.device),
        [model, optimizer, setup.tokens],
    )


def steer_mixed_train(setup: MixedSetup, row_names: Sequence[str] | None = None) -> MixedCandidate:
    """One training step (forward, backward, AdamW) over the A adapters with one mixed batch;
    its gradients must equal those of the adapters trained one after another on their rows."""
    model = setup.models.get("steer").train()
    names = list(setup.row_names if row_names is None else row_names)
    parts = whole(setup, adapter_names=names)
    reference = _gradients(model, per_adapter(setup, model.set_adapter))
    model.set_adapter(DEFAULT_ADAPTER)
    if largest(reference) == 0:
        raise RuntimeError("the adapters trained one at a time got only zero gradients")
    check_same(
        "the mixed batch's gradients differ from training each adapter on its rows",
        _gradients(model, parts),
        reference,
        setup.dtype,
        floor=0.0,
    )
    return _training(setup, parts)


def steer_separate_train(setup: MixedSetup) -> MixedCandidate:
    """Per adapter that has rows: ``set_adapter``, forward and backward on its rows (its loss
    weighted by its share of the rows); then one AdamW step over every adapter."""
    model = setup.models.get("steer").train()
    parts = per_adapter(setup, model.set_adapter)
    if largest(_gradients(model, parts)) == 0:
        raise RuntimeError("the adapters got only zero gradients")
    return _training(setup, parts)
