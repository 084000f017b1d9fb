"""Redraw the PNG plots (and print the markdown tables) of a saved benchmark run.

``steer-fast bench`` already writes its plots; this redraws them from results.json, e.g. after
editing or concatenating record files from several runs.

    python bench/dev/plot_results.py bench/results/cpu-2026-11-23/results.json
    python bench/dev/plot_results.py run.json --out /tmp/plots
"""

import argparse
from pathlib import Path

from steer_fast_bench.benchmark.plots import write_plots
from steer_fast_bench.benchmark.records import load_records
from steer_fast_bench.benchmark.report import render_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results.json written by steer-fast bench")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the PNGs (default: beside results.json)"
    )
    args = parser.parse_args()
    records = load_records(args.results)
    for path in write_plots(records, args.out or args.results.parent):
        print(f"wrote {path}")
    print(render_report(records))


if __name__ == "__main__":
    main()
