"""The orthogonality penalty and projection on constructed matrices, and OrthogonalityConfig."""

import pytest
import torch

from steer_fast import OrthogonalityConfig
from steer_fast.orthogonality import layer_penalty, normalize_columns, project_out

D = 16


def _orthonormal(columns: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=generator, dtype=torch.float64))
    return q[:, :columns].float()


def _split_orthogonal():
    """U [16, 3] and two B's [16, 2], [16, 3], U orthogonal to both, none orthonormal."""
    q = _orthonormal(8)
    generator = torch.Generator().manual_seed(1)
    mix = lambda k: torch.randn(k, k, generator=generator) + 2 * torch.eye(k)  # full rank
    up = q[:, :3] @ mix(3)
    b1 = q[:, 3:5] @ mix(2) * 0.01  # tiny columns: only directions count
    b2 = q[:, 5:8] @ mix(3) * 7.0
    return up, [b1, b2]


def _cos2(up, bs):
    """sum of squared cosines, written out pair by pair."""
    total = 0.0
    for i in range(up.shape[1]):
        for b in bs:
            for j in range(b.shape[1]):
                u, v = up[:, i].double(), b[:, j].double()
                total += float((u @ v) ** 2 / ((u @ u) * (v @ v)))
    return total


def test_penalty_is_zero_for_orthogonal_directions():
    up, bs = _split_orthogonal()
    assert layer_penalty(up, bs, eps=1e-3).item() < 1e-10


def test_penalty_is_the_sum_of_squared_cosines_otherwise():
    generator = torch.Generator().manual_seed(2)
    up = torch.randn(D, 3, generator=generator)
    bs = [torch.randn(D, 2, generator=generator), torch.randn(D, 4, generator=generator)]
    penalty = layer_penalty(up, bs, eps=1e-3)
    assert penalty.dtype == torch.float32 and penalty.dim() == 0
    assert penalty.item() > 0
    torch.testing.assert_close(penalty.item(), _cos2(up, bs), rtol=1e-5, atol=0)
    # Directions only: rescaling columns changes nothing; the bound is r_s * sum r_w.
    scaled = layer_penalty(up * torch.tensor([3.0, 0.5, 20.0]), [bs[0] * 9, bs[1] / 4], eps=1e-3)
    torch.testing.assert_close(scaled, penalty, rtol=1e-5, atol=0)
    same = layer_penalty(bs[0][:, :1].repeat(1, 3), bs, eps=1e-3)
    assert same.item() <= 3 * 6 + 1e-4
    assert same.item() >= 3 - 1e-4  # each column of U meets itself in B: cos^2 = 1


def test_gradient_reaches_u_and_every_b():
    generator = torch.Generator().manual_seed(3)
    up = torch.randn(D, 3, generator=generator, requires_grad=True)
    bs = [torch.randn(D, 2, generator=generator, requires_grad=True) for _ in range(2)]
    layer_penalty(up, bs, eps=1e-3).backward()
    for tensor in (up, *bs):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    # Against a finite difference in float64 (the penalty is fp32 by design: compare loosely).
    direction = torch.randn(D, 3, generator=generator)
    step = 1e-3
    with torch.no_grad():
        plus = _cos2(up + step * direction, bs)
        minus = _cos2(up - step * direction, bs)
    numeric = (plus - minus) / (2 * step)
    torch.testing.assert_close((up.grad * direction).sum().item(), numeric, rtol=1e-2, atol=1e-4)


def test_zero_initialisations_give_zero_with_finite_gradients():
    up = torch.zeros(D, 3, requires_grad=True)
    b = torch.zeros(D, 2, requires_grad=True)
    penalty = layer_penalty(up, [b], eps=1e-3)
    penalty.backward()
    assert penalty.item() == 0
    assert torch.isfinite(up.grad).all() and torch.isfinite(b.grad).all()
    assert layer_penalty(torch.randn(D, 3), [], eps=1e-3).item() == 0


def test_penalty_stays_fp32_under_autocast():
    generator = torch.Generator().manual_seed(4)
    up = torch.randn(D, 3, generator=generator).bfloat16()
    bs = [torch.randn(D, 2, generator=generator)]
    expected = layer_penalty(up, bs, eps=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = layer_penalty(up, bs, eps=1e-3)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, expected)


def test_normalize_columns_divides_short_columns_by_eps():
    matrix = torch.tensor([[3.0, 1e-5], [4.0, 0.0]])
    normalized = normalize_columns(matrix, eps=1e-3)
    torch.testing.assert_close(normalized[:, 0], torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(normalized[:, 1], torch.tensor([1e-2, 0.0]))


def test_projection_removes_span_of_b_and_keeps_the_rest():
    up, bs = _split_orthogonal()
    generator = torch.Generator().manual_seed(5)
    inside = torch.cat(bs, 1) @ torch.randn(5, 3, generator=generator)  # in span(B)
    mixed = up + inside
    project_out(mixed, bs, rank_tolerance=1e-6)
    torch.testing.assert_close(mixed, up, rtol=1e-4, atol=1e-4)
    assert layer_penalty(mixed, bs, eps=1e-3).item() < 1e-10
    again = mixed.clone()
    project_out(again, bs, rank_tolerance=1e-6)  # idempotent
    torch.testing.assert_close(again, mixed, rtol=1e-4, atol=1e-5)


def test_projection_in_place_keeps_the_parameter_and_dtype():
    up = torch.nn.Parameter(torch.randn(D, 3).bfloat16())
    before = up.data_ptr()
    project_out(up, [torch.randn(D, 2)], rank_tolerance=1e-6)
    assert up.data_ptr() == before and up.dtype == torch.bfloat16


def test_projection_with_zero_b_changes_nothing():
    up = torch.randn(D, 3)
    expected = up.clone()
    project_out(up, [torch.zeros(D, 2)], rank_tolerance=1e-6)
    assert torch.equal(up, expected)


def test_projection_drops_directions_below_the_rank_tolerance():
    q = _orthonormal(3, seed=6)
    b = torch.stack([q[:, 0], q[:, 0] + 1e-9 * q[:, 1]], 1)  # numerically rank 1
    up = q[:, 1:3].clone()
    project_out(up, [b], rank_tolerance=1e-6)
    torch.testing.assert_close(up, q[:, 1:3], rtol=0, atol=1e-5)  # q1 is not B's direction


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weight": -0.1}, "weight"),
        ({"weight": float("nan")}, "weight"),
        ({"weight": float("inf")}, "weight"),
        ({"weight": "1"}, "weight"),
        ({"mode": "soft"}, "mode"),
        ({"mode": None}, "mode"),
        ({"eps": 0.0}, "eps"),
        ({"rank_tolerance": -1.0}, "rank_tolerance"),
        ({"residual_modules": "o_proj"}, "residual_modules"),
        ({"residual_modules": []}, "residual_modules"),
        ({"residual_modules": ["o_proj", "o_proj"]}, "residual_modules"),
        ({"residual_modules": ["self_attn..o_proj"]}, "residual_modules"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OrthogonalityConfig(**kwargs)


def test_config_round_trips_through_a_dict():
    config = OrthogonalityConfig(weight=1, mode="project", residual_modules=["attn.c_proj"])
    assert config.weight == 1.0 and config.residual_modules == ("attn.c_proj",)
    assert OrthogonalityConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown orthogonality config keys"):
        OrthogonalityConfig.from_dict({**config.to_dict(), "strength": 2})
