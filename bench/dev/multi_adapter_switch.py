"""Measure where multi_adapter_steer's forward should switch from the gather to the grouped path.

    python bench/dev/multi_adapter_switch.py              # CUDA: d 2048/4096, r 8/16/64, A 4/16/64
    python bench/dev/multi_adapter_switch.py --hidden-sizes 4096 --ranks 16 --adapters 16
    python bench/dev/multi_adapter_switch.py --interpret  # on the CPU: checks only, tiny shapes
    python bench/dev/multi_adapter_switch.py --backend torch --dtype float32 --hidden-sizes 512
                                                           # the torch path's two paths, any device

The Triton kernels have a gather and a grouped path (``steer_fast.kernels.multi_adapter_steer``,
switch ``GROUPED_MIN_ROWS_PER_SLOT``), and so has the torch path
(``steer_fast.ops.multi_adapter_steer_torch``, switch ``TORCH_GATHER_ELEMENTS_PER_SLOT``,
gathered weight elements per adapter); ``--backend`` says which pair is timed.

For each hidden size d, rank r, number of steering adapters A and number of token rows per
adapter m, N = A x m rows are spread evenly over the A adapters in a shuffled order (slot 0, no
steering, gets none), with one phi for all of them. Both Triton forward paths run on the same
inputs; their outputs must agree (else the cell is reported wrong and not timed), then they are
timed side by side in rounds (``measure_interleaved``). Decode is m of 1 to a few, prefill m of
hundreds.

The switch point of a (d, r, A) is the smallest m from which the grouped path is faster at every
larger m measured. ``choose_path`` ("auto") takes the grouped path from
``GROUPED_MIN_ROWS_PER_SLOT`` rows per adapter on; the report says where it picks the slower path
and how much time that costs, which is what setting the constant should minimise.

Writes switch.json (every cell) and switch.md to --out, default
bench/results/multi-switch-<gpu>-<date>/ (multi-switch-interpreter under --interpret).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class SwitchCase:
    """One cell: A steering adapters of rank r over d, m token rows each."""

    hidden_size: int
    rank: int
    adapters: int
    rows_per_adapter: int
    dtype: torch.dtype
    activation: str = "silu"

    @property
    def tokens(self) -> int:
        return self.adapters * self.rows_per_adapter


def cases(
    hidden_sizes: Iterable[int],
    ranks: Iterable[int],
    adapters: Iterable[int],
    rows_per_adapter: Iterable[int],
    dtype: torch.dtype,
    activation: str = "silu",
) -> list[SwitchCase]:
    return [
        SwitchCase(d, r, a, m, dtype, activation)
        for d in hidden_sizes
        for r in ranks
        for a in adapters
        for m in rows_per_adapter
    ]


def case_inputs(case: SwitchCase, device: torch.device, seed: int = 0) -> tuple:
    """The forward's arguments: random weights (slot 0 included, ignored), an index giving every
    adapter m rows in a shuffled order, strengths of 1."""
    generator = torch.Generator().manual_seed(seed)
    n_slots, d, r = case.adapters + 1, case.hidden_size, case.rank

    def randn(*shape, scale=1.0):
        values = torch.randn(*shape, generator=generator) * scale
        return values.to(device=device, dtype=case.dtype)

    hidden = randn(case.tokens, d)
    residual = randn(case.tokens, d)
    down = randn(n_slots, r, d, scale=d**-0.5)
    up = randn(n_slots, d, r, scale=r**-0.5)
    down_biases, up_biases = randn(n_slots, r, scale=0.1), randn(n_slots, d, scale=0.1)
    slots = torch.arange(case.tokens) % case.adapters + 1
    index = slots[torch.randperm(case.tokens, generator=generator)].to(device)
    scales = torch.ones(case.tokens, device=device)
    from steer_fast.ops import activation_id

    activation_ids = (activation_id(case.activation),) * n_slots
    return hidden, down, up, down_biases, up_biases, residual, index, scales, activation_ids


def _agree(gather: torch.Tensor, grouped: torch.Tensor, dtype: torch.dtype) -> bool:
    """The two paths sum in different orders: fp32 within 1e-4, 16-bit within 2 ulps-ish."""
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    scale = max(gather.float().abs().max().item(), 1.0)
    return (gather.float() - grouped.float()).abs().max().item() <= tolerance * scale


class Backend(NamedTuple):
    """One backend's two forward paths: ``forward(*args, path=...)`` -> out, and its "auto"."""

    name: str
    forward: Callable[..., torch.Tensor]
    choose_path: Callable[[SwitchCase], str]
    threshold_name: str
    threshold: int


