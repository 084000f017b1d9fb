"""The orthogonality measures and projections on constructed matrices, and
OrthogonalityConfig: its fields, the constraint a config means, and its checks."""

import pytest
import torch

from steer_fast import OrthogonalityConfig
from steer_fast.joint.orthogonality import (
    column_space_bases,
    down_projection_overlaps,
    layer_penalty,
    normalize_columns,
    project_down,
    project_out,
)

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


def _down_and_update(seed=7, rank=3, columns=4):
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, D, generator=generator)
    update = torch.randn(D, columns, generator=generator)
    return down, update


def test_column_space_bases_are_orthonormal_bases_of_span_b():
    _, update = _down_and_update()
    rank_two = update[:, :2] @ torch.randn(2, 3, generator=torch.Generator().manual_seed(8))
    bases = column_space_bases([update, rank_two, torch.zeros(D, 2)], rank_tolerance=1e-6)
    full, two, zero = bases
    torch.testing.assert_close(full.T @ full, torch.eye(4), rtol=0, atol=1e-5)
    # The projector V V^T reproduces B: span(V) = span(B).
    torch.testing.assert_close(full @ (full.T @ update), update, rtol=0, atol=1e-4)
    kept = two.norm(dim=0) > 0.5
    assert kept.tolist() == [True, True, False]  # rank 2: the third direction is dropped
    torch.testing.assert_close(two @ (two.T @ rank_two), rank_two, rtol=0, atol=1e-4)
    assert torch.equal(zero, torch.zeros(D, 2))  # span {0}: nothing to project
    # Batched (same shapes) and one by one agree.
    alone = column_space_bases([update], rank_tolerance=1e-6)[0]
    torch.testing.assert_close(alone @ alone.T, full @ full.T, rtol=0, atol=1e-5)


def test_down_projection_removes_span_b_from_the_rows_and_keeps_the_rest():
    down, update = _down_and_update()
    (basis,) = column_space_bases([update], rank_tolerance=1e-6)
    (overlap,) = down_projection_overlaps([down], [basis])
    torch.testing.assert_close(overlap, (down @ basis).pow(2).sum())
    assert overlap.item() > 0.1
    complement = torch.eye(D) - basis @ basis.T
    before = down.clone()
    parameter = torch.nn.Parameter(down)
    storage = parameter.data_ptr()
    project_down([parameter], [basis])
    assert parameter.data_ptr() == storage  # in place
    # Nothing left along span(B), relative to the weight's size.
    assert (parameter @ basis).norm() <= 1e-6 * parameter.norm()
    assert (parameter @ update).norm() <= 1e-6 * parameter.norm() * update.norm()
    remaining = down_projection_overlaps([parameter], [basis])[0].item()
    assert remaining <= 1e-12 * parameter.norm().item() ** 2
    # The component orthogonal to span(B) is unchanged; the change lies in span(B).
    torch.testing.assert_close(parameter @ complement, before @ complement, rtol=0, atol=1e-6)
    change = (parameter - before).detach()
    torch.testing.assert_close(change @ complement, torch.zeros_like(change), rtol=0, atol=1e-6)
    torch.testing.assert_close(parameter.detach(), before - before @ basis @ basis.T)


