"""Which backend runs an op, the one loader of the Triton kernels, and when a call needs the
registered custom op.

Every op of steer_fast (``post_block_steer``, ``steering_vector``, ``multi_adapter_steer``) runs
on one of two backends:

- "triton": the fused kernels of ``steer_fast.kernels``, for fp32 / bf16 / fp16 CUDA tensors (or
  CPU tensors under the Triton interpreter, TRITON_INTERPRET=1);
- "torch": the op's plain PyTorch path (``<op>_torch.py`` beside it), for CPU tensors and fp64,
  with the same maths and the same saved tensors.

"auto" picks Triton where it can run and the torch path otherwise; ``resolve_backend`` is the one
place that decides.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

import torch

BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
TORCH_DTYPES: tuple[torch.dtype, ...] = (*TRITON_DTYPES, torch.float64)


def check_backend(backend: object) -> str:
    """``backend`` if it is one of BACKENDS; ValueError naming it otherwise."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


# torch.compile calls triton_available and _kernels_interpreted while tracing and keeps their
# answers as constants; traced instead, it would skip the caches below them (and warn).
@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """Whether Triton imports here."""
    return _triton_imports()


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def kernel_module(name: str) -> ModuleType:
    """``steer_fast.kernels.<name>`` ("post_block_steer", "steering_vector",
    "multi_adapter_steer"), imported on first use, so that TRITON_INTERPRET can be set before the
    kernels are built. Called inside the registered ops only, which torch.compile does not trace
    into."""
    return importlib.import_module(f"{__package__.rpartition('.')[0]}.kernels.{name}")


@torch.compiler.assume_constant_result
def _kernels_interpreted() -> bool:
    return _kernels_built_interpreted()


@functools.cache
def _kernels_built_interpreted() -> bool:
    from ..kernels.launch import interpreted

    return interpreted()


def resolve_backend(hidden: torch.Tensor, backend: str = "auto") -> str:
    """The backend an op will run for ``hidden``: "triton" or "torch".

    "auto" takes Triton for CUDA tensors in fp32/bf16/fp16 and the torch path otherwise (CPU
    tensors, fp64). If Triton cannot be imported on a CUDA machine, "auto" warns once and takes
    the torch path. An explicit backend is returned as given after checking that it can run:
    "triton" needs fp32/bf16/fp16 tensors on CUDA, or on the CPU with TRITON_INTERPRET=1 set
    before steer_fast's kernels are first used.

    Raises:
        ValueError: for an unknown backend, or "triton" where it cannot run.
    """
    check_backend(backend)
    return checked_backend(hidden, backend)


def checked_backend(hidden: torch.Tensor, backend: str) -> str:
    """``resolve_backend`` for a ``backend`` the caller has checked already."""
    if backend == "auto":
        if not hidden.is_cuda or hidden.dtype not in TRITON_DTYPES:
            return "torch"
        if not triton_available():
            _warn_no_triton()
            return "torch"
        return "triton"
    if backend == "triton":
        if hidden.dtype not in TRITON_DTYPES:
            raise ValueError(
                f"backend='triton' supports {[str(d) for d in TRITON_DTYPES]}, got hidden of "
                f"dtype {hidden.dtype}; use backend='torch' for it"
            )
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        if not hidden.is_cuda and not _kernels_interpreted():
            raise ValueError(
                f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before the "
                f"kernels are first used to run them on the CPU; hidden is on {hidden.device}"
            )
    return backend


@functools.cache
def _warn_no_triton() -> None:
    warnings.warn(
        "steer_fast: triton is not importable, so the steering ops run their torch path on CUDA "
        "tensors (correct, but unfused)",
        RuntimeWarning,
        stacklevel=3,
    )


def needs_registered_op(arguments: tuple) -> bool:
    """Whether autograd or torch.compile needs a call with ``arguments`` to go through the op's
    registered custom op. Without either, the op calls its implementation directly: the
    registered op would only add its dispatch cost (tens of microseconds a call, paid per layer
    per decoded token)."""
    if torch.compiler.is_compiling():
        return True
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in arguments)
