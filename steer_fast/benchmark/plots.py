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


def _bar_panels(rows: list[BenchmarkRecord], panels, what: str, path: Path, height: int) -> None:
    """One horizontal bar panel per (rows, value, x label), labelled on the first only."""
    figure, axes = _figure(12, 0.5 * height + 1.8, len(panels))
    for axis, (panel, value, xlabel) in zip(axes, panels):
        values, positions = [value(r) for r in panel], list(range(len(panel)))
        axis.barh(positions, [v or 0.0 for v in values], color="tab:blue")
        for y, v, r in zip(positions, values, panel):
            axis.text(v or 0.0, y, f" {format_ms(v)}" if v else f" {r.status}", va="center",
                      fontsize=8)
        axis.set_yticks(positions, [r.label for r in panel])
        axis.invert_yaxis()
        axis.set_xlim(0, max([v for v in values if v] or [1.0]) * 1.35)
        axis.set_xlabel(xlabel)
    axes[1].set_yticks([])
    figure.suptitle(f"{what} - {rows[0].model}, {rows[0].dtype}\n{rows[0].device_name}")
    figure.savefig(path, dpi=120)


def plot_training(rows: list[BenchmarkRecord], path: Path) -> None:
    memory = lambda r: r.peak_mem_bytes / 2**20 if r.peak_mem_bytes else None
    panels = [(rows, lambda r: r.ms, "ms per training step (median)"),
              (rows, memory, "peak memory (MiB)")]
    _bar_panels(rows, panels, "Training step", path, len(rows))


def plot_inference(rows: list[BenchmarkRecord], path: Path) -> None:
    methods = list(dict.fromkeys(r.method for r in rows))
    by_phase = {(r.method, r.phase): r for r in rows}
    panels = [([by_phase[m, phase] for m in methods], lambda r: r.ms, xlabel) for phase, xlabel
              in (("prefill", "prefill ms (median)"), ("decode", "decode ms per token (median)"))]
    _bar_panels(rows, panels, "Inference", path, len(methods))


def plot_kernel(records: list[BenchmarkRecord], path: Path) -> None:
    """Achieved bandwidth (minimum bytes / time) against minimum bytes, per pass and method."""
    rows = [r for r in records if r.pass_ is not None]
    copy = next((r for r in records if r.method == "copy" and r.ok), None)
    passes = list(dict.fromkeys(r.pass_ for r in rows))
    labels = {r.method: r.label for r in rows if r.method != "roofline"}
    figure, axes = _figure(6 * len(passes), 4.5, len(passes))
    for axis, pass_ in zip(axes, passes):
        for method, label in labels.items():
            points = sorted((r.min_bytes / 2**20, r.gbps) for r in rows
                            if r.pass_ == pass_ and r.method == method and r.ok)
            if points:
                axis.scatter(*zip(*points), marker=MARKERS.get(method, "x"), label=label,
                             alpha=0.8)
        if copy is not None:
            axis.axhline(copy.gbps, color="black", linestyle="--", linewidth=1,
                         label=f"copy bandwidth {copy.gbps:.1f} GB/s")
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set(xlabel="minimum bytes moved (MiB)", ylabel="GB/s at minimum traffic", title=pass_)
        axis.legend(fontsize=8)
    skipped = sorted({r.label for r in rows if not r.ok})
    suffix = f"\nnot run here: {', '.join(skipped)}" if skipped else ""
    figure.suptitle(f"post_block_steer kernel\n{rows[0].device_name}{suffix}")
    figure.savefig(path, dpi=120)


PLOTS = {"training": plot_training, "inference": plot_inference, "kernel": plot_kernel}


def write_plots(records: list[BenchmarkRecord], folder: Path) -> list[Path]:
    """training.png, inference.png and kernel.png for the suites present in ``records``."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    written = []
    for suite, plot in PLOTS.items():
        rows = [r for r in records if r.suite == suite]
        if rows:
            plot(rows, Path(folder) / f"{suite}.png")
            written.append(Path(folder) / f"{suite}.png")
    return written