def backend(name: str) -> Backend:
    """The Triton kernels' paths ("triton") or the torch path's ("torch")."""
    if name == "triton":
        from steer_fast.kernels import multi_adapter_steer as kernels

        return Backend(
            name,
            lambda *args, path: kernels.multi_adapter_steer_forward(*args, path=path).out,
            lambda case: kernels.choose_path(case.tokens, case.adapters + 1),
            "GROUPED_MIN_ROWS_PER_SLOT",
            kernels.GROUPED_MIN_ROWS_PER_SLOT,
        )
    from steer_fast.ops import multi_adapter_steer_torch as multi_adapter_torch

    return Backend(
        name,
        lambda *args, path: multi_adapter_torch.forward(*args, path=path)[0],
        lambda case: multi_adapter_torch.choose_path(
            case.tokens, case.adapters + 1, case.rank, case.hidden_size
        ),
        "TORCH_GATHER_ELEMENTS_PER_SLOT",
        multi_adapter_torch.TORCH_GATHER_ELEMENTS_PER_SLOT,
    )


def measure_case(
    case: SwitchCase, device: torch.device, plan, paths: Backend | None = None
) -> dict:
    """Check the two paths against each other, then time them side by side."""
    from steer_fast_bench.benchmark.timing import Call, measure_interleaved

    paths = paths or backend("triton")
    args = case_inputs(case, device)
    calls = {
        path: Call(lambda path=path: paths.forward(*args, path=path))
        for path in ("gather", "grouped")
    }
    record = dict(
        asdict(case),
        dtype=str(case.dtype).removeprefix("torch."),
        tokens=case.tokens,
        backend=paths.name,
        auto=paths.choose_path(case),
    )
    outputs = {path: call.once() for path, call in calls.items()}
    if not _agree(outputs["gather"], outputs["grouped"], case.dtype):
        return dict(record, status="wrong: the gather and grouped outputs differ")
    del outputs
    timings = measure_interleaved(calls, device, plan)
    for path, timing in timings.items():
        if isinstance(timing, Exception):
            return dict(record, status=f"failed ({path}): {timing!r}")
        record[f"{path}_ms"] = timing.median_ms
        record[f"{path}_noisy"] = timing.spread.noisy
    record["faster"] = "grouped" if record["grouped_ms"] < record["gather_ms"] else "gather"
    return dict(record, status="ok")


def run(
    case_list: list[SwitchCase], device: torch.device, plan, paths: Backend | None = None
) -> Iterator[dict]:
    for case in case_list:
        yield measure_case(case, device, plan, paths)


def _group_key(record: dict) -> tuple:
    return (record["hidden_size"], record["rank"], record["adapters"], record["dtype"])