def test_down_projection_of_a_zero_b_changes_nothing_and_keeps_bf16():
    down, _ = _down_and_update()
    expected = down.clone()
    bases = column_space_bases([torch.zeros(D, 4)], rank_tolerance=1e-6)
    project_down([down], bases)
    assert torch.equal(down, expected)
    low = down.bfloat16()
    _, update = _down_and_update(seed=9)
    project_down([low], column_space_bases([update], rank_tolerance=1e-6))
    assert low.dtype == torch.bfloat16
    # bf16 rounding of the result, not more.
    assert (low.float() @ update).norm() <= 1e-2 * low.float().norm() * update.norm()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weight": -0.1}, "weight"),
        ({"weight": float("nan")}, "weight"),
        ({"weight": float("inf")}, "weight"),
        ({"weight": "1"}, "weight"),
        ({"mode": "soft"}, "mode"),
        ({"mode": 1}, "mode"),
        ({"eps": 0.0}, "eps"),
        ({"rank_tolerance": -1.0}, "rank_tolerance"),
        ({"residual_modules": "o_proj"}, "residual_modules"),
        ({"residual_modules": []}, "residual_modules"),
        ({"residual_modules": ["o_proj", "o_proj"]}, "residual_modules"),
        ({"residual_modules": ["self_attn..o_proj"]}, "residual_modules"),
        ({"constraint": "orthogonal"}, "constraint"),
        ({"constraint": 1}, "constraint"),
        ({"frequency": 0}, "frequency"),
        ({"frequency": -2}, "frequency"),
        ({"frequency": True}, "frequency"),
        ({"frequency": 2.0}, "frequency"),
        ({"frequency": "10"}, "frequency"),
        ({"frequency": "steps"}, "frequency"),
        ({"modules": "mlp.down_proj"}, "modules"),
        ({"modules": []}, "modules"),
        ({"modules": ["mlp..down_proj"]}, "modules"),
        # A field of another constraint than the one named (or meant).
        ({"constraint": "down_projection", "mode": "project"}, "mode configures the up_proj"),
        ({"constraint": "down_projection", "weight": 0.1}, "weight configures the up_proj"),
        ({"constraint": "none", "weight": 0.1}, "weight configures"),
        ({"constraint": "up_projection", "frequency": 2}, "frequency configures the down_proj"),
        ({"constraint": "none", "frequency": "step"}, "frequency configures"),
        ({"weight": 0.1, "frequency": 2}, r"frequency .* \(weight given\)"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OrthogonalityConfig(**kwargs)


def test_the_default_is_the_published_down_projection_every_100_steps():
    config = OrthogonalityConfig()
    assert (config.constraint, config.frequency) == ("down_projection", 100)
    assert config.modules is None and config.residual_modules is None
    assert config.mode is None and config.weight is None and config.enforced
    assert OrthogonalityConfig(frequency=5).frequency == 5
    assert OrthogonalityConfig(modules=["mlp.down_proj"]).modules == ("mlp.down_proj",)


@pytest.mark.parametrize(
    "kwargs, mode, weight",
    [
        ({"weight": 0.5, "mode": "penalty"}, "penalty", 0.5),
        ({"weight": 0.5}, "penalty", 0.5),
        ({"mode": "project"}, "project", 0.1),
        ({"mode": "none"}, "none", 0.1),
        ({"residual_modules": ["mlp.down_proj"]}, "penalty", 0.1),
        ({"eps": 1e-4}, "penalty", 0.1),
        ({"constraint": "up_projection"}, "penalty", 0.1),
    ],
)
def test_configs_that_set_up_projection_fields_keep_their_meaning(kwargs, mode, weight):
    """Written before ``constraint`` existed, these meant the up-projection constraint."""
    config = OrthogonalityConfig(**kwargs)
    assert config.constraint == "up_projection"
    assert (config.mode, config.weight, config.frequency) == (mode, weight, None)
    assert config.enforced == (mode != "none")


def test_config_round_trips_through_a_dict():
    for config in (
        OrthogonalityConfig(weight=1, mode="project", residual_modules=["attn.c_proj"]),
        OrthogonalityConfig(frequency=3, modules=["mlp.c_proj"], rank_tolerance=1e-5),
        OrthogonalityConfig(constraint="none"),
    ):
        assert OrthogonalityConfig.from_dict(config.to_dict()) == config
    config = OrthogonalityConfig(weight=1, mode="project", residual_modules=["attn.c_proj"])
    assert config.weight == 1.0 and config.residual_modules == ("attn.c_proj",)
    with pytest.raises(ValueError, match="unknown orthogonality config keys"):
        OrthogonalityConfig.from_dict({**config.to_dict(), "strength": 2})
    # A dict written before "constraint" existed: the up-projection constraint.
    old = {"weight": 0.1, "mode": "penalty", "eps": 1e-3, "rank_tolerance": 1e-6}
    assert OrthogonalityConfig.from_dict({**old, "residual_modules": None}).constraint == (
        "up_projection"
    )
