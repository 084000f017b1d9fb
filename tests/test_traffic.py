"""Memory traffic of the Triton kernels, counted under the interpreter (the CPU stand-in for HBM).

The minimum is what any implementation moves: forward reads h and writes out; backward reads
grad_out and out and writes grad_hidden. Counted traffic includes every weight-tile load, z, gz,
the weight-gradient partials and their reduction, with no cache: an upper bound on DRAM bytes.
"""

import pytest
import torch

from steer_fast.kernels import post_block_steer as kernels
from steer_fast.traffic import TrafficCounter, measure_post_block_steer

pytestmark = pytest.mark.skipif(
    not kernels.interpreted(), reason="traffic is counted by the Triton interpreter"
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
            activation="identity",
            scale=1.0,
        )
    entry = traffic.by_kernel["_post_block_steer_forward_kernel"]
    # Single pass: read h (3 x 16) once, D (16) and U (16); write out (3 x 16) and z (3 x 1).
    assert entry.load_bytes == 4 * (3 * 16 + 16 + 16)
    assert entry.store_bytes == 4 * (3 * 16 + 3)
