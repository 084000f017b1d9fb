"""The kernels compile for an H100 (sm_90) through Triton's whole pipeline, on the CPU.

The interpreter checks what the kernels compute but never runs Triton's compiler; this runs
bench/dev/compile_check.py (every kernel, dtype, activation, single- and two-pass forward, ranks
1 to 256, with the launch heuristics' block shapes; steering_vector's forward, both forms of its
backward and its reduction; multi_adapter_steer's two forward paths and three backward kernels,
with one phi for every adapter and mixed phis) in a fresh interpreter without TRITON_INTERPRET,
and checks ptxas's register report.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

# A developer tool, not part of the installed package: loaded from the repository's bench/ by
# path (bench/ is not put on sys.path: its conftest.py would shadow this folder's).
BENCH = Path(__file__).resolve().parents[1] / "dev"
_SPEC = importlib.util.spec_from_file_location("compile_check", BENCH / "compile_check.py")
compile_check = sys.modules[_SPEC.name] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(compile_check)

KERNELS = {
    "_post_block_steer_forward_kernel",
    "_post_block_steer_backward_rows_kernel",
    "_post_block_steer_backward_cols_kernel",
    "_reduce_weight_grads_kernel",
    "_steering_vector_forward_kernel",
    "_steering_vector_backward_kernel",
    "_steering_vector_reduce_kernel",
    "gather_forward_kernel",
    "grouped_forward_kernel",
    "multi_backward_rows_kernel",
    "multi_backward_cols_kernel",
    "reduce_slot_grads_kernel",
}


def _nvidia_backend_available() -> bool:
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return False
    return True


def test_launches_name_every_kernel_parameter():
    """Each launch passes every kernel parameter by its name and nothing else (the interpreter
    drops unknown keywords silently; the compiled kernels would reject them)."""
    seen, vector_backward_forms = set(), set()
    for case in compile_check.ALL_CASES:
        for launch in compile_check.case_launches(case, n_rows=4):
            assert sorted(launch.kwargs) == sorted(launch.kernel.arg_names), launch.kernel
            assert set(launch.options) <= {"num_warps", "num_stages"}
            seen.add(launch.kernel.__name__)
            if launch.kernel.__name__ == "_steering_vector_backward_kernel":
                vector_backward_forms.add(launch.kwargs["FINAL"])
    assert seen == KERNELS
    # Both compiled forms of steering_vector's backward: db written directly, and partials.
    assert vector_backward_forms == {True, False}


@pytest.mark.skipif(not _nvidia_backend_available(), reason="triton without its CUDA backend")
def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(BENCH / "compile_check.py"), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in records} == KERNELS
    assert {r["op"] for r in records} == {
        "post_block_steer",
        "steering_vector",
        "multi_adapter_steer",
    }
    assert {r["activation"] for r in records} >= {
        "identity",
        "relu",
        "silu",
        "gelu",
        "gelu_tanh",
        "tanh",
    }
    for record in records:
        assert record["registers"] <= 255
        # Up to rank 64 every kernel fits its registers (steering_vector's, rank 0, included);
        # at rank 256 the backward's columns kernel holds [rows, 256] tiles of gz, z and a and
        # may spill a little.
        if record["rank"] <= 64:
            assert record["stack_bytes"] == 0, record
