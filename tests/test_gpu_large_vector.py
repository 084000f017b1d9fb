"""steering_vector at real sizes on a GPU: d = 4096 and 8192, 16k tokens, every dtype.

Skipped without CUDA: under the interpreter these shapes would take far too long. On a GPU
machine the plain ``pytest`` runs them with the compiled kernels, against the fp64 reference.
"""

import pytest
import torch

from steer_fast import steering_vector
from steer_fast.kernels import steering_vector as kernels
from steer_fast.ops import reference_steering_vector

from op_helpers import TOLERANCES, assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _leaf(shape, dtype):
    return torch.randn(shape, device="cuda").to(dtype).requires_grad_()


def _check(shape, dtype, residual: bool, scale: float) -> None:
    hidden, bias = _leaf(shape, dtype), _leaf(shape[-1], dtype)
    res = _leaf(shape, dtype) if residual else None
    grad_out = torch.randn(shape, device="cuda").to(dtype)
    out = steering_vector(hidden, bias, scale=scale, residual=res, backend="triton")
    out.backward(grad_out)

    def wide(t):
        return None if t is None else t.detach().double()

    rel = TOLERANCES[dtype]
    want = reference_steering_vector(wide(hidden), wide(bias), scale=scale, residual=wide(res))
    assert_close("out", out, want, rel)
    del want
    rows = tuple(range(len(shape) - 1))
    assert_close("grad bias", bias.grad, scale * grad_out.double().sum(rows), rel)
    assert torch.equal(hidden.grad, grad_out)
    if residual:
        assert torch.equal(res.grad, grad_out)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("hidden_size", [4096, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_real_sizes_match_reference(dtype, hidden_size, residual):
    _check((16384, hidden_size), dtype, residual, scale=-0.7)


def test_real_size_3d_fused_residual():
    """A Llama-3.2-1B-shaped block output: [4, 4096, 2048] bf16 with the residual fused."""
    _check((4, 4096, 2048), torch.bfloat16, residual=True, scale=4.0)


def test_real_size_backward_is_deterministic():
    grad_out = torch.randn(16384, 4096, device="cuda").to(torch.bfloat16)
    assert len(kernels.plan_backward(grad_out, 0.5).launches) == 2  # several token splits
    first = kernels.steering_vector_backward(grad_out, 0.5)
    second = kernels.steering_vector_backward(grad_out, 0.5)
    assert torch.equal(first, second)


def test_more_than_2_31_elements():
    """Row offsets are int64: 2^19 + 3 rows of d = 4096 (2^31 + 12288 elements) in bf16."""
    n_rows, hidden_size = 2**19 + 3, 4096
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs about 30 GiB of GPU memory")
    hidden = torch.ones(n_rows, hidden_size, device="cuda", dtype=torch.bfloat16)
    hidden[-3:] = torch.randn(3, hidden_size, device="cuda").to(torch.bfloat16)
    bias = torch.randn(hidden_size, device="cuda").to(torch.bfloat16)
    out = steering_vector(hidden, bias, scale=0.5, residual=hidden, backend="triton")
    rel = TOLERANCES[torch.bfloat16]
    tail = 2 * hidden[-3:].double() + 0.5 * bias.double()
    assert_close("out, last rows", out[-3:], tail, rel)
    assert_close("out, first row", out[0], 2.0 + 0.5 * bias.double(), rel)
    del out
    # grad_out = hidden: every row is ones but the last three, so the column sums are exact.
    grad_bias = kernels.steering_vector_backward(hidden, 0.5)
    want = 0.5 * ((n_rows - 3) + hidden[-3:].double().sum(0))
    assert_close("grad bias", grad_bias, want, rel)
