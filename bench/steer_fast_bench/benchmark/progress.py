"""How long a run should take, said before it starts, and a progress bar counted in seconds.

``probe_model`` times the model under test once (built as every method builds it, no adapter:
a training forward + backward with input gradients, a prefill and a decoded token) and each
suite turns that into its expected duration from its timing plan (``ModelSuite.estimate_s``,
``kernel_suite.estimate_s``; the mixed suite probes its own batch shape with ``probe_mixed``,
``mixed_suite.estimate_s``). ``Progress`` shows elapsed time and the time left: for the suite
running now, the larger of its current timing block's measured rest (its rounds left times its
measured round time) and what is left of the suite (extrapolated from the time its finished
part took, once it reports one, else from its estimate); plus the estimates of the suites still
to run, scaled by how long the finished suites took against theirs.
"""

from __future__ import annotations

import sys
import time
from typing import NamedTuple

import torch

from .memory import release_memory
from .models import build_model, forward_parameters, make_tokens
from .timing import synchronize

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm comes with the [bench] extra; without it, no progress bar
    tqdm = None


class Probe(NamedTuple):
    """Seconds the model under test takes once, measured before the suites run."""

    build_s: float  # building it with its weights
    step_s: float  # a training forward + backward, input gradients only
    prefill_s: float  # a prefill with the KV cache
    token_s: float  # one decoded token, through the cache


def _seconds(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _call_seconds(
    model: torch.nn.Module, tokens: torch.Tensor, device: torch.device
) -> tuple[float, float, float]:
    """A training forward + backward (the second of two; the frozen model with input gradients,
    as the floor method runs it), a prefill and a decoded token."""
    embed = model.requires_grad_(False).get_input_embeddings()
    step = lambda: model(
        inputs_embeds=embed(tokens).requires_grad_(True), labels=tokens
    ).loss.backward()
    step()
    step_s = _seconds(step, device)
    model.eval()
    parameters = forward_parameters(model)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    cache = "cache" if "cache" in parameters else "past_key_values"
    with torch.inference_mode():
        prefill = lambda: model(input_ids=tokens, use_cache=True, **keep)
        past = getattr(prefill(), cache)
        prefill_s = _seconds(prefill, device)
        decode = lambda: model(input_ids=tokens[:, -1:], use_cache=True, **{cache: past})
        decode()
        return step_s, prefill_s, _seconds(decode, device)


def probe_model(settings) -> Probe:
    """Time the model of ``settings`` (a ``BenchmarkSettings``) once per kind of call."""
    s, built = settings, []
    build_s = _seconds(lambda: built.append(build_model(s.spec, s.device, s.seed)), s.device)
    tokens = make_tokens(s.spec, s.batch, s.seq_len, s.device, s.seed)
    times = _call_seconds(built.pop(), tokens, s.device)
    release_memory(s.device)
    return Probe(build_s, *times)


class MixedProbe(NamedTuple):
    """Seconds the model under test takes once at the mixed suite's batch shape."""

    build_s: float  # building it with its weights
    step_s: float  # a training forward + backward of the B x T batch, input gradients only
    prefill_s: float  # a prefill of the B x T prompt
    token_s: float  # one decoded token of the B rows
    call_s: float  # one decoded token of a single row: a call on a small batch


def probe_mixed(settings, rows: int, length: int) -> MixedProbe:
    """Time the model of ``settings`` once per kind of call on ``rows`` x ``length`` tokens,
    and one decoded token of one row."""
    s, built = settings, []
    build_s = _seconds(lambda: built.append(build_model(s.spec, s.device, s.seed)), s.device)
    model = built.pop()
    tokens = make_tokens(s.spec, rows, length, s.device, s.seed)
    times = _call_seconds(model, tokens, s.device)
    call_s = _call_seconds(model, tokens[:1], s.device)[2]
    del model
    release_memory(s.device)
    return MixedProbe(build_s, *times, call_s)


def format_duration(seconds: float) -> str:
    """ "45 s", "4 min", "1 h 20 min"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds // 3600:.0f} h {seconds % 3600 / 60:.0f} min"


class Progress:
    """The run's progress bar, in seconds (on stderr; nothing when ``show`` is False or tqdm is
    missing). ``estimates`` gives each suite's expected seconds, in the order they run."""

    def __init__(self, estimates: dict[str, float], show: bool = True) -> None:
        self.estimates, self.done = dict(estimates), {}  # done: suite -> (seconds, estimate)
        self.started = self.suite_started = time.perf_counter()
        self.suite: str | None = None
        self.block_left: float | None = None
        self.fraction = 0.0  # of the current suite, as it reports it
        self.bar = None
        if show and tqdm is not None:
            self.bar = tqdm(
                total=1.0,
                file=sys.stderr,
                dynamic_ncols=True,
                bar_format="{percentage:3.0f}%|{bar:20}| {desc}",
            )
        self.text = ""

    @property
    def scale(self) -> float:
        """How long the finished suites took over their estimates (1 before any finished)."""
        took = sum(seconds for seconds, _ in self.done.values())
        expected = sum(estimate for _, estimate in self.done.values())
        return took / expected if expected > 0 else 1.0

    def start_suite(self, suite: str) -> None:
        now = time.perf_counter()
        if self.suite is not None:
            self.done[self.suite] = (now - self.suite_started, self.estimates[self.suite])
        self.suite, self.suite_started, self.block_left, self.fraction = suite, now, None, 0.0
        self.describe(suite)

    def describe(self, text: str) -> None:
        """A new description of what runs now (the end of any timing block)."""
        self.block_left, self.text = None, text
        self.refresh()

    def timing_left(self, seconds: float) -> None:
        """The current timing block's measured rest (``measure_interleaved``'s ``on_round``)."""
        self.block_left = seconds
        self.refresh()

    def part_done(self, fraction: float) -> None:
        """The share of the current suite finished so far (e.g. kernel cases done / all)."""
        self.fraction = fraction
        self.refresh()

    def left_s(self) -> float:
        """The seconds the run should still take (see the module docstring)."""
        in_suite = time.perf_counter() - self.suite_started
        later = [s for s in self.estimates if s != self.suite and s not in self.done]
        current = 0.0
        if self.suite is not None:
            rest = (
                in_suite * (1 - self.fraction) / self.fraction
                if self.fraction > 0
                else self.estimates[self.suite] * self.scale - in_suite
            )
            current = max(rest, self.block_left or 0.0, 0.0)
        return current + self.scale * sum(self.estimates[s] for s in later)

    def refresh(self) -> None:
        if self.bar is None:
            return
        elapsed, left = time.perf_counter() - self.started, self.left_s()
        self.bar.total, self.bar.n = elapsed + left, elapsed
        self.bar.set_description_str(
            f"{format_duration(elapsed)} elapsed, about {format_duration(left)} left - {self.text}"[
                :100
            ]
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.n = self.bar.total
            self.bar.close()
