"""Markdown tables from records: the headline, then one table per suite.

Ratios are time divided by the reference's time: below 1 is faster than the reference. Rows of
methods that did not run stay in the tables with their status, and the reasons are listed
under each table.
"""

from __future__ import annotations

from collections.abc import Iterable

from .records import BenchmarkRecord

HEADLINE_REFERENCES: tuple[tuple[str, str], ...] = (
    ("lora_qv", "vs LoRA q,v"),
    ("lora_all", "vs LoRA all-linear"),
    ("loreft", "vs LoReFT"),
    ("floor", "vs floor"),
)


def format_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


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
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}x"


def _columns(titles: str) -> list[str]:
    """A table header written as "a | b | c"."""
    return titles.split(" | ")


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _reasons(records: Iterable[BenchmarkRecord]) -> str:
    """One line per method and distinct reason among the rows that did not run."""
    seen: dict[tuple[str, str, str], int] = {}
    for r in records:
        if not r.ok:
            key = (r.label, r.status, r.reason or "")
            seen[key] = seen.get(key, 0) + 1
    lines = [
        f"- {label}: {status} ({count} row{'s' if count > 1 else ''}): {reason}"
        for (label, status, reason), count in seen.items()
    ]
    return "\n".join(lines)


def _by_suite(records: list[BenchmarkRecord], suite: str) -> list[BenchmarkRecord]:
    return [r for r in records if r.suite == suite]


def header_lines(records: list[BenchmarkRecord]) -> list[str]:
    first = records[0]
    m = next((r for r in records if r.suite != "kernel"), first)
    return [
        f"- Machine: {first.device_name} (`{first.device}`), host `{first.host}`",
        f"- Software: torch {first.torch_version}, triton {first.triton_version}, "
        f"transformers {first.transformers_version}, peft {first.peft_version}, "
        f"pyreft {first.pyreft_version}, Python {first.python_version}",
        f"- Run: {first.timestamp}, `{first.command}`",
        f"- Model: {m.model}, {m.dtype}, batch {m.batch} x {m.seq_len} tokens, "
        f"rank {m.rank}, activation {m.activation}",
    ]


def headline_table(records: list[BenchmarkRecord]) -> str:
    """Training step per method with its ratio to LoRA, LoReFT and the floor."""
    training = _by_suite(records, "training")
    ms = {r.method: r.ms for r in training if r.ok}
    references = [title for _, title in HEADLINE_REFERENCES]
    header = ["method", "ms/step", *references, "tokens/s", "peak memory", "trainable params"]
    rows = []
    for r in training:
        if not r.ok:
            rows.append([r.label, r.status, *["-"] * (len(header) - 2)])
            continue
        rows.append(
            [
                r.label,
                format_ms(r.ms),
                *(format_ratio(r.ms, ms.get(ref)) for ref, _ in HEADLINE_REFERENCES),
                format_count(r.tokens_per_s),
                format_bytes(r.peak_mem_bytes),
                format_count(r.trainable_params),
            ]
        )
    return _table(header, rows)


def training_table(records: list[BenchmarkRecord]) -> str:
    header = _columns(
        "method | status | ms/step (median) | min | max | repeats | tokens/s | peak memory | "
        "trainable params | backend"
    )
    rows = [
        [
            r.label,
            r.status,
            format_ms(r.ms),
            format_ms(r.ms_min),
            format_ms(r.ms_max),
            str(r.repeats or "-"),
            format_count(r.tokens_per_s),
            format_bytes(r.peak_mem_bytes),
            format_count(r.trainable_params),
            r.backend or "-",
        ]
        for r in _by_suite(records, "training")
    ]
    return _table(header, rows)


