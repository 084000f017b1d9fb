"""Test setup shared by every test module.

Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET=1 has to be set
before steer_fast's kernel module is first imported, which is why it happens here. With a GPU
the same tests run the compiled kernels on CUDA tensors (``DEVICE``).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

# Shared helper modules (op_helpers, tiny_models) live beside the tests. Only this folder goes on
# sys.path, never the repository root (where kernels/ would shadow a top-level "kernels").
sys.path.insert(0, str(Path(__file__).resolve().parent))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def kernel_launches(monkeypatch):
    """Counts the Triton forward and backward kernel launches."""
    import steer_fast.ops  # after TRITON_INTERPRET is set above

    kernels = steer_fast.ops._kernels()
    launches = {"forward": 0, "backward": 0}
    for direction in launches:
        original = getattr(kernels, f"post_block_steer_{direction}")

        def counted(*args, original=original, direction=direction, **kwargs):
            launches[direction] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(kernels, f"post_block_steer_{direction}", counted)
    return launches
