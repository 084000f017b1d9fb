"""Microbenchmarks of post_block_steer, forward and forward+backward, per implementation."""

import pytest
import torch

from steer_fast_bench.benchmark import KERNEL_METHODS, MethodUnavailable
from steer_fast_bench.benchmark.kernel_suite import KernelCase, kernel_inputs, pass_function

if torch.cuda.is_available():
    SHAPES = [(16384, 2048, 16), (65536, 4096, 64)]
    DTYPE = torch.bfloat16
else:
    SHAPES = [(1024, 512, 16), (4096, 1024, 16)]
    DTYPE = torch.float32


def _synchronized(call, device):
    def run():
        result = call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result

    return run


@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
@pytest.mark.parametrize("method", list(KERNEL_METHODS))
@pytest.mark.parametrize(("tokens", "hidden_size", "rank"), SHAPES, ids=lambda v: str(v))
def test_post_block_steer(benchmark, device, method, pass_, tokens, hidden_size, rank):
    case = KernelCase(tokens, hidden_size, rank, "silu", DTYPE, residual=False)
    try:
        steer = KERNEL_METHODS[method].setup(device)
    except MethodUnavailable as reason:
        pytest.skip(str(reason))
    inputs = kernel_inputs(case, device, seed=0)
    run = _synchronized(pass_function(steer, case, inputs, pass_), device)
    run()  # compile / autotune outside the measurement
    benchmark.extra_info.update(
        tokens=tokens,
        hidden_size=hidden_size,
        rank=rank,
        dtype=str(DTYPE),
        pass_=pass_,
        min_bytes=case.min_bytes(pass_),
    )
    benchmark(run)
