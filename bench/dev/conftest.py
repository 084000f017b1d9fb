"""pytest-benchmark microbenchmarks of post_block_steer: ``pytest bench --benchmark-only``.

They time the same implementations as ``steer-fast bench --suites kernel`` (steer_fast's fused
Triton kernels on CUDA, its torch path, the unfused eager reference and torch.compile of it) on a
few shapes, with the device synchronised inside the timed function. On a machine without CUDA
the Triton cases are skipped: the kernels only run there under the interpreter.
"""

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE
