"""Sweep the Triton kernels' block shapes on a GPU (the sweep: kernel_tuning.py, beside this).

    python bench/dev/tune_kernels.py                            # N = 16k, d 2048/4096/8192, bf16
    python bench/dev/tune_kernels.py --hidden-sizes 4096 --ranks 8 64 --dtypes bfloat16 float32
    python bench/dev/tune_kernels.py --interpret                # on the CPU: checks only

Writes tuning.json (every candidate) and tuning.md (per shape and kernel: the launch heuristic
against the fastest correct candidate) to --out, default bench/results/tuning-<gpu>-<date>/.
"""

import argparse
import datetime
import json
import os
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 16, 64, 256])
    parser.add_argument(
        "--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"]
    )
    parser.add_argument("--activation", default="silu")
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="run the kernels under the Triton interpreter on tiny shapes",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before steer_fast's kernels are imported

    import torch

    # Imported only now: the kernels read TRITON_INTERPRET when they are first imported.
    from kernel_tuning import TuningShape, best_rows, tune

    from steer_fast_bench.benchmark.timing import TimingPlan

    if args.interpret:
        device, quick = torch.device("cpu"), True
        shapes = [TuningShape(45, 40, 5, torch.float32, args.activation)]
        plan = TimingPlan(warmup=1, min_repeats=1, max_repeats=1, budget_s=0.01)
        name = "tuning-interpreter"
    elif torch.cuda.is_available():
        device, quick, plan = torch.device("cuda"), False, None
        shapes = [
            TuningShape(args.tokens, d, r, getattr(torch, dtype), args.activation)
            for dtype in args.dtypes
            for d in args.hidden_sizes
            for r in args.ranks
        ]
        gpu = torch.cuda.get_device_name().replace(" ", "-").lower()
        name = f"tuning-{gpu}-{datetime.date.today().isoformat()}"
    else:
        sys.exit("tune_kernels.py needs a CUDA device (or --interpret for a check on the CPU)")

    out = args.out or Path(__file__).resolve().parent / "results" / name
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for record in tune(shapes, device, plan, quick):
        records.append(record)
        print(json.dumps(record), flush=True)
    (out / "tuning.json").write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "device": torch.cuda.get_device_name()
                if device.type == "cuda"
                else "cpu (interpreter)",
                "torch": torch.__version__,
                "triton": __import__("triton").__version__,
                "records": records,
            },
            indent=2,
        )
        + "\n"
    )
    lines = [
        f"# Kernel tuning ({records[0]['gbps']:.0f} GB/s copy bandwidth)",
        "",
        "| N | d | r | dtype | kernel | heuristic ms (% copy) | best ms (% copy) | best config |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in best_rows(records):
        heuristic, best = row["heuristic"], row["best"]

        def cell(record):
            if record is None or record["status"] != "ok":
                return "failed" if record else "-"
            return f"{record['ms']:.3f} ({100 * record['copy_fraction']:.0f}%)"

        lines.append(
            "| "
            + " | ".join(str(part) for part in row["key"])
            + f" | {cell(heuristic)} | {cell(best)} | {best['config'] if best else '-'} |"
        )
    (out / "tuning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
