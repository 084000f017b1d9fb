"""PNG figures of a run, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from .records import BenchmarkRecord
from .report import format_ms

# Kernel-plot markers per implementation; any other gets "x".
MARKERS = {"steer_fast_fused": "o", "steer_fast_torch": "s", "eager": "D", "torch_compile": "^"}


def _figure(width: float, height: float, panels: int):
    """A figure with ``panels`` side by side, on an Agg canvas of its own."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, panels, squeeze=False)[0]


def _title(records: list[BenchmarkRecord], what: str) -> str:
    r = records[0]
    return f"{what} - {r.model}, {r.dtype}\n{r.device_name}"


def _bars(axis, labels: list[str], values: list[float | None], notes: list[str], xlabel: str):
    positions = list(range(len(labels)))
    axis.barh(positions, [v or 0.0 for v in values], color="tab:blue")
    finite = [v for v in values if v]
    right = max(finite) if finite else 1.0
    for y, value, note in zip(positions, values, notes, strict=True):
        text = f" {format_ms(value)}" if value else f" {note}"
        axis.text(value or 0.0, y, text, va="center", fontsize=8)
    axis.set_yticks(positions, labels)
    axis.invert_yaxis()
    axis.set_xlim(0, right * 1.35)
    axis.set_xlabel(xlabel)


def _bar_panels(axes, rows_per_panel, values, xlabels) -> None:
    """One bar panel per list of rows, labelled on the first only."""
    for axis, rows, value, xlabel in zip(axes, rows_per_panel, values, xlabels, strict=True):
        labels, notes = [r.label for r in rows], [r.status for r in rows]
        _bars(axis, labels, [value(r) for r in rows], notes, xlabel)
    axes[1].set_yticks([])


def plot_training(records: list[BenchmarkRecord], path: Path) -> Path | None:
    rows = [r for r in records if r.suite == "training"]
    if not rows:
        return None
    figure, axes = _figure(12, 0.5 * len(rows) + 1.8, 2)
    values = (lambda r: r.ms, lambda r: r.peak_mem_bytes / 2**20 if r.peak_mem_bytes else None)
    xlabels = ("ms per training step (median)", "peak memory (MiB)")
    _bar_panels(axes, (rows, rows), values, xlabels)
    figure.suptitle(_title(rows, "Training step"))
    figure.savefig(path, dpi=120)
    return path


def plot_inference(records: list[BenchmarkRecord], path: Path) -> Path | None:
    rows = [r for r in records if r.suite == "inference"]
    if not rows:
        return None
    methods = list(dict.fromkeys(r.method for r in rows))
    by_phase = {(r.method, r.phase): r for r in rows}
    panels = [
        [by_phase[m, p] for m in methods if (m, p) in by_phase] for p in ("prefill", "decode")
    ]
    figure, axes = _figure(12, 0.5 * len(methods) + 1.8, 2)
    xlabels = ("prefill ms (median)", "decode ms per token (median)")
    _bar_panels(axes, panels, (lambda r: r.ms, lambda r: r.ms), xlabels)
    figure.suptitle(_title(rows, "Inference"))
    figure.savefig(path, dpi=120)
    return path


def plot_kernel(records: list[BenchmarkRecord], path: Path) -> Path | None:
    """Achieved bandwidth (minimum bytes / time) against minimum bytes, per pass and method."""
    rows = [r for r in records if r.suite == "kernel" and r.pass_ is not None]
    if not rows:
        return None
    copy = next((r for r in records if r.suite == "kernel" and r.method == "copy" and r.ok), None)
    passes = list(dict.fromkeys(r.pass_ for r in rows))
    labels = {r.method: r.label for r in rows if r.method != "roofline"}
    figure, axes = _figure(6 * len(passes), 4.5, len(passes))
    for axis, pass_ in zip(axes, passes, strict=True):
        for method, label in labels.items():
            points = sorted(
                (r.min_bytes / 2**20, r.gbps)
                for r in rows
                if r.pass_ == pass_ and r.method == method and r.ok
            )
            if points:
                x, y = zip(*points, strict=True)
                axis.scatter(x, y, marker=MARKERS.get(method, "x"), label=label, alpha=0.8)
        if copy is not None:
            bandwidth = f"copy bandwidth {copy.gbps:.1f} GB/s"
            axis.axhline(copy.gbps, color="black", linestyle="--", linewidth=1, label=bandwidth)
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("minimum bytes moved (MiB)")
        axis.set_ylabel("GB/s at minimum traffic")
        axis.set_title(pass_)
        axis.legend(fontsize=8)
    skipped = sorted({r.label for r in rows if not r.ok})
    suffix = f"\nnot run here: {', '.join(skipped)}" if skipped else ""
    figure.suptitle(f"post_block_steer kernel\n{rows[0].device_name}{suffix}")
    figure.savefig(path, dpi=120)
    return path


def write_plots(records: list[BenchmarkRecord], folder: Path) -> list[Path]:
    """training.png, inference.png and kernel.png for the suites present in ``records``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = ("training.png", "inference.png", "kernel.png")
    plots = zip(names, (plot_training, plot_inference, plot_kernel), strict=True)
    written = [plot(records, folder / name) for name, plot in plots]
    return [path for path in written if path is not None]
