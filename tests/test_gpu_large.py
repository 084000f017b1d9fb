"""Real sizes on a GPU: d = 4096 and 8192, 16k tokens, ranks 1 to 256, every dtype.

Skipped without CUDA: under the interpreter these shapes would take hours. On a GPU machine
the plain ``pytest`` runs them with the compiled kernels, against the fp64 reference.
"""

import pytest
import torch

from steer_fast import post_block_steer

from op_helpers import TOLERANCES, assert_matches_reference, make_inputs, run_op, run_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("rank", [1, 8, 16, 64, 256])
@pytest.mark.parametrize("hidden_size", [4096, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_real_sizes_match_reference(dtype, hidden_size, rank):
    inputs = make_inputs((16384, hidden_size), rank, dtype=dtype, device="cuda")
    grad_out = torch.randn(16384, hidden_size, device="cuda").to(dtype)
    out, grads = run_op(
        post_block_steer, inputs, grad_out, activation="silu", scale=0.5, backend="triton"
    )
    reference = run_reference(inputs, grad_out, "silu", 0.5)
    assert_matches_reference(out, grads, *reference, TOLERANCES[dtype])


def test_real_size_3d_fused_residual():
    """A Llama-3.2-1B-shaped block output: [4, 4096, 2048] bf16 with the residual fused."""
    inputs = make_inputs((4, 4096, 2048), 8, dtype=torch.bfloat16, device="cuda")
    grad_out = torch.randn(4, 4096, 2048, device="cuda").to(torch.bfloat16)
    out, grads = run_op(post_block_steer, inputs, grad_out, activation="identity", backend="triton")
    reference = run_reference(inputs, grad_out, "identity", 1.0)
    assert_matches_reference(out, grads, *reference, TOLERANCES[torch.bfloat16])
