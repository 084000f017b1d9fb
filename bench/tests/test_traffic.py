"""Memory traffic of the Triton kernels, counted under the interpreter (the CPU stand-in for HBM).

The minimum is what any implementation moves: forward reads h and writes out; backward reads
grad_out and out and writes grad_hidden. Counted traffic includes every weight-tile load, z, gz,
the weight-gradient partials and their reduction, with no cache: an upper bound on DRAM bytes.
"""

import pytest
import torch

from steer_fast.kernels import launch
from steer_fast.kernels import post_block_steer as kernels
from steer_fast.kernels import steering_vector as vector_kernels
from steer_fast.ops import activation_id
from steer_fast_bench.traffic import TrafficCounter, measure_post_block_steer

pytestmark = pytest.mark.skipif(
    not launch.interpreted(), reason="traffic is counted by the Triton interpreter"
)


@pytest.mark.parametrize("fused_residual", [False, True])
def test_traffic_within_bounds(fused_residual):
    traffic = measure_post_block_steer(
        n_tokens=512, hidden_size=256, rank=8, fused_residual=fused_residual
    )
    assert traffic.forward_ratio <= 1.6, traffic
    assert traffic.backward_ratio <= 2.0, traffic
    assert set(traffic.forward) == {"_post_block_steer_forward_kernel"}
    assert set(traffic.backward) == {
        "_post_block_steer_backward_rows_kernel",
        "_post_block_steer_backward_cols_kernel",
        "_reduce_weight_grads_kernel",
    }
    # One launch each: the forward is a single kernel, the backward three.
    assert all(k.launches == 1 for k in (*traffic.forward.values(), *traffic.backward.values()))


def test_counter_counts_exact_bytes():
    """A known kernel: the forward on 3 tokens x d = 16 at rank 1, all in one program."""
    hidden = torch.randn(3, 16)
    down, up = torch.randn(1, 16), torch.randn(16, 1)
    with TrafficCounter() as traffic:
        kernels.post_block_steer_forward(
            hidden,
            down,
            up,
            down_bias=None,
            up_bias=None,
            residual=None,
            activation=activation_id("identity"),
            scale=1.0,
        )
    entry = traffic.by_kernel["_post_block_steer_forward_kernel"]
    # Single pass: read h (3 x 16) once, D (16) and U (16); write out (3 x 16) and z (3 x 1).
    assert entry.load_bytes == 4 * (3 * 16 + 16 + 16)
    assert entry.store_bytes == 4 * (3 * 16 + 3)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steering_vector_traffic_is_the_minimum(dtype, residual):
    """steering_vector. Forward: read hidden (and residual), write out, plus b once per row
    block. Backward: read g once, plus the [splits, d] fp32 partials written and read once, and
    db written."""
    n_tokens, hidden_size = 200, 1000
    hidden = torch.randn(n_tokens, hidden_size).to(dtype)
    res = torch.randn(n_tokens, hidden_size).to(dtype) if residual else None
    bias = torch.randn(hidden_size).to(dtype)
    grad_out = torch.randn(n_tokens, hidden_size).to(dtype)
    element = hidden.element_size()
    dense = n_tokens * hidden_size * element
    forward_kernel = "_steering_vector_forward_kernel"
    backward_kernel = "_steering_vector_backward_kernel"
    reduce_kernel = "_steering_vector_reduce_kernel"

    forward_plan = vector_kernels.plan_forward(hidden, bias, res, 0.5)
    with TrafficCounter() as forward:
        vector_kernels.steering_vector_forward(hidden, bias, res, 0.5)
    row_blocks = forward_plan.launches[0].grid[0]
    assert set(forward.by_kernel) == {forward_kernel}
    assert forward.by_kernel[forward_kernel].launches == 1
    assert forward.by_kernel[forward_kernel].store_bytes == dense
    assert forward.by_kernel[forward_kernel].load_bytes == (
        (2 if residual else 1) * dense + row_blocks * hidden_size * element
    )

    backward_plan = vector_kernels.plan_backward(grad_out, 0.5)
    splits = backward_plan.launches[0].grid[1]
    assert splits == 2
    with TrafficCounter() as backward:
        vector_kernels.steering_vector_backward(grad_out, 0.5)
    partials = splits * hidden_size * 4
    assert backward.by_kernel[backward_kernel].load_bytes == dense
    assert backward.by_kernel[backward_kernel].store_bytes == partials
    assert backward.by_kernel[reduce_kernel].load_bytes == partials
    assert backward.by_kernel[reduce_kernel].store_bytes == hidden_size * element
