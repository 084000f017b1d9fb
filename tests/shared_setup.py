"""What every test folder's conftest.py sets up (tests/ and bench/tests/): TRITON_INTERPRET on a
machine without a GPU, the device the tests run on, and a seeded RNG for every test.

Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET=1 has to be set
before steer_fast's kernels are first imported, which is why it happens when this module is
imported, first thing in each conftest.py. With a GPU the same tests run the compiled kernels on
CUDA tensors (``DEVICE``).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
