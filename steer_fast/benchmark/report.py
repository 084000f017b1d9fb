"""Markdown tables from records: the headline, then one table per suite.

Ratios are time divided by the reference's time: below 1 is faster than the reference. Rows of
methods that did not run stay in the tables with their status, and the reasons are listed
under each table.
"""

from __future__ import annotations

from collections import Counter

from .records import BenchmarkRecord

# The headline's references: a training method and its column.
HEADLINE_REFERENCES = {"lora_qv": "vs LoRA q,v", "lora_all": "vs LoRA all-linear",
                       "loreft": "vs LoReFT", "floor": "vs floor"}


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


def _table(header: str, rows: list[list[str]]) -> str:
    """A markdown table; ``header`` is written "a | b | c"."""
    lines = [f"| {header} |", "|" + "|".join("---" for _ in header.split(" | ")) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _not_run(r: BenchmarkRecord, header: str) -> list[str]:
    return [r.label, r.status, *["-"] * (header.count(" | ") - 1)]


def _reasons(records: list[BenchmarkRecord]) -> str:
    """One line per method and distinct reason among the rows that did not run."""
    seen = Counter((r.label, r.status, r.reason or "") for r in records if not r.ok)
    return "\n".join(f"- {label}: {status} ({n} row{'s' if n > 1 else ''}): {reason}"
                     for (label, status, reason), n in seen.items())


def _training(records: list[BenchmarkRecord]) -> list[str]:
    ms = {r.method: r.ms for r in records if r.ok}
    headline = ("method | ms/step | " + " | ".join(HEADLINE_REFERENCES.values())
                + " | tokens/s | peak memory | trainable params")
    rows = [[r.label, format_ms(r.ms),
             *(format_ratio(r.ms, ms.get(m)) for m in HEADLINE_REFERENCES),
             format_count(r.tokens_per_s), format_bytes(r.peak_mem_bytes),
             format_count(r.trainable_params)] if r.ok else _not_run(r, headline) for r in records]
    steps = [[r.label, r.status, format_ms(r.ms), format_ms(r.ms_min), format_ms(r.ms_max),
              str(r.repeats or "-"), format_count(r.tokens_per_s), format_bytes(r.peak_mem_bytes),
              format_count(r.trainable_params), r.backend or "-"] for r in records]
    return ["## Headline: one training step (forward, backward, AdamW)",
            "Ratios are milliseconds per step over the reference's: below 1x is faster.",
            _table(headline, rows), "## Training step",
            _table("method | status | ms/step (median) | min | max | repeats | tokens/s | "
                   "peak memory | trainable params | backend", steps)]


def _inference(records: list[BenchmarkRecord]) -> list[str]:
    base = {r.phase: r.ms for r in records if r.method == "base" and r.ok}
    header = ("method | prefill ms | prefill tokens/s | decode ms/token | decode tokens/s | "
              "decode vs base | peak memory (prefill / decode) | adapter params | backend")
    rows = []
    for method in dict.fromkeys(r.method for r in records):
        prefill, decode = (next(r for r in records if (r.method, r.phase) == (method, phase))
                           for phase in ("prefill", "decode"))
        rows.append([prefill.label, format_ms(prefill.ms), format_count(prefill.tokens_per_s),
                     format_ms(decode.ms), format_count(decode.tokens_per_s),
                     format_ratio(decode.ms, base.get("decode")),
                     " / ".join(format_bytes(r.peak_mem_bytes) for r in (prefill, decode)),
                     format_count(prefill.trainable_params), prefill.backend or "-"]
                    if prefill.ok else _not_run(prefill, header))
    return ["## Inference: prefill and KV-cache decode", _table(header, rows)]


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
            cells = [("-" if r is None else f"{format_ms(r.ms)} ({r.roofline_pct:.0f}%)"
                      if r.ok else r.status) for r in map(by.get, labels)]
            roofline = format_ms(by["roofline"].ms) if "roofline" in by else "-"
            table.append([str(tokens), str(d), str(rank), activation, dtype,
                          "yes" if residual else "no", roofline, *cells])
        parts += [f"### {pass_}", _table(header, table)]
    return parts


SECTIONS = {"training": _training, "inference": _inference, "kernel": _kernel}


def render_report(records: list[BenchmarkRecord], notes: list[str] = ()) -> str:
    """The whole markdown report: the run's context and ``notes``, then each suite's tables."""
    if not records:
        return "# steer_fast benchmarks\n\nNo records.\n"
    first = records[0]
    m = next((r for r in records if r.suite != "kernel"), first)
    parts = ["# steer_fast benchmarks", "\n".join([
        f"- Machine: {first.device_name} (`{first.device}`), host `{first.host}`",
        f"- Software: torch {first.torch_version}, triton {first.triton_version}, "
        f"transformers {first.transformers_version}, peft {first.peft_version}, "
        f"pyreft {first.pyreft_version}, Python {first.python_version}",
        f"- Run: {first.timestamp}, `{first.command}`",
        f"- Model: {m.model}, {m.dtype}, batch {m.batch} x {m.seq_len} tokens, "
        f"rank {m.rank}, activation {m.activation}", *notes])]
    for suite, section in SECTIONS.items():
        rows = [r for r in records if r.suite == suite]
        if rows:
            parts += section(rows)
            if reasons := _reasons(rows):
                parts.append(reasons)
    return "\n\n".join(parts) + "\n"
