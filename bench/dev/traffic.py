"""Count the memory traffic of steer_fast's Triton kernels under the interpreter.

The CPU stand-in for HBM traffic (see steer_fast_bench/traffic.py): bytes each kernel loads and
stores, against the minimum any implementation moves. Runs on the CPU; needs no GPU.

    python bench/dev/traffic.py                        # 512 tokens, d = 256, r = 8, fp32
    python bench/dev/traffic.py --tokens 1024 --hidden-size 1024 --rank 64 --dtype bfloat16 \
        --residual
    python bench/dev/traffic.py --json traffic.json
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before steer_fast's kernels are imported

import argparse  # noqa: E402
import json  # noqa: E402
from dataclasses import asdict  # noqa: E402

import torch  # noqa: E402

from steer_fast_bench.traffic import measure_post_block_steer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--activation", default="silu")
    parser.add_argument("--residual", action="store_true", help="fuse the block's residual add")
    parser.add_argument("--json", help="also write the counts to this JSON file")
    args = parser.parse_args()

    traffic = measure_post_block_steer(
        n_tokens=args.tokens,
        hidden_size=args.hidden_size,
        rank=args.rank,
        dtype=getattr(torch, args.dtype),
        activation=args.activation,
        fused_residual=args.residual,
    )
    print(
        f"tokens={traffic.n_tokens} d={traffic.hidden_size} r={traffic.rank} "
        f"dtype={traffic.dtype} residual={traffic.fused_residual}\n"
    )
    print("| pass | kernel | launches | loaded MB | stored MB |")
    print("|---|---|---|---|---|")
    for phase, kernels in (("forward", traffic.forward), ("backward", traffic.backward)):
        for name, entry in kernels.items():
            print(
                f"| {phase} | {name} | {entry.launches} | {entry.load_bytes / 1e6:.3f} "
                f"| {entry.store_bytes / 1e6:.3f} |"
            )
    print()
    print("| pass | counted MB | minimum MB | ratio |")
    print("|---|---|---|---|")
    print(
        f"| forward | {traffic.forward_bytes / 1e6:.3f} | {traffic.minimum_forward / 1e6:.3f} "
        f"| {traffic.forward_ratio:.3f} |"
    )
    print(
        f"| backward | {traffic.backward_bytes / 1e6:.3f} | "
        f"{traffic.minimum_backward / 1e6:.3f} | {traffic.backward_ratio:.3f} |"
    )
    if args.json:
        record = asdict(traffic)
        record.update(forward_ratio=traffic.forward_ratio, backward_ratio=traffic.backward_ratio)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
