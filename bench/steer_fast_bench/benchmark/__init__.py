"""The benchmark suites: post-block steering against forward hooks, LoRA, LoReFT and the floor.

Four suites, one command (``steer-fast bench``, or ``python -m steer_fast_bench bench``):

- kernel: ``post_block_steer`` alone against unfused eager PyTorch, ``torch.compile`` of it and
  the memory roofline;
- training: one forward + backward + AdamW step per method on the same model and batch;
- inference: prefill latency and KV-cache decode time per token;
- mixed (only when named, ``--suites mixed``): many adapters in one batch, against one batch
  per adapter, one adapter for every row, PEFT LoRA's mixed batches and the base model.

Every timing cell keeps its spread and is marked noisy when its repeats look like a shared
machine (``timing.Spread``); the run checks the machine before and after (``machine``).

    from steer_fast_bench.benchmark import BenchmarkSettings, run_benchmarks
    run = run_benchmarks(BenchmarkSettings.create(suites=["training"], quick=True))
    print(run.report)
"""

from .methods import METHODS, SUITES, Candidate, MethodContext, MethodUnavailable
from .models import PRESETS, ModelPreset
from .records import RECORD_FIELDS, BenchmarkRecord, load_records
from .runner import BenchmarkRun, run_benchmarks
from .settings import BenchmarkOptions, BenchmarkSettings, KernelGrid

KERNEL_METHODS, TRAINING_METHODS, INFERENCE_METHODS, MIXED_METHODS = METHODS.values()  # tables
__all__ = [
    "INFERENCE_METHODS",
    "KERNEL_METHODS",
    "METHODS",
    "MIXED_METHODS",
    "PRESETS",
    "RECORD_FIELDS",
    "SUITES",
    "TRAINING_METHODS",
    "BenchmarkOptions",
    "BenchmarkRecord",
    "BenchmarkRun",
    "BenchmarkSettings",
    "Candidate",
    "KernelGrid",
    "MethodContext",
    "MethodUnavailable",
    "ModelPreset",
    "load_records",
    "run_benchmarks",
]
