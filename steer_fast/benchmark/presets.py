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


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset(
            name="tiny",
            description="2 layers, d = 64: a smoke test of the machinery",
            sizes=dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=256,
                max_position_embeddings=512,
                tie_word_embeddings=True,
            ),
            dtype=torch.float32,
            batch=2,
            seq_len=16,
            rank=4,
            decode_tokens=4,
        ),
        ModelPreset(
            name="cpu-small",
            description="Llama-style, 6 layers, d = 512, 8 heads (4 KV), vocab 8192: ~21M params",
            sizes=dict(
                hidden_size=512,
                intermediate_size=1376,
                num_hidden_layers=6,
                num_attention_heads=8,
                num_key_value_heads=4,
                vocab_size=8192,
                max_position_embeddings=2048,
                tie_word_embeddings=True,
            ),
            dtype=torch.float32,
            batch=4,
            seq_len=256,
            rank=16,
            decode_tokens=32,
        ),
        ModelPreset(
            name="llama-3.2-1b",
            description="Llama-3.2-1B shapes (16 layers, d = 2048, 32 heads, 8 KV, vocab 128256)",
            sizes=dict(
                hidden_size=2048,
                intermediate_size=8192,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=8,
                vocab_size=128256,
                max_position_embeddings=131072,
                rope_theta=500000.0,
                rms_norm_eps=1e-5,
                tie_word_embeddings=True,
            ),
            dtype=torch.bfloat16,
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

    @property
    def size(self) -> int:
        return (
            len(self.tokens)
            * len(self.hidden_sizes)
            * len(self.ranks)
            * len(self.activations)
            * len(self.dtypes)
            * len(self.residual)
        )


def default_kernel_grid(device: torch.device, quick: bool) -> KernelGrid:
    if device.type == "cuda":
        if quick:
            return KernelGrid((16384,), (2048,), (16,), ("silu",), (torch.bfloat16,))
        return KernelGrid(
            tokens=(4096, 16384, 65536),
            hidden_sizes=(2048, 4096),
            ranks=(16, 64),
            activations=("identity", "silu"),
            dtypes=(torch.bfloat16,),
            residual=(False, True),
        )
    # On the CPU every [N, d] tensor stays under glibc's 32 MiB mmap ceiling (see
    # environment.keep_freed_host_memory), so that no case is timed on page faults.
    if quick:
        return KernelGrid((2048,), (512,), (16,), ("silu",), (torch.float32,))
    return KernelGrid(
        tokens=(1024, 4096),
        hidden_sizes=(256, 1024),
        ranks=(16, 64),
        activations=("identity", "silu"),
        dtypes=(torch.float32, torch.bfloat16),
    )


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


def default_timing_plans(device: torch.device, quick: bool) -> TimingPlans:
    if device.type == "cuda":
        if quick:
            return TimingPlans(
                kernel=TimingPlan(warmup=5, min_repeats=10, max_repeats=100, budget_s=0.1),
                step=TimingPlan(warmup=3, min_repeats=5, max_repeats=20, budget_s=1.0),
                inference=TimingPlan(warmup=2, min_repeats=3, max_repeats=10, budget_s=1.0),
            )
        return TimingPlans(
            kernel=TimingPlan(warmup=10, min_repeats=20, max_repeats=500, budget_s=0.3),
            step=TimingPlan(warmup=5, min_repeats=10, max_repeats=50, budget_s=5.0),
            inference=TimingPlan(warmup=3, min_repeats=5, max_repeats=20, budget_s=3.0),
        )
    if quick:
        return TimingPlans(
            kernel=TimingPlan(warmup=2, min_repeats=5, max_repeats=20, budget_s=0.2),
            step=TimingPlan(warmup=1, min_repeats=3, max_repeats=3, budget_s=1.0),
            inference=TimingPlan(warmup=1, min_repeats=3, max_repeats=5, budget_s=0.5),
        )
    return TimingPlans(
        kernel=TimingPlan(warmup=3, min_repeats=10, max_repeats=200, budget_s=1.0),
        step=TimingPlan(warmup=2, min_repeats=10, max_repeats=40, budget_s=30.0),
        inference=TimingPlan(warmup=2, min_repeats=5, max_repeats=30, budget_s=6.0),
    )
