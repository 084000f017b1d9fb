"""PNG figures of a run, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Every bar is a median with whiskers over the interquartile range (min to max for records that
have no quartiles); a noisy cell's bar is hatched and its label says "noisy"; a method that did
not run keeps its place with its status and reason. All value axes start at zero. The mixed
suite's figure draws lines instead: tokens/s against the adapter count, one line per method and
spread, whiskers over the interquartile range, noisy points hollow and red-edged.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .records import BenchmarkRecord
from .report import format_ms, short_reason

NOISY_STYLE = dict(hatch="///", edgecolor="tab:red")
SPREAD = "bars: median; whiskers: interquartile range; hatched: noisy (see report.md)"


def _figure(width: float, height: float, panels: int):
    """A figure with ``panels`` side by side, on an Agg canvas of its own."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, panels, squeeze=False)[0]


def _whiskers(r: BenchmarkRecord, value: float, at=lambda ms: ms) -> list[list[float]]:
    """matplotlib's ``xerr`` of one bar: below and above ``value``, the record's spread drawn
    through ``at`` (what the axis shows for a time in ms)."""
    low, high = (r.ms_p25, r.ms_p75) if r.ms_p25 is not None else (r.ms_min, r.ms_max)
    if not r.ok or not low or not high:
        return [[0.0], [0.0]]
    a, b = sorted((at(low), at(high)))
    return [[max(value - a, 0.0)], [max(b - value, 0.0)]]


def _bar_panels(rows: list[BenchmarkRecord], panels, what: str, path: Path, height: int) -> None:
    """One horizontal bar panel per (rows, value, x label, timed), labelled on the first only;
    ``timed`` panels show the spread and the noise mark."""
    figure, axes = _figure(12, 0.5 * height + 1.8, len(panels))
    for axis, (panel, value, xlabel, is_timed) in zip(axes, panels):
        values, positions, right = [value(r) for r in panel], list(range(len(panel))), 1.0
        for y, v, r in zip(positions, values, panel):
            noisy = is_timed and bool(r.noisy)
            spread = _whiskers(r, v) if is_timed and v else None
            axis.barh(
                y,
                v or 0.0,
                color="tab:blue",
                xerr=spread,
                capsize=3,
                **(NOISY_STYLE if noisy else {}),
            )
            end = (v or 0.0) + (spread[1][0] if spread else 0.0)
            text = (
                f" {format_ms(v)}{' noisy' if noisy else ''}" if v else f" {short_reason(r)[:60]}"
            )
            axis.text(end, y, text, va="center", fontsize=8)
            right = max(right, end)
        axis.set_yticks(positions, [r.label for r in panel])
        axis.invert_yaxis()
        axis.set_xlim(0, right * 1.3)
        axis.set_xlabel(xlabel)
    axes[1].set_yticks([])
    figure.suptitle(
        f"{what} - {rows[0].model}, {rows[0].dtype}\n{rows[0].device_name}\n{SPREAD}", fontsize=10
    )
    figure.savefig(path, dpi=120)


def plot_training(rows: list[BenchmarkRecord], path: Path) -> None:
    memory = lambda r: r.peak_mem_bytes / 2**20 if r.peak_mem_bytes else None
    panels = [
        (rows, lambda r: r.ms, "ms per training step (median)", True),
        (rows, memory, "peak memory (MiB)", False),
    ]
    _bar_panels(rows, panels, "Training step", path, len(rows))


def plot_inference(rows: list[BenchmarkRecord], path: Path) -> None:
    methods = list(dict.fromkeys(r.method for r in rows))
    by_phase = {(r.method, r.phase): r for r in rows}
    panels = [
        ([by_phase[m, phase] for m in methods], lambda r: r.ms, xlabel, True)
        for phase, xlabel in (
            ("prefill", "prefill ms (median)"),
            ("decode", "decode ms per token (median)"),
        )
    ]
    _bar_panels(rows, panels, "Inference", path, len(methods))