def inference_table(records: list[BenchmarkRecord]) -> str:
    inference = _by_suite(records, "inference")
    base = {r.phase: r.ms for r in inference if r.method == "base" and r.ok}
    header = _columns(
        "method | prefill ms | prefill tokens/s | decode ms/token | decode tokens/s | "
        "decode vs base | peak memory (prefill / decode) | adapter params | backend"
    )
    rows = []
    for method in dict.fromkeys(r.method for r in inference):
        phases = {r.phase: r for r in inference if r.method == method}
        prefill, decode = phases.get("prefill"), phases.get("decode")
        first = prefill or decode
        if not first.ok:
            rows.append([first.label, first.status, *["-"] * (len(header) - 2)])
            continue
        rows.append(
            [
                first.label,
                format_ms(prefill.ms),
                format_count(prefill.tokens_per_s),
                format_ms(decode.ms),
                format_count(decode.tokens_per_s),
                format_ratio(decode.ms, base.get("decode")),
                f"{format_bytes(prefill.peak_mem_bytes)} / {format_bytes(decode.peak_mem_bytes)}",
                format_count(first.trainable_params),
                first.backend or "-",
            ]
        )
    return _table(header, rows)


def _point(r: BenchmarkRecord) -> tuple:
    return (r.tokens, r.hidden_size, r.rank, r.activation, r.dtype, r.residual)


def kernel_tables(records: list[BenchmarkRecord]) -> list[tuple[str, str]]:
    """(title, table) per pass: one row per grid point, "ms (% of roofline)" per method."""
    kernel = [r for r in _by_suite(records, "kernel") if r.pass_ is not None]
    labels = {r.method: r.label for r in kernel}
    columns = [m for m in labels if m != "roofline"]  # the implementations, in run order
    header = ["N", "d", "r", "phi", "dtype", "residual", "roofline ms"]
    header += [labels[m] for m in columns]
    tables = []
    for pass_ in dict.fromkeys(r.pass_ for r in kernel):
        at: dict[tuple, dict[str, BenchmarkRecord]] = {}
        for r in kernel:
            if r.pass_ == pass_:
                at.setdefault(_point(r), {})[r.method] = r
        rows = []
        for (tokens, d, rank, activation, dtype, residual), by_method in at.items():
            roofline = by_method.get("roofline")
            cells = [_kernel_cell(by_method.get(method)) for method in columns]
            rows.append(
                [str(tokens), str(d), str(rank), activation, dtype, "yes" if residual else "no"]
                + [format_ms(roofline.ms) if roofline else "-", *cells]
            )
        tables.append((pass_, _table(header, rows)))
    return tables


def _kernel_cell(r: BenchmarkRecord | None) -> str:
    if r is None:
        return "-"
    return f"{format_ms(r.ms)} ({r.roofline_pct:.0f}%)" if r.ok else r.status


def render_report(records: list[BenchmarkRecord], notes: list[str] = ()) -> str:
    """The whole markdown report."""
    if not records:
        return "# steer_fast benchmarks\n\nNo records.\n"
    parts = ["# steer_fast benchmarks", "\n".join([*header_lines(records), *notes])]
    if _by_suite(records, "training"):
        parts += [
            "## Headline: one training step (forward, backward, AdamW)",
            "Ratios are milliseconds per step over the reference's: below 1x is faster.",
            headline_table(records),
            "## Training step",
            training_table(records),
        ]
        if reasons := _reasons(_by_suite(records, "training")):
            parts.append(reasons)
    if _by_suite(records, "inference"):
        parts += ["## Inference: prefill and KV-cache decode", inference_table(records)]
        if reasons := _reasons(_by_suite(records, "inference")):
            parts.append(reasons)
    kernel = _by_suite(records, "kernel")
    if kernel:
        parts.append("## Kernel: post_block_steer")
        copy = next((r for r in kernel if r.method == "copy" and r.ok), None)
        if copy is not None:
            parts.append(
                f"Copy bandwidth measured in this run: {copy.gbps:.1f} GB/s "
                f"({format_bytes(copy.min_bytes)} moved per copy, median of {copy.repeats}). "
                "Cells: median ms (percent of the memory roofline = minimum bytes / copy "
                "bandwidth)."
            )
        for pass_, table in kernel_tables(records):
            parts += [f"### {pass_}", table]
        if reasons := _reasons(kernel):
            parts.append(reasons)
    return "\n\n".join(parts) + "\n"