def switch_points(records: list[dict]) -> list[dict]:
    """Per (d, r, A, dtype): the switch point (the smallest m from which grouped is faster at
    every larger m measured; None if gather wins at the largest m), the m range measured, and
    auto's wrong picks: how many, and the time they cost as a fraction of the best paths'."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        if record["status"] == "ok":
            groups.setdefault(_group_key(record), []).append(record)
    rows = []
    for key, group in groups.items():
        group.sort(key=lambda r: r["rows_per_adapter"])
        switch = None
        for record in reversed(group):
            if record["faster"] != "grouped":
                break
            switch = record["rows_per_adapter"]
        wrong = [r for r in group if r["auto"] != r["faster"]]
        best = sum(min(r["gather_ms"], r["grouped_ms"]) for r in group)
        lost = sum(abs(r["gather_ms"] - r["grouped_ms"]) for r in wrong)
        rows.append(
            dict(
                hidden_size=key[0],
                rank=key[1],
                adapters=key[2],
                dtype=key[3],
                switch_rows_per_adapter=switch,
                measured=[r["rows_per_adapter"] for r in group],
                auto_wrong=[r["rows_per_adapter"] for r in wrong],
                auto_time_lost=lost / best if best > 0 else 0.0,
            )
        )
    return rows


def report(
    records: list[dict],
    threshold: int,
    device_name: str,
    threshold_name: str = "GROUPED_MIN_ROWS_PER_SLOT",
) -> str:
    lines = [
        f"# multi_adapter_steer: gather vs grouped forward ({device_name})",
        "",
        f"`{threshold_name}` = {threshold}: where auto switches paths (see its docstring).",
        "",
        "| d | r | A | dtype | switch point (rows per adapter) | auto wrong at | time auto loses |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in switch_points(records):
        switch = row["switch_rows_per_adapter"]
        lines.append(
            f"| {row['hidden_size']} | {row['rank']} | {row['adapters']} | {row['dtype']} "
            f"| {switch if switch is not None else 'gather throughout'} "
            f"| {', '.join(map(str, row['auto_wrong'])) or '-'} "
            f"| {100 * row['auto_time_lost']:.1f}% |"
        )
    lines += [
        "",
        "| d | r | A | rows per adapter | N | gather ms | grouped ms | grouped / gather | auto |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["status"] != "ok":
            lines.append(
                f"| {r['hidden_size']} | {r['rank']} | {r['adapters']} | {r['rows_per_adapter']} "
                f"| {r['tokens']} | {r['status']} | | | {r['auto']} |"
            )
            continue
        noisy = " (noisy)" if r["gather_noisy"] or r["grouped_noisy"] else ""
        lines.append(
            f"| {r['hidden_size']} | {r['rank']} | {r['adapters']} | {r['rows_per_adapter']} "
            f"| {r['tokens']} | {r['gather_ms']:.4f} | {r['grouped_ms']:.4f} "
            f"| {r['grouped_ms'] / r['gather_ms']:.2f}x{noisy} | {r['auto']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--adapters", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument(
        "--rows-per-adapter",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--activation", default="silu")
    parser.add_argument(
        "--backend",
        default="triton",
        choices=["triton", "torch"],
        help="whose two paths to time: the Triton kernels' (CUDA) or the torch path's (any)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads on the CPU (default 1)"
    )
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="run the kernels under the Triton interpreter on tiny shapes (a check, no timing)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before steer_fast's kernels are imported

    # Imported only now: the kernels read TRITON_INTERPRET when they are first imported.
    from steer_fast_bench.benchmark import records as records_module
    from steer_fast_bench.benchmark.timing import TimingPlan

    paths = backend(args.backend)
    dtype = getattr(torch, args.dtype)
    if args.backend == "torch" and not args.interpret:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu":
            torch.set_num_threads(args.threads)
        device_name = records_module.device_name(device)
        slug = device_name.split(" (")[0].replace(" ", "-").replace("(R)", "").lower()
        name = f"multi-torch-path-{slug}-{datetime.date.today().isoformat()}"
        case_list = cases(
            args.hidden_sizes,
            args.ranks,
            args.adapters,
            args.rows_per_adapter,
            dtype,
            args.activation,
        )
        plan = TimingPlan(warmup=2, min_repeats=5, max_repeats=100, budget_s=0.2)
    elif args.interpret:
        device, name, device_name = torch.device("cpu"), "multi-switch-interpreter", "interpreter"
        case_list = cases([40], [5], [2, 3], [1, 20], torch.float32, args.activation)
        plan = TimingPlan(warmup=1, min_repeats=1, max_repeats=1, budget_s=0.01)
    elif torch.cuda.is_available():
        device, device_name = torch.device("cuda"), torch.cuda.get_device_name()
        gpu = device_name.replace(" ", "-").lower()
        name = f"multi-switch-{gpu}-{datetime.date.today().isoformat()}"
        case_list = cases(
            args.hidden_sizes,
            args.ranks,
            args.adapters,
            args.rows_per_adapter,
            dtype,
            args.activation,
        )
        plan = TimingPlan(warmup=3, min_repeats=10, max_repeats=200, budget_s=0.05)
    else:
        sys.exit("multi_adapter_switch.py needs a CUDA device (or --interpret for a check)")

    out = args.out or Path(__file__).resolve().parent / "results" / name
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for record in run(case_list, device, plan, paths):
        records.append(record)
        print(json.dumps(record), flush=True)
    (out / "switch.json").write_text(
        json.dumps(
            {
                "command": " ".join(
                    [
                        "python",
                        "bench/dev/multi_adapter_switch.py",
                        *(sys.argv[1:] if argv is None else argv),
                    ]
                ),
                "device": device_name,
                "torch": torch.__version__,
                "triton": __import__("triton").__version__,
                "backend": paths.name,
                paths.threshold_name: paths.threshold,
                "switch_points": switch_points(records),
                "records": records,
            },
            indent=2,
        )
        + "\n"
    )
    text = report(records, paths.threshold, device_name, paths.threshold_name)
    (out / "switch.md").write_text(text)
    print(text)
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