def _case_label(r: BenchmarkRecord) -> str:
    return (
        f"N={r.tokens} d={r.hidden_size} r={r.rank}\n{r.activation} {r.dtype}"
        f"{' +residual' if r.residual else ''}"
    )


def plot_kernel(records: list[BenchmarkRecord], path: Path) -> None:
    """Per pass, grouped bars: one group per grid point (named by its shape, rank, activation
    and dtype), one bar per implementation, its percent of the memory roofline."""
    rows = [r for r in records if r.pass_ is not None and r.method != "roofline"]
    copy = next((r for r in records if r.method == "copy" and r.ok), None)
    passes = list(dict.fromkeys(r.pass_ for r in rows))
    labels = {r.method: r.label for r in rows}
    cases = list(dict.fromkeys(_case_label(r) for r in rows))
    colors = {method: f"C{i}" for i, method in enumerate(labels)}
    width = 0.8 / max(len(labels), 1)
    figure, axes = _figure(7 * len(passes), 0.3 * len(cases) * (len(labels) + 1) + 2.5, len(passes))
    not_run: dict[str, str] = {}
    for axis, pass_ in zip(axes, passes):
        at = {(_case_label(r), r.method): r for r in rows if r.pass_ == pass_}
        top = 1.0
        for i, method in enumerate(labels):
            for group, case in enumerate(cases):
                r = at.get((case, method))
                y = group + (i - (len(labels) - 1) / 2) * width
                if r is None:
                    continue
                if not r.ok:
                    not_run[labels[method]] = short_reason(r)
                    axis.text(0, y, f" {r.status}", va="center", fontsize=7, color="gray")
                    continue
                value = r.roofline_pct
                spread = _whiskers(r, value, lambda ms, r=r, value=value: value * r.ms / ms)
                axis.barh(
                    y,
                    value,
                    height=width,
                    color=colors[method],
                    xerr=spread,
                    capsize=2,
                    **(NOISY_STYLE if r.noisy else {}),
                )
                axis.text(
                    value + spread[1][0],
                    y,
                    f" {format_ms(r.ms)} ms{' noisy' if r.noisy else ''}",
                    va="center",
                    fontsize=7,
                )
                top = max(top, value + spread[1][0])
        axis.set_yticks(range(len(cases)), cases, fontsize=8)
        axis.invert_yaxis()
        axis.set_xlim(0, top * 1.4)
        if top >= 60:
            axis.axvline(100, color="black", linestyle="--", linewidth=1)
        axis.set(
            xlabel="% of the memory roofline (minimum bytes / copy bandwidth; higher is faster)",
            title=pass_,
        )
    handles = [
        Patch(color=colors[m], label=label) for m, label in labels.items() if label not in not_run
    ]
    skipped = "".join(f"\nnot run: {label} ({reason[:80]})" for label, reason in not_run.items())
    figure.legend(
        handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8
    )
    bandwidth = f", copy bandwidth {copy.gbps:.1f} GB/s" if copy is not None else ""
    figure.suptitle(
        f"post_block_steer kernel - {rows[0].device_name}{bandwidth}\n{SPREAD}{skipped}", fontsize=9
    )
    figure.savefig(path, dpi=110)


def _tokens_per_s_spread(r: BenchmarkRecord) -> list[list[float]]:
    """matplotlib's ``yerr`` of one point: tokens/s at the slow and fast quartiles of its time."""
    if r.ms_p25 is None or r.ms_p75 is None or not r.ms_p25 or not r.ms_p75:
        return [[0.0], [0.0]]
    low, high = r.tokens_per_s * r.ms / r.ms_p75, r.tokens_per_s * r.ms / r.ms_p25
    return [[max(r.tokens_per_s - low, 0.0)], [max(high - r.tokens_per_s, 0.0)]]


