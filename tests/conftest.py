"""Test setup of the library's tests (``shared_setup``: TRITON_INTERPRET, ``device``, seeding),
and the fixtures only they use.

Shared helper modules (shared_setup, op_helpers, tiny_models) live beside the tests. Only this
folder goes on sys.path, never the repository root (where kernels/ would shadow a top-level
"kernels").
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared_setup import DEVICE, _seed, device  # noqa: E402, F401  (fixtures)


@pytest.fixture
def kernel_launches(monkeypatch):
    """Counts the Triton forward and backward kernel launches."""
    from steer_fast.ops.backend import kernel_module  # after TRITON_INTERPRET is set above

    kernels = kernel_module("post_block_steer")
    launches = {"forward": 0, "backward": 0}
    for direction in launches:
        original = getattr(kernels, f"post_block_steer_{direction}")

        def counted(*args, original=original, direction=direction, **kwargs):
            launches[direction] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(kernels, f"post_block_steer_{direction}", counted)
    return launches
