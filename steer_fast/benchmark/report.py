"""Markdown tables from records: warnings, the headline, then one table per suite.

The report opens with any sign that the machine was busy (the machine check's warnings, and
how many timing cells the noise rule marked). The headline then says in one sentence per
baseline how steer_fast compared with it in this run, before its table. Ratios are time divided
by the reference's time: below 1 is faster than the reference. A noisy cell says "noisy" next
to its time; rows of methods that did not run keep their place with their status and reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from .records import BenchmarkRecord
from .timing import NOISE_RULE

# The headline's references: a training method and its column.
HEADLINE_REFERENCES = {"hooks_eager": "vs hooks (eager)", "lora_qv": "vs LoRA q,v",
                       "lora_all": "vs LoRA all-linear", "loreft": "vs LoReFT",
                       "floor": "vs floor"}
# steer_fast's rows, the preferred first: the headline compares the first that ran.
STEER_FAST = ("steer_fast_fused", "steer_fast_torch")
PARITY = 0.05  # ratios within 5% of 1 read "on par"


def format_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    digits = 0 if ms >= 100 else 1 if ms >= 10 else 2 if ms >= 1 else 3
    return f"{ms:.{digits}f}"


def format_count(value: float | None) -> str:
    if value is None:
        return "-"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 2**20:.1f} MiB" if value < 2**30 else f"{value / 2**30:.2f} GiB"


def format_ratio(value: float | None, reference: float | None) -> str:
    return "-" if value is None or not reference else f"{value / reference:.2f}x"


def timed(r: BenchmarkRecord) -> str:
    """The median, marked when the cell is noisy."""
    return format_ms(r.ms) + (" (noisy)" if r.noisy else "")


def short_reason(r: BenchmarkRecord) -> str:
    """The status and the first clause of the reason: "skipped: needs CUDA ..."."""
    return f"{r.status}: {(r.reason or '').split(';')[0]}" if r.reason else r.status


def _table(header: str, rows: list[list[str]]) -> str:
    """A markdown table; ``header`` is written "a | b | c"."""
    lines = [f"| {header} |", "|" + "|".join("---" for _ in header.split(" | ")) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _range(low: float | None, high: float | None) -> str:
    return "-" if low is None or high is None else f"{format_ms(low)} - {format_ms(high)}"


def _not_run(r: BenchmarkRecord, header: str) -> list[str]:
    return [r.label, short_reason(r), *["-"] * (header.count(" | ") - 1)]


def _reasons(records: list[BenchmarkRecord]) -> str:
    """One line per method and distinct reason among the rows that did not run."""
    seen = Counter((r.label, r.status, r.reason or "") for r in records if not r.ok)
    return "\n".join(f"- {label}: {status} ({n} row{'s' if n > 1 else ''}): {reason}"
                     for (label, status, reason), n in seen.items())


def comparison(steer: BenchmarkRecord, other: BenchmarkRecord, what: str) -> str:
    """One sentence: how ``steer``'s time compares with ``other``'s."""
    if not other.ok:
        return f"- {other.label}: not measured here ({short_reason(other)})."
    ratio = steer.ms / other.ms
    verdict = ("on par" if abs(ratio - 1) <= PARITY else
               f"{1 - ratio:.0%} faster" if ratio < 1 else f"{ratio - 1:.0%} slower")
    noisy = [r.label for r in (steer, other) if r.noisy]
    caveat = (f"; but {' and '.join(noisy)} {'is' if len(noisy) == 1 else 'are'} noisy, so "
              "this comparison is not reliable") if noisy else ""
    return (f"- {steer.label} takes {ratio:.2f}x the time of {other.label} {what} "
            f"({format_ms(steer.ms)} vs {format_ms(other.ms)} ms): {verdict}{caveat}.")


def summary(records: list[BenchmarkRecord], references: Sequence[str], what: str) -> list[str]:
    """One sentence per reference method on how steer_fast compared with it."""
    by_method = {r.method: r for r in records}
    steer = next((by_method[m] for m in STEER_FAST if m in by_method and by_method[m].ok), None)
    if steer is None:
        return ["- No steer_fast row ran, so there is nothing to compare."]
    lines = [f"- {r.label} did not run here ({short_reason(r)}); the sentences below compare "
             f"{steer.label}." for m in STEER_FAST if (r := by_method.get(m)) and not r.ok]
    return lines + [comparison(steer, by_method[m], what) for m in references
                    if m in by_method]


def _training(records: list[BenchmarkRecord]) -> list[str]:
    ms = {r.method: r.ms for r in records if r.ok}
    headline = ("method | ms/step | " + " | ".join(HEADLINE_REFERENCES.values())
                + " | tokens/s | peak memory | trainable params")
    rows = [[r.label, timed(r), *(format_ratio(r.ms, ms.get(m)) for m in HEADLINE_REFERENCES),
             format_count(r.tokens_per_s), format_bytes(r.peak_mem_bytes),
             format_count(r.trainable_params)] if r.ok else _not_run(r, headline) for r in records]
    steps = [[r.label, r.status, format_ms(r.ms), _range(r.ms_p25, r.ms_p75),
              _range(r.ms_min, r.ms_max), str(r.repeats or "-"),
              f"noisy: {r.noise_reason}" if r.noisy else "-", format_count(r.tokens_per_s),
              format_bytes(r.peak_mem_bytes), format_count(r.trainable_params), r.backend or "-"]
             for r in records]
    return ["## Headline: one training step (forward, backward, AdamW)",
            "\n".join(summary(records, list(HEADLINE_REFERENCES), "per training step")),
            "Ratios are milliseconds per step over the reference's: below 1x is faster.",
            _table(headline, rows), "## Training step",
            _table("method | status | ms/step (median) | p25 - p75 | min - max | repeats | "
                   "noise | tokens/s | peak memory | trainable params | backend", steps)]


def _inference(records: list[BenchmarkRecord]) -> list[str]:
    base = {r.phase: r.ms for r in records if r.method == "base" and r.ok}
    header = ("method | prefill ms | prefill tokens/s | decode ms/token | decode tokens/s | "
              "decode vs base | peak memory (prefill / decode) | adapter params | backend")
    rows = []
    for method in dict.fromkeys(r.method for r in records):
        prefill, decode = (next(r for r in records if (r.method, r.phase) == (method, phase))
                           for phase in ("prefill", "decode"))
        rows.append([prefill.label, timed(prefill), format_count(prefill.tokens_per_s),
                     timed(decode), format_count(decode.tokens_per_s),
                     format_ratio(decode.ms, base.get("decode")),
                     " / ".join(format_bytes(r.peak_mem_bytes) for r in (prefill, decode)),
                     format_count(prefill.trainable_params), prefill.backend or "-"]
                    if prefill.ok else _not_run(prefill, header))
    decode = [r for r in records if r.phase == "decode"]
    return ["## Inference: prefill and KV-cache decode",
            "\n".join(summary(decode, ["hooks_eager", "lora_unmerged", "lora_merged", "loreft",
                                       "base"], "per decoded token")),
            _table(header, rows)]


def _kernel(records: list[BenchmarkRecord]) -> list[str]:
    """The copy bandwidth, then per pass one row per grid point, "ms (% of roofline)" per
    implementation."""
    parts = ["## Kernel: post_block_steer"]
    copy = next((r for r in records if r.method == "copy" and r.ok), None)
    if copy is not None:
        parts.append(f"Copy bandwidth measured in this run: {copy.gbps:.1f} GB/s "
                     f"({format_bytes(copy.min_bytes)} moved per copy, median of {copy.repeats}). "
                     "Cells: median ms (percent of the memory roofline = minimum bytes / copy "
                     "bandwidth).")
    rows = [r for r in records if r.pass_ is not None]
    labels = {r.method: r.label for r in rows if r.method != "roofline"}  # in run order
    header = " | ".join(["N | d | r | phi | dtype | residual | roofline ms", *labels.values()])
    for pass_ in dict.fromkeys(r.pass_ for r in rows):
        at: dict[tuple, dict[str, BenchmarkRecord]] = {}
        for r in rows:
            if r.pass_ == pass_:
                point = (r.tokens, r.hidden_size, r.rank, r.activation, r.dtype, r.residual)
                at.setdefault(point, {})[r.method] = r
        table = []
        for (tokens, d, rank, activation, dtype, residual), by in at.items():
            cells = [("-" if r is None else
                      f"{format_ms(r.ms)} ({r.roofline_pct:.0f}%{', noisy' if r.noisy else ''})"
                      if r.ok else r.status) for r in map(by.get, labels)]
            roofline = format_ms(by["roofline"].ms) if "roofline" in by else "-"
            table.append([str(tokens), str(d), str(rank), activation, dtype,
                          "yes" if residual else "no", roofline, *cells])
        parts += [f"### {pass_}", _table(header, table)]
    return parts


SECTIONS = {"training": _training, "inference": _inference, "kernel": _kernel}


def noise_warning(records: list[BenchmarkRecord]) -> str | None:
    """A sentence on the noisy timing cells, or None when there are none."""
    measured = [r for r in records if r.ok and r.noisy is not None]
    noisy = [r for r in measured if r.noisy]
    if not noisy:
        return None
    by_suite = Counter(r.suite for r in noisy)
    where = ", ".join(f"{n} {suite}" for suite, n in by_suite.items())
    return (f"{len(noisy)} of {len(measured)} timing cells are noisy ({where}), marked "
            f"\"noisy\" below: a cell is noisy when {NOISE_RULE}. Ratios involving them are not "
            "reliable; rerun on an idle machine")


def render_report(records: list[BenchmarkRecord], notes: Sequence[str] = (),
                  warnings: Sequence[str] = ()) -> str:
    """The whole markdown report: ``warnings`` (the machine check's) and the noise warning,
    the run's context and ``notes``, then each suite's tables."""
    if not records:
        return "# steer_fast benchmarks\n\nNo records.\n"
    first = records[0]
    m = next((r for r in records if r.suite != "kernel"), first)
    found = [*(f"the machine was busy: {w}" for w in warnings), noise_warning(records)]
    parts = ["# steer_fast benchmarks"]
    parts += [f"> **Warning:** {w}." for w in found if w]
    parts.append("\n".join([
        f"- Machine: {first.device_name} (`{first.device}`), host `{first.host}`",
        f"- Software: torch {first.torch_version}, triton {first.triton_version}, "
        f"transformers {first.transformers_version}, peft {first.peft_version}, "
        f"pyreft {first.pyreft_version}, Python {first.python_version}",
        f"- Run: {first.timestamp}, `{first.command}`",
        f"- Model: {m.model}, {m.dtype}, batch {m.batch} x {m.seq_len} tokens, "
        f"rank {m.rank}, activation {m.activation}", *notes]))
    for suite, section in SECTIONS.items():
        rows = [r for r in records if r.suite == suite]
        if rows:
            parts += section(rows)
            if reasons := _reasons(rows):
                parts.append(reasons)
    return "\n\n".join(parts) + "\n"
