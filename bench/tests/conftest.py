"""Test setup of steer-fast-bench's tests: the library's shared setup (``tests/shared_setup``:
TRITON_INTERPRET, ``device``, seeding) and its helpers (tiny_models, op_helpers), from the
library's tests folder, which goes on sys.path (never the repository root, where kernels/ would
shadow a top-level "kernels")."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from shared_setup import DEVICE, _seed, device  # noqa: E402, F401  (fixtures)