def plot_mixed(rows: list[BenchmarkRecord], path: Path) -> None:
    """One panel per phase (prefill, decode, training step): tokens/s against the adapter
    count A (log scale), one colour per method, even spread solid, skewed dashed (from the
    even point at A = 1, where the two spreads are the same)."""
    phases = [p for p in ("prefill", "decode", "train") if any(r.phase == p for r in rows)]
    labels = {r.method: r.label for r in rows}
    colors = {method: f"C{i}" for i, method in enumerate(labels)}
    counts = sorted({r.adapters for r in rows if r.adapters is not None})
    styles = {"even": ("-", "o"), "skewed": ("--", "s")}
    figure, axes = _figure(5.5 * len(phases), 5.8, len(phases))
    not_run: dict[str, str] = {}
    titles = {"prefill": "prefill", "decode": "decode (per token)", "train": "training step"}
    for axis, phase in zip(axes, phases):
        top = 1.0
        for method in labels:
            at = {(r.spread, r.adapters): r for r in rows if (r.method, r.phase) == (method, phase)}
            for r in at.values():
                if not r.ok:
                    not_run[labels[method]] = short_reason(r)
            for spread, (line, marker) in styles.items():
                points = [at[key] for key in sorted(at) if key[0] == spread]
                if spread == "skewed" and points and ("skewed", 1) not in at and ("even", 1) in at:
                    points.insert(0, at["even", 1])  # the same batch at A = 1
                measured = [r for r in points if r.ok and r.tokens_per_s]
                if not measured:
                    continue
                axis.plot(
                    [r.adapters for r in measured],
                    [r.tokens_per_s for r in measured],
                    line,
                    color=colors[method],
                    marker=marker,
                    markersize=4,
                )
                for r in measured:
                    whiskers = _tokens_per_s_spread(r)
                    axis.errorbar(
                        r.adapters,
                        r.tokens_per_s,
                        yerr=whiskers,
                        color=colors[method],
                        capsize=2,
                        linewidth=0.8,
                    )
                    if r.noisy:
                        axis.plot(
                            r.adapters,
                            r.tokens_per_s,
                            marker="o",
                            markersize=9,
                            markerfacecolor="none",
                            markeredgecolor="tab:red",
                        )
                    top = max(top, r.tokens_per_s + whiskers[1][0])
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts, [str(c) for c in counts])
        axis.set_ylim(0, top * 1.1)
        axis.set(
            xlabel="adapters loaded (A)",
            ylabel="tokens/s (median; higher is faster)",
            title=titles[phase],
        )
    handles = [
        Line2D([], [], color=colors[m], label=label)
        for m, label in labels.items()
        if label not in not_run
    ]
    handles += [
        Line2D([], [], color="black", linestyle=line, marker=marker, label=f"{spread} spread")
        for spread, (line, marker) in styles.items()
    ]
    figure.legend(
        handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8
    )
    first = rows[0]
    skipped = "".join(f"\nnot run: {label} ({reason[:80]})" for label, reason in not_run.items())
    figure.suptitle(
        f"Mixed batches, {first.batch} rows x {first.seq_len} tokens - {first.model}, "
        f"{first.dtype}\n{first.device_name}\nlines: median; whiskers: interquartile "
        f"range; red rings: noisy (see report.md){skipped}",
        fontsize=9,
    )
    figure.savefig(path, dpi=110)


PLOTS = {
    "training": plot_training,
    "inference": plot_inference,
    "kernel": plot_kernel,
    "mixed": plot_mixed,
}


def write_plots(records: list[BenchmarkRecord], folder: Path) -> list[Path]:
    """training.png, inference.png, kernel.png and mixed.png for the suites present in
    ``records``."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    written = []
    for suite, plot in PLOTS.items():
        rows = [r for r in records if r.suite == suite]
        if rows:
            plot(rows, Path(folder) / f"{suite}.png")
            written.append(Path(folder) / f"{suite}.png")
    return written
