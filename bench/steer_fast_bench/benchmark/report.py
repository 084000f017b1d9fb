"""Markdown tables from records: warnings, the headline, then one table per suite.

The report opens with any sign that the machine was busy (the machine check's warnings, and
how many timing cells the noise rule marked). The headline then says in one sentence per
baseline how steer_fast compared with it in this run, before its table. Ratios are time divided
by the reference's time: below 1 is faster than the reference (in the mixed suite's section,
tokens/s over the reference's tokens/s: above 1 is faster). A noisy cell says "noisy" next to
its time; rows of methods that did not run keep their place with their status and reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from .records import BenchmarkRecord
from .timing import NOISE_RULE

# The headline's references: a training method and its column.
HEADLINE_REFERENCES = {
    "hooks_eager": "vs hooks (eager)",
    "lora_qv": "vs LoRA q,v",
    "lora_all": "vs LoRA all-linear",
    "loreft": "vs LoReFT",
    "floor": "vs floor",
}
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
    return "\n".join(
        f"- {label}: {status} ({n} row{'s' if n > 1 else ''}): {reason}"
        for (label, status, reason), n in seen.items()
    )


def comparison(steer: BenchmarkRecord, other: BenchmarkRecord, what: str) -> str:
    """One sentence: how ``steer``'s time compares with ``other``'s."""
    if not other.ok:
        return f"- {other.label}: not measured here ({short_reason(other)})."
    ratio = steer.ms / other.ms
    verdict = (
        "on par"
        if abs(ratio - 1) <= PARITY
        else f"{1 - ratio:.0%} faster"
        if ratio < 1
        else f"{ratio - 1:.0%} slower"
    )
    noisy = [r.label for r in (steer, other) if r.noisy]
    caveat = (
        (
            f"; but {' and '.join(noisy)} {'is' if len(noisy) == 1 else 'are'} noisy, so "
            "this comparison is not reliable"
        )
        if noisy
        else ""
    )
    return (
        f"- {steer.label} takes {ratio:.2f}x the time of {other.label} {what} "
        f"({format_ms(steer.ms)} vs {format_ms(other.ms)} ms): {verdict}{caveat}."
    )


def summary(records: list[BenchmarkRecord], references: Sequence[str], what: str) -> list[str]:
    """One sentence per reference method on how steer_fast compared with it."""
    by_method = {r.method: r for r in records}
    steer = next((by_method[m] for m in STEER_FAST if m in by_method and by_method[m].ok), None)
    if steer is None:
        return ["- No steer_fast row ran, so there is nothing to compare."]
    lines = [
        f"- {r.label} did not run here ({short_reason(r)}); the sentences below compare "
        f"{steer.label}."
        for m in STEER_FAST
        if (r := by_method.get(m)) and not r.ok
    ]
    return lines + [comparison(steer, by_method[m], what) for m in references if m in by_method]


def _training(records: list[BenchmarkRecord]) -> list[str]:
    ms = {r.method: r.ms for r in records if r.ok}
    headline = (
        "method | ms/step | "
        + " | ".join(HEADLINE_REFERENCES.values())
        + " | tokens/s | peak memory | trainable params"
    )
    rows = [
        [
            r.label,
            timed(r),
            *(format_ratio(r.ms, ms.get(m)) for m in HEADLINE_REFERENCES),
            format_count(r.tokens_per_s),
            format_bytes(r.peak_mem_bytes),
            format_count(r.trainable_params),
        ]
        if r.ok
        else _not_run(r, headline)
        for r in records
    ]
    steps = [
        [
            r.label,
            r.status,
            format_ms(r.ms),
            _range(r.ms_p25, r.ms_p75),
            _range(r.ms_min, r.ms_max),
            str(r.repeats or "-"),
            f"noisy: {r.noise_reason}" if r.noisy else "-",
            format_count(r.tokens_per_s),
            format_bytes(r.peak_mem_bytes),
            format_count(r.trainable_params),
            r.backend or "-",
        ]
        for r in records
    ]
    return [
        "## Headline: one training step (forward, backward, AdamW)",
        "\n".join(summary(records, list(HEADLINE_REFERENCES), "per training step")),
        "Ratios are milliseconds per step over the reference's: below 1x is faster.",
        _table(headline, rows),
        "## Training step",
        _table(
            "method | status | ms/step (median) | p25 - p75 | min - max | repeats | "
            "noise | tokens/s | peak memory | trainable params | backend",
            steps,
        ),
    ]


def _inference(records: list[BenchmarkRecord]) -> list[str]:
    base = {r.phase: r.ms for r in records if r.method == "base" and r.ok}
    header = (
        "method | prefill ms | prefill tokens/s | decode ms/token | decode tokens/s | "
        "decode vs base | peak memory (prefill / decode) | adapter params | backend"
    )
    rows = []
    for method in dict.fromkeys(r.method for r in records):
        prefill, decode = (
            next(r for r in records if (r.method, r.phase) == (method, phase))
            for phase in ("prefill", "decode")
        )
        rows.append(
            [
                prefill.label,
                timed(prefill),
                format_count(prefill.tokens_per_s),
                timed(decode),
                format_count(decode.tokens_per_s),
                format_ratio(decode.ms, base.get("decode")),
                " / ".join(format_bytes(r.peak_mem_bytes) for r in (prefill, decode)),
                format_count(prefill.trainable_params),
                prefill.backend or "-",
            ]
            if prefill.ok
            else _not_run(prefill, header)
        )
    decode = [r for r in records if r.phase == "decode"]
    return [
        "## Inference: prefill and KV-cache decode",
        "\n".join(
            summary(
                decode,
                ["hooks_eager", "lora_unmerged", "lora_merged", "loreft", "base"],
                "per decoded token",
            )
        ),
        _table(header, rows),
    ]


def _kernel(records: list[BenchmarkRecord]) -> list[str]:
    """The copy bandwidth, then per pass one row per grid point, "ms (% of roofline)" per
    implementation."""
    parts = ["## Kernel: post_block_steer"]
    copy = next((r for r in records if r.method == "copy" and r.ok), None)
    if copy is not None:
        parts.append(
            f"Copy bandwidth measured in this run: {copy.gbps:.1f} GB/s "
            f"({format_bytes(copy.min_bytes)} moved per copy, median of {copy.repeats}). "
            "Cells: median ms (percent of the memory roofline = minimum bytes / copy "
            "bandwidth)."
        )
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
            cells = [
                (
                    "-"
                    if r is None
                    else f"{format_ms(r.ms)} ({r.roofline_pct:.0f}%{', noisy' if r.noisy else ''})"
                    if r.ok
                    else r.status
                )
                for r in map(by.get, labels)
            ]
            roofline = format_ms(by["roofline"].ms) if "roofline" in by else "-"
            table.append(
                [
                    str(tokens),
                    str(d),
                    str(rank),
                    activation,
                    dtype,
                    "yes" if residual else "no",
                    roofline,
                    *cells,
                ]
            )
        parts += [f"### {pass_}", _table(header, table)]
    return parts


# The mixed suite's phases in report order, with their headings.
MIXED_PHASES = {
    "prefill": "prefill of the B x T prompt",
    "decode": "KV-cache decode",
    "train": "training step (forward, backward, AdamW over the A adapters)",
}
# The mixed suite's comparisons: per compared method, its references and their short names.
MIXED_COMPARISONS = {
    "steer_mixed": {
        "peft_lora_mixed": "PEFT",
        "steer_separate": "separate",
        "steer_single": "single",
    },
    "steer_mixed_train": {"steer_separate_train": "one at a time"},
}


def _and(items: Sequence[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def mixed_comparison(case: str, subject: BenchmarkRecord, references: list[BenchmarkRecord]) -> str:
    """One sentence: ``subject``'s tokens/s as a multiple of each reference's, measured side by
    side at the same A and spread (``case`` says which), with a caveat for noisy cells."""
    if not subject.ok:
        return f"- {case}: {subject.label} did not run ({short_reason(subject)})."
    measured = [r for r in references if r.ok]
    text = f"- {case}: {subject.label}"
    if measured:
        ratios = [f"{subject.tokens_per_s / r.tokens_per_s:.2f}x" for r in measured]
        clauses = [
            f"{ratios[0]} the tokens/s of {measured[0].label}",
            *(f"{ratio} that of {r.label}" for ratio, r in zip(ratios[1:], measured[1:])),
        ]
        values = _and([format_count(r.tokens_per_s) for r in measured])
        text += (
            f" reaches {_and(clauses)} ({format_count(subject.tokens_per_s)} vs {values} tokens/s)"
        )
        noisy = [r.label for r in (subject, *measured) if r.noisy]
        if noisy:
            text += (
                f"; but {_and(noisy)} {'is' if len(noisy) == 1 else 'are'} noisy, so "
                f"{'this ratio is' if len(measured) == 1 else 'these ratios are'} not "
                "reliable"
            )
    else:
        text += f": {format_count(subject.tokens_per_s)} tokens/s"
    missing = [f"{r.label} not measured here ({short_reason(r)})" for r in references if not r.ok]
    return text + "".join(f"; {m}" for m in missing) + "."


def _mixed(records: list[BenchmarkRecord]) -> list[str]:
    """Per phase: one sentence per (A, spread) comparing the mixed batch with PEFT's, with one
    batch per adapter and with one adapter for every row; a table of tokens/s; then the peak
    memory of every method."""
    first = records[0]
    parts = [
        "## Mixed batches: many adapters, one batch",
        f"{first.batch} rows x {first.seq_len} tokens, A adapters loaded, each row on its own "
        "adapter (even: row i -> adapter i mod A; skewed: half of the rows on one adapter). "
        "Cells: tokens/s, median (higher is faster); ratios: tokens/s over the reference's, "
        "measured side by side in this run (above 1x is faster).",
    ]
    cases = list(dict.fromkeys((r.adapters, r.spread) for r in records))
    labels = {r.method: r.label for r in records}  # in table order
    at = {(r.adapters, r.spread, r.method, r.phase): r for r in records}
    for phase, title in MIXED_PHASES.items():
        methods = [m for m in labels if any(key[2:] == (m, phase) for key in at)]
        if not methods:
            continue
        comparisons = [
            (subject, references)
            for subject, references in MIXED_COMPARISONS.items()
            if subject in methods
        ]
        ratio_columns = [
            (subject, reference, f"mixed vs {short}")
            for subject, references in comparisons
            for reference, short in references.items()
            if reference in methods
        ]
        sentences, table = [], []
        for count, spread in cases:
            row = {m: at.get((count, spread, m, phase)) for m in methods}
            if not any(row.values()):
                continue
            for subject, references in comparisons:
                if row[subject] is not None:
                    sentences.append(
                        mixed_comparison(
                            f"A = {count}, {spread}",
                            row[subject],
                            [row[r] for r in references if row.get(r) is not None],
                        )
                    )
            cells = [
                "-"
                if r is None
                else (format_count(r.tokens_per_s) + (" (noisy)" if r.noisy else ""))
                if r.ok
                else short_reason(r).split(":")[0]
                for r in row.values()
            ]
            ratios = [
                format_ratio(
                    *(
                        None if r is None or not r.ok else r.tokens_per_s
                        for r in (row[subject], row[reference])
                    )
                )
                for subject, reference, _ in ratio_columns
            ]
            table.append([str(count), spread, *cells, *ratios])
        header = " | ".join(
            [
                "A",
                "spread",
                *(labels[m] for m in methods),
                *(column for _, _, column in ratio_columns),
            ]
        )
        parts += [f"### Mixed: {title}, tokens/s", "\n".join(sentences), _table(header, table)]
    memory, methods = [], list(labels)
    for count, spread in cases:
        cells = []
        for method in methods:
            found = [
                at[key] for key in ((count, spread, method, p) for p in MIXED_PHASES) if key in at
            ]
            cells.append(" / ".join(format_bytes(r.peak_mem_bytes) for r in found) or "-")
        memory.append([str(count), spread, *cells])
    parts += [
        "### Mixed: peak memory (prefill / decode, or the training step)",
        _table(" | ".join(["A", "spread", *labels.values()]), memory),
    ]
    return parts


SECTIONS = {"training": _training, "inference": _inference, "kernel": _kernel, "mixed": _mixed}


def noise_warning(records: list[BenchmarkRecord]) -> str | None:
    """A sentence on the noisy timing cells, or None when there are none."""
    measured = [r for r in records if r.ok and r.noisy is not None]
    noisy = [r for r in measured if r.noisy]
    if not noisy:
        return None
    by_suite = Counter(r.suite for r in noisy)
    where = ", ".join(f"{n} {suite}" for suite, n in by_suite.items())
    return (
        f"{len(noisy)} of {len(measured)} timing cells are noisy ({where}), marked "
        f'"noisy" below: a cell is noisy when {NOISE_RULE}. Ratios involving them are not '
        "reliable; rerun on an idle machine"
    )


def render_report(
    records: list[BenchmarkRecord],
    notes: Sequence[str] = (),
    warnings: Sequence[str] = (),
    cautions: Sequence[str] = (),
) -> str:
    """The whole markdown report: ``warnings`` (the machine check's), the noise warning and
    ``cautions`` (what the run's size cannot show), the run's context and ``notes``, then each
    suite's tables."""
    if not records:
        return "# steer_fast benchmarks\n\nNo records.\n"
    first = records[0]
    m = next((r for r in records if r.suite != "kernel"), first)
    found = [
        *(f"the machine was busy: {w}" for w in warnings),
        noise_warning(records),
        *cautions,
    ]
    parts = ["# steer_fast benchmarks"]
    parts += [f"> **Warning:** {w}." for w in found if w]
    parts.append(
        "\n".join(
            [
                f"- Machine: {first.device_name} (`{first.device}`), host `{first.host}`",
                f"- Software: torch {first.torch_version}, triton {first.triton_version}, "
                f"transformers {first.transformers_version}, peft {first.peft_version}, "
                f"pyreft {first.pyreft_version}, Python {first.python_version}",
                f"- Run: {first.timestamp}, `{first.command}`",
                f"- Model: {m.model}, {m.dtype}, batch {m.batch} x {m.seq_len} tokens, "
                f"rank {m.rank}, activation {m.activation}",
                *notes,
            ]
        )
    )
    for suite, section in SECTIONS.items():
        rows = [r for r in records if r.suite == suite]
        if rows:
            parts += section(rows)
            if reasons := _reasons(rows):
                parts.append(reasons)
    return "\n\n".join(parts) + "\n"
