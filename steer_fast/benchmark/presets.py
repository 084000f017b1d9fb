"""Named model presets, the kernel-suite grids and the timing plans, per device and run size.

A preset gives the sizes of a decoder-only model (applied to any transformers config class, a
Llama one by default), its dtype and the batch it is benchmarked with. The default preset
depends on the device: "cpu-small" on the CPU (sized so that the full default run takes about
ten minutes on two cores), "llama-3.2-1b" on a GPU (Llama-3.2-1B's shapes, random weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .timing import TimingPlan


@dataclass(frozen=True)
class ModelPreset:
    """A model size and the batch to benchmark it with.

    ``sizes`` are keyword arguments of the config class (hidden_size, num_hidden_layers, ...).
    ``decode_tokens`` is how many tokens the inference suite decodes after the prefill.
    """

    name: str
    description: str
    sizes: dict[str, int | bool | float] = field(hash=False)
    dtype: torch.dtype
    batch: int
    seq_len: int
    rank: int
    decode_tokens: int


def _sizes(d: int, ffn: int, layers: int, heads: int, kv: int, vocab: int, positions: int, **extra):
    """Config keyword arguments of a Llama-style decoder with tied embeddings."""
    return dict(
        hidden_size=d,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=positions,
        tie_word_embeddings=True,
        **extra,
    )


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset(
            "tiny",
            "2 layers, d = 64: a smoke test of the machinery",
            _sizes(64, 128, 2, 4, 2, 256, 512),
            torch.float32,
            batch=2,
            seq_len=16,
            rank=4,
            decode_tokens=4,
        ),
        ModelPreset(
            "cpu-small",
            "Llama-style, 6 layers, d = 512, 8 heads (4 KV), vocab 8192: ~21M params",
            _sizes(512, 1376, 6, 8, 4, 8192, 2048),
            torch.float32,
            batch=4,
            seq_len=256,
            rank=16,
            decode_tokens=32,
        ),
        ModelPreset(
            "llama-3.2-1b",
            "Llama-3.2-1B shapes (16 layers, d = 2048, 32 heads, 8 KV, vocab 128256)",
            _sizes(2048, 8192, 16, 32, 8, 128256, 131072, rope_theta=500000.0, rms_norm_eps=1e-5),
            torch.bfloat16,
            batch=4,
            seq_len=1024,
            rank=16,
            decode_tokens=64,
        ),
    )
}


def default_preset(device: torch.device) -> ModelPreset:
    return PRESETS["llama-3.2-1b" if device.type == "cuda" else "cpu-small"]


@dataclass(frozen=True)
class KernelGrid:
    """The cartesian product of shapes and settings the kernel suite times."""

    tokens: tuple[int, ...]
    hidden_sizes: tuple[int, ...]
    ranks: tuple[int, ...]
    activations: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    residual: tuple[bool, ...] = (False,)


def default_kernel_grid(device: torch.device, quick: bool) -> KernelGrid:
    both = ("identity", "silu")
    if device.type == "cuda":
        if quick:
            return KernelGrid((16384,), (2048,), (16,), ("silu",), (torch.bfloat16,))
        tokens, widths = (4096, 16384, 65536), (2048, 4096)
        return KernelGrid(tokens, widths, (16, 64), both, (torch.bfloat16,), (False, True))
    # On the CPU every [N, d] tensor stays under glibc's 32 MiB mmap ceiling (see
    # environment.keep_freed_host_memory), so that no case is timed on page faults.
    if quick:
        return KernelGrid((2048,), (512,), (16,), ("silu",), (torch.float32,))
    return KernelGrid((1024, 4096), (256, 1024), (16, 64), both, (torch.float32, torch.bfloat16))


@dataclass(frozen=True)
class TimingPlans:
    """How long each suite measures: per kernel call, per training step, per inference call."""

    kernel: TimingPlan
    step: TimingPlan
    inference: TimingPlan

    def fixed(self, warmup: int | None = None, repeats: int | None = None) -> TimingPlans:
        """The same plans with the given warm-up and/or exactly ``repeats`` measured calls."""

        def fix(plan: TimingPlan) -> TimingPlan:
            return replace(
                plan,
                warmup=warmup if warmup is not None else plan.warmup,
                min_repeats=repeats if repeats is not None else plan.min_repeats,
                max_repeats=repeats if repeats is not None else plan.max_repeats,
            )

        return TimingPlans(fix(self.kernel), fix(self.step), fix(self.inference))


# (on CUDA, quick) -> the kernel, training-step and inference plans, each as
# (warmup, min_repeats, max_repeats, budget_s).
_TIMING_PLANS = {
    (True, True): ((5, 10, 100, 0.1), (3, 5, 20, 1.0), (2, 3, 10, 1.0)),
    (True, False): ((10, 20, 500, 0.3), (5, 10, 50, 5.0), (3, 5, 20, 3.0)),
    (False, True): ((2, 5, 20, 0.2), (1, 3, 3, 1.0), (1, 3, 5, 0.5)),
    (False, False): ((3, 10, 200, 1.0), (2, 10, 40, 30.0), (2, 5, 30, 6.0)),
}


def default_timing_plans(device: torch.device, quick: bool) -> TimingPlans:
    plans = _TIMING_PLANS[device.type == "cuda", quick]
    return TimingPlans(*(TimingPlan(*plan) for plan in plans))
