"""multi_adapter_steer on the torch path and both Triton paths against an fp64 per-row reference.

Every token row picks a slot (0 = no steering) and a strength; the reference below loops over the
rows in Python. On a machine without a GPU the Triton paths run under the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), so the shapes stay small: tens of rows, d of 24 to
96, ranks up to 8.

Tolerances are op_helpers.TOLERANCES (relative to max(|reference|, 1)). Worst errors measured on
these shapes over three seeds: fp32 3.6e-7; fp16 9.2e-4; bf16 6.7e-3 on the torch path and
1.45e-2 on the Triton paths under the interpreter (dD: h is rebuilt from the bf16 ``out``).
"""

from __future__ import annotations

import pytest
import torch

from steer_fast import multi_adapter_steer
from steer_fast.kernels import launch as kernel_launch
from steer_fast.kernels import multi_adapter_steer as kernels
from steer_fast.ops import activate, activation_id
from steer_fast.ops import multi_adapter_steer_torch as multi_adapter_torch

from op_helpers import TOLERANCES, OpInputs, assert_close, assert_matches_reference, run_op

# (backend, path): the torch and the Triton forward's two paths each (one backward per backend).
PATHS = [("torch", "gather"), ("torch", "grouped"), ("triton", "gather"), ("triton", "grouped")]
PATH_IDS = ["torch-gather", "torch-grouped", "gather", "grouped"]


def reference(
    hidden,
    down,
    up,
    down_bias=None,
    up_bias=None,
    *,
    residual=None,
    adapter_index,
    scales,
    activations,
):
    """out_n = h_n for slot 0, else h_n + s_n (U_a phi_a(D_a h_n + bd_a) + bu_a): a row loop."""
    h = hidden if residual is None else residual + hidden
    rows = h.reshape(-1, h.shape[-1])
    slots = adapter_index.reshape(-1).tolist()
    strengths = scales.reshape(-1).float().tolist()  # the op reads scales as fp32
    if isinstance(activations, str):
        activations = (activations,) * down.shape[0]
    out_rows = []
    for n, (slot, s) in enumerate(zip(slots, strengths)):
        if slot == 0:
            out_rows.append(rows[n])
            continue
        z = down[slot] @ rows[n] + (0 if down_bias is None else down_bias[slot])
        delta = up[slot] @ activate(z, activations[slot])
        delta = delta + (0 if up_bias is None else up_bias[slot])
        out_rows.append(rows[n] + s * delta)
    return torch.stack(out_rows).reshape(h.shape)


def make_inputs(
    shape,
    ranks,
    *,
    down_bias=True,
    up_bias=True,
    residual=True,
    dtype=torch.float32,
    device="cpu",
) -> OpInputs:
    """Stacked adapters of the given ranks (slot 0 included: it must be ignored), zero-padded
    to the largest rank; O(1) activations as in op_helpers.make_inputs."""
    hidden_size, n_slots, rank = shape[-1], len(ranks), max(ranks)

    randn = lambda *size, scale=1.0: torch.randn(*size, dtype=torch.float64) * scale
    down = torch.zeros(n_slots, rank, hidden_size, dtype=torch.float64)
    up = torch.zeros(n_slots, hidden_size, rank, dtype=torch.float64)
    down_b = torch.zeros(n_slots, rank, dtype=torch.float64)
    for slot, r in enumerate(ranks):
        down[slot, :r] = randn(r, hidden_size, scale=hidden_size**-0.5)
        up[slot, :, :r] = randn(hidden_size, r, scale=r**-0.5)
        down_b[slot, :r] = randn(r, scale=0.5)
    tensors = [
        randn(*shape),
        down,
        up,
        down_b if down_bias else None,
        randn(n_slots, hidden_size, scale=0.5) if up_bias else None,
        randn(*shape) if residual else None,
    ]
    return OpInputs(*[None if t is None else t.to(device) for t in tensors]).converted(dtype)


def make_scales(tokens, device="cpu") -> torch.Tensor:
    """Per-row strengths: normal (negative included), every fifth one zero."""
    scales = torch.randn(tokens, dtype=torch.float32)
    scales.view(-1)[::5] = 0.0
    return scales.to(device)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 and +0.0 differ."""
    views = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.detach().contiguous().view(views[tensor.element_size()])


def check_case(inputs, adapter_index, scales, activations, backend, path, rel, grad_out=None):
    """Forward and every gradient against the reference; slot-0 rows bit-identical to h;
    slot 0 and unused slots with exactly zero weight gradients."""
    hidden = inputs.hidden
    if grad_out is None:
        grad_out = torch.randn(hidden.shape, dtype=torch.float64).to(hidden)
    routing = dict(adapter_index=adapter_index, scales=scales, activations=activations)
    out, grads = run_op(
        multi_adapter_steer, inputs, grad_out, backend=backend, path=path, **routing
    )
    assert out.shape == hidden.shape and out.dtype == hidden.dtype and out.is_contiguous()
    ref_inputs = inputs.converted(torch.float64)
    ref_out, ref_grads = run_op(reference, ref_inputs, grad_out.double(), **routing)
    # A weight no row reads gets no gradient from the reference: it is zero.
    ref_grads = [
        torch.zeros_like(t) if g is None and t is not None else g
        for t, g in zip(ref_inputs.tensors(), ref_grads)
    ]
    assert_matches_reference(out, grads, ref_out, ref_grads, rel)

    h = (hidden if inputs.residual is None else inputs.residual + hidden).detach()
    unsteered = adapter_index == 0
    interpreted_bf16 = kernel_launch.interpreted() and hidden.dtype == torch.bfloat16
    if backend == "triton" and interpreted_bf16 and inputs.residual is not None:
        # The interpreter's fp32 -> bf16 downcast of residual + hidden can differ from torch's
        # rounding by one ulp (/work/shared/KERNEL-NOTES.md); a GPU rounds as torch does.
        torch.testing.assert_close(out[unsteered], h[unsteered], rtol=2**-7, atol=0)
    else:
        assert torch.equal(bits(out[unsteered]), bits(h[unsteered]))
    unused = set(range(inputs.down_weight.shape[0])) - set(adapter_index.unique().tolist())
    for grad in [g for g in grads[1:5] if g is not None]:
        assert all(torch.count_nonzero(grad[slot]) == 0 for slot in unused | {0})
    return out, grads


# ----------------------------------------------------------------------------------------------
# Against the reference
# ----------------------------------------------------------------------------------------------

MIXED = ("gelu", "silu", "relu", "tanh", "gelu_tanh")


def _case(name: str, device):
    """(inputs, adapter_index, activations) of one named routing case."""
    if name == "mixed_ranks_and_phis":  # odd N, ids in any order, int32 index
        inputs = make_inputs((37, 40), (3, 3, 8, 1, 5), device=device)
        index = torch.randint(0, 5, (37,), dtype=torch.int32)
        return inputs, index, MIXED
    if name == "3d_plain":  # 3-D, no biases, no residual, one phi, -0.0 in unsteered rows
        inputs = make_inputs(
            (2, 9, 24), (2, 4, 4), down_bias=False, up_bias=False, residual=False, device=device
        )
        with torch.no_grad():
            inputs.hidden[..., 0] = -0.0
        index = torch.tensor([[0, 1, 2, 1, 0, 2, 2, 1, 0], [2, 2, 0, 1, 1, 1, 0, 2, 1]])
        return inputs, index, "silu"
    if name == "one_row_per_adapter":
        inputs = make_inputs((4, 96), (4, 2, 7, 3), down_bias=False, device=device)
        return inputs, torch.tensor([3, 1, 2, 0]), ("identity", "gelu", "identity", "tanh")
    if name == "all_rows_one_adapter":  # more than one block of one slot
        inputs = make_inputs((33, 40), (2, 6, 3), up_bias=False, device=device)
        return inputs, torch.full((33,), 1), "gelu"
    if name == "many_adapters":  # A = 9, most slots with a few rows, some unused
        inputs = make_inputs((20, 24), (1, 8, 2, 5, 1, 7, 3, 8, 4), device=device)
        index = torch.tensor([5, 8, 1, 1, 0, 7, 3, 5, 8, 8, 1, 3, 0, 7, 7, 5, 3, 1, 8, 5])
        return inputs, index, ("relu", *MIXED, "silu", "gelu", "identity")
    raise AssertionError(name)


CASES = [
    "mixed_ranks_and_phis",
    "3d_plain",
    "one_row_per_adapter",
    "all_rows_one_adapter",
    "many_adapters",
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend, path", PATHS, ids=PATH_IDS)
def test_matches_reference(backend, path, case, device):
    inputs, index, activations = _case(case, device)
    index = index.to(device)
    scales = make_scales(index.shape, device)
    check_case(inputs, index, scales, activations, backend, path, TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend, path", PATHS, ids=PATH_IDS)
def test_low_precision(backend, path, dtype, device):
    inputs = make_inputs((37, 96), (4, 8, 3, 8), dtype=dtype, device=device)
    index = torch.randint(0, 4, (37,), device=device)
    scales = make_scales(37, device).to(dtype)  # any floating dtype is read as fp32
    activations = ("identity", "silu", "gelu", "silu")
    check_case(inputs, index, scales, activations, backend, path, TOLERANCES[dtype])


@pytest.mark.parametrize("layout", ["3d_transposed", "column_stride"])
@pytest.mark.parametrize("backend, path", PATHS, ids=PATH_IDS)
def test_strided_layouts(backend, path, layout, device):
    inputs = make_inputs((3, 7, 40), (3, 5, 2), device=device)
    hidden, residual = inputs.hidden.detach(), inputs.residual.detach()
    grad_out = None
    if layout == "3d_transposed":
        # [T, B, d] storage seen as [B, T, d]; weights stored transposed too.
        hidden = hidden.transpose(0, 1).contiguous().transpose(0, 1)
        residual = residual.transpose(0, 1).contiguous().transpose(0, 1)
        for name in ("down_weight", "up_weight"):
            weight = getattr(inputs, name).detach()
            setattr(inputs, name, weight.mT.contiguous().mT.requires_grad_())
    else:
        # Elements of a row two apart, and loss = out.sum(): a stride-0 gradient.
        hidden = torch.zeros(3, 7, 80, device=device)[..., ::2].copy_(hidden)
        grad_out = torch.ones((), device=device).expand(3, 7, 40)
    inputs.hidden, inputs.residual = hidden.requires_grad_(), residual.requires_grad_()
    assert not inputs.hidden.is_contiguous()
    index = torch.randint(0, 3, (3, 7), device=device)
    scales = make_scales((3, 7), device)
    if layout == "column_stride":  # a strided index and strided scales too
        index = torch.zeros(3, 14, dtype=torch.int64, device=device)[:, ::2].copy_(index)
        scales = torch.zeros(3, 14, device=device)[:, ::2].copy_(scales)
    check_case(
        inputs,
        index,
        scales,
        ("relu", "tanh", "silu"),
        backend,
        path,
        TOLERANCES[torch.float32],
        grad_out,
    )


@pytest.mark.parametrize("backend, path", PATHS, ids=PATH_IDS)
def test_all_rows_on_slot_zero(backend, path, device):
    """Nothing steers: out is h bit for bit, dh is g, and every weight gradient is zero."""
    inputs = make_inputs((2, 5, 24), (3, 3), device=device)
    index = torch.zeros((2, 5), dtype=torch.int64, device=device)
    grad_out = torch.randn(2, 5, 24, device=device)
    _, grads = check_case(
        inputs,
        index,
        make_scales((2, 5), device),
        "silu",
        backend,
        path,
        TOLERANCES[torch.float32],
        grad_out,
    )
    assert torch.equal(grads[0], grad_out) and torch.equal(grads[5], grad_out)
    # A single slot (slot 0 alone): nothing to steer at all.
    hidden = inputs.hidden.detach()
    out = multi_adapter_steer(
        hidden,
        inputs.down_weight[:1],
        inputs.up_weight[:1],
        adapter_index=index,
        scales=make_scales((2, 5), device),
        activations="relu",
        backend=backend,
        path=path,
    )
    assert torch.equal(bits(out), bits(hidden))


@pytest.mark.parametrize(
    "backend, path", [("triton", "gather"), ("triton", "grouped"), ("torch", "gather")]
)
def test_unchecked_out_of_range_index_is_unsteered(backend, path, device):
    """With check_index=False an out-of-range slot is the caller's bug; the Triton paths and
    the torch gather path then leave the row unsteered instead of reading outside the weights
    or skipping the row."""
    inputs = make_inputs((6, 24), (2, 2, 2), device=device)
    index = torch.tensor([1, 7, 2, -1, 0, 3], device=device)
    tensors = [t.detach() for t in inputs.tensors()[:5]]
    out = multi_adapter_steer(
        *tensors,
        adapter_index=index,
        scales=torch.ones(6, device=device),
        activations="silu",
        backend=backend,
        path=path,
        check_index=False,
    )
    assert torch.equal(out[[1, 3, 4, 5]], tensors[0][[1, 3, 4, 5]])
    assert not torch.equal(out[[0, 2]], tensors[0][[0, 2]])
    with pytest.raises(ValueError, match="adapter_index"):
        multi_adapter_steer(
            *tensors,
            adapter_index=index,
            scales=torch.ones(6, device=device),
            activations="silu",
            backend=backend,
            path=path,
        )


@pytest.mark.parametrize(
    "backend, path", [("torch", "auto"), ("triton", "gather")], ids=["torch", "triton"]
)
def test_backward_is_deterministic(backend, path, device):
    """Two backward runs agree bit for bit (fixed-order per-slot reductions, no atomics)."""
    inputs = make_inputs((90, 24), (2, 4, 4), device=device)
    index = torch.randint(0, 3, (90,), device=device)
    scales = make_scales(90, device)
    grad_out = torch.randn(90, 24, device=device)
    runs = [
        run_op(
            multi_adapter_steer,
            inputs.converted(torch.float32),
            grad_out,
            adapter_index=index,
            scales=scales,
            activations="silu",
            backend=backend,
            path=path,
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0][0], runs[1][0])
    for first, second in zip(runs[0][1], runs[1][1]):
        assert torch.equal(first, second)


def test_explicit_kernel_configs(device):
    """The launchers with small forced blocks: three column chunks (the last partial), several
    blocks per slot; both forward paths and the backward (several token units per slot) against
    the reference."""
    inputs = make_inputs((45, 40), (3, 5, 2, 4), device=device)
    index = torch.randint(0, 4, (45,), device=device)
    scales = make_scales(45, device)
    grad_out = torch.randn(45, 40, device=device)
    activations = ("silu", "gelu", "silu", "tanh")
    tensors = [None if t is None else t.detach() for t in inputs.tensors()]
    config = kernels.MultiAdapterConfig(block_m=16, block_d=16)
    ref_out, ref_grads = run_op(
        reference,
        inputs.converted(torch.float64),
        grad_out.double(),
        adapter_index=index,
        scales=scales,
        activations=activations,
    )
    rel = TOLERANCES[torch.float32]
    phi_ids = [activation_id(name) for name in activations]
    for path in ("gather", "grouped"):
        forward = kernels.multi_adapter_steer_forward(
            *tensors, index, scales, phi_ids, path=path, config=config
        )
        assert_close(f"out ({path})", forward.out, ref_out, rel)
        h = (tensors[5] + tensors[0]).double()
        z_ref = torch.einsum("nd,nrd->nr", h, tensors[1].double()[index])
        z_ref = (z_ref + tensors[3].double()[index]) * (index != 0)[:, None]
        assert_close(f"z ({path})", forward.z, z_ref, rel)
    backward = kernels.multi_adapter_steer_backward(
        grad_out,
        forward.out,
        forward.z,
        tensors[1],
        tensors[2],
        tensors[4],
        index,
        scales,
        phi_ids,
        config=SMALL_BACKWARD,
    )
    for name, got, want in zip(
        ["hidden", "down", "up", "down_bias", "up_bias"], backward, ref_grads
    ):
        assert_close(f"grad {name}", got, want, rel)


# 16-row blocks, 16-column tiles (three over d = 40, the last partial) and 3 token splits, so
# that a slot's rows span several token units.
SMALL_BACKWARD = kernels.BackwardConfig(
    rows_block_m=16, rows_block_d=16, cols_block_m=16, cols_block_d=16, splits=3
)


@pytest.mark.parametrize("spread", ["skewed", "one_row_each", "sorted"])
def test_backward_token_units(spread, device):
    """The backward's column-stationary layout: one slot's rows over several token units, slots
    with a single row, rows already sorted; the partial buffer has a row per unit, at most
    splits + A of them (not one per row block)."""
    n_rows, ranks = 70, (2, 3, 1, 3, 2)
    if spread == "skewed":
        index = torch.where(torch.arange(n_rows) % 7 == 0, torch.arange(n_rows) % 5, 3)
    elif spread == "one_row_each":
        index = torch.cat([torch.arange(1, 5), torch.zeros(n_rows - 4, dtype=torch.int64)])
    else:
        index = torch.arange(n_rows) * 5 // n_rows
    index = index.to(device)
    inputs = make_inputs((n_rows, 40), ranks, device=device)
    scales = make_scales(n_rows, device)
    grad_out = torch.randn(n_rows, 40, device=device)
    activations = ("identity", "silu", "tanh", "gelu_tanh", "relu")
    tensors = [None if t is None else t.detach() for t in inputs.tensors()]
    _, ref_grads = run_op(
        reference,
        inputs.converted(torch.float64),
        grad_out.double(),
        adapter_index=index,
        scales=scales,
        activations=activations,
    )
    phi_ids = [activation_id(name) for name in activations]
    forward = kernels.multi_adapter_steer_forward(*tensors, index, scales, phi_ids)
    plan = kernels.plan_backward(
        grad_out,
        forward.out,
        forward.z,
        tensors[1],
        tensors[2],
        tensors[4],
        index,
        scales,
        phi_ids,
        config=SMALL_BACKWARD,
    )
    partials = plan.launches[1].kwargs["partial_ptr"]
    assert partials.shape[0] <= SMALL_BACKWARD.splits + len(ranks)
    for launch in plan.launches:
        launch()
    for name, got, want in zip(
        ["hidden", "down", "up", "down_bias", "up_bias"], plan.result, ref_grads
    ):
        assert_close(f"grad {name}", got, want, TOLERANCES[torch.float32])


def test_backward_workspace_is_per_unit_not_per_row_block():
    """At N = 16k, d = 4096, R = 16 the plan's fp32 buffers stay a few MB (meta tensors: nothing
    runs): the partials have (token splits + A) rows, where a row per 32-row block would make
    280 MB."""
    n_rows, hidden_size, rank, n_slots = 16384, 4096, 16, 2
    meta = dict(device="meta", dtype=torch.bfloat16)
    grad_out = torch.empty(n_rows, hidden_size, **meta)
    out = torch.empty(n_rows, hidden_size, **meta)
    z = torch.empty(n_rows, rank, device="meta")
    down = torch.empty(n_slots, rank, hidden_size, **meta)
    up = torch.empty(n_slots, hidden_size, rank, **meta)
    index = torch.empty(n_rows, dtype=torch.int64, device="meta")
    scales = torch.empty(n_rows, device="meta")
    silu = activation_id("silu")
    plan = kernels.plan_backward(grad_out, out, z, down, up, None, index, scales, (silu,) * 2)
    buffers = {
        id(t): t
        for launch in plan.launches
        for t in launch.kwargs.values()
        if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t is not z
    }
    workspace = sum(t.numel() * t.element_size() for t in buffers.values())
    assert workspace < 8 * 2**20, workspace


@pytest.mark.parametrize("backend, path", PATHS, ids=PATH_IDS)
def test_no_tokens(backend, path, device):
    inputs = make_inputs((0, 24), (2, 2), device=device)
    index = torch.zeros(0, dtype=torch.int64, device=device)
    out = multi_adapter_steer(
        inputs.hidden,
        inputs.down_weight,
        inputs.up_weight,
        inputs.down_bias,
        inputs.up_bias,
        adapter_index=index,
        scales=torch.zeros(0, device=device),
        activations="silu",
        residual=inputs.residual,
        backend=backend,
        path=path,
    )
    assert out.shape == (0, 24)
    out.sum().backward()
    assert torch.count_nonzero(inputs.down_weight.grad) == 0
    assert torch.count_nonzero(inputs.up_bias.grad) == 0


def test_torch_auto_path_choice():
    """The torch path gathers while the gathered weights cost less than the slot loop."""
    per_slot = multi_adapter_torch.TORCH_GATHER_ELEMENTS_PER_SLOT
    choose = multi_adapter_torch.choose_path
    assert choose(64, 65, 16, 512) == "gather"  # decode: one row per adapter, small d
    assert choose(128, 65, 16, 512) == "gather"  # two rows per adapter
    assert choose(256, 65, 16, 512) == "grouped"  # four
    assert choose(64, 65, 16, 2048) == "grouped"  # larger d: the gather copies too much
    assert choose(per_slot * 4 // (16 * 512), 5, 16, 512) == "gather"
    assert choose(per_slot * 4 // (16 * 512) + 1, 5, 16, 512) == "grouped"
    # A gathered pair over GATHER_MAX_ELEMENTS is never formed, however many adapters.
    rows = multi_adapter_torch.GATHER_MAX_ELEMENTS // (16 * 64) + 1
    assert choose(rows, 10**6, 16, 64) == "grouped"


def test_auto_path_choice():
    threshold = kernels.GROUPED_MIN_ROWS_PER_SLOT
    assert kernels.choose_path(8, 5) == "gather"  # decode: a few rows, many adapters
    assert kernels.choose_path(threshold * 4, 5) == "grouped"  # prefill
    assert kernels.choose_path(threshold * 4 - 1, 5) == "gather"


# ----------------------------------------------------------------------------------------------
# Autograd, compile, saved tensors
# ----------------------------------------------------------------------------------------------


def test_gradcheck_torch_path():
    inputs = make_inputs((2, 3, 6), (2, 2, 1), dtype=torch.float64)
    index = torch.tensor([[1, 0, 2], [2, 1, 1]])
    scales = torch.tensor([[0.5, 1.0, -2.0], [0.0, 1.5, -0.25]])

    def fn(hidden, down, up, down_bias, up_bias, residual):
        return multi_adapter_steer(
            hidden,
            down,
            up,
            down_bias,
            up_bias,
            adapter_index=index,
            scales=scales,
            activations=("identity", "gelu_tanh", "silu"),
            residual=residual,
            backend="torch",
        )

    assert torch.autograd.gradcheck(fn, tuple(inputs.tensors()))


@pytest.mark.parametrize(
    "backend, path", [("torch", "auto"), ("triton", "grouped")], ids=["torch", "triton"]
)
def test_backward_keeps_no_extra_token_by_hidden_tensor(backend, path, device):
    """Autograd saves out, z [N, R] fp32, the index and the scales: never h or a copy."""
    inputs = make_inputs((16, 40), (4, 4, 2), device=device)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = multi_adapter_steer(
            inputs.hidden,
            inputs.down_weight,
            inputs.up_weight,
            inputs.down_bias,
            inputs.up_bias,
            adapter_index=torch.randint(0, 3, (16,), device=device),
            scales=make_scales(16, device),
            activations="gelu",
            residual=inputs.residual,
            backend=backend,
            path=path,
        )
    big = [t for t in saved if t.numel() >= inputs.hidden.numel()]
    assert len(big) == 1 and big[0].data_ptr() == out.data_ptr()
    assert [t.dtype for t in saved if t.shape == (16, 4)] == [torch.float32]


@pytest.mark.parametrize(
    "backend, path", [("torch", "auto"), ("triton", "gather")], ids=["torch", "triton"]
)
def test_no_grad_calls_match_autograd_calls(backend, path, device):
    """Without autograd the op skips the registered op's dispatch; results are identical."""
    inputs = make_inputs((2, 7, 40), (3, 3), device=device)
    arguments = dict(
        adapter_index=torch.randint(0, 2, (2, 7), device=device),
        scales=make_scales((2, 7), device),
        activations="gelu",
        residual=inputs.residual,
        backend=backend,
        path=path,
    )
    tensors = inputs.tensors()[:5]
    with_graph = multi_adapter_steer(*tensors, **arguments)
    assert with_graph.grad_fn is not None
    with torch.no_grad():
        without_graph = multi_adapter_steer(*tensors, **arguments)
    assert without_graph.grad_fn is None
    assert torch.equal(with_graph.detach(), without_graph)


def test_compile_fullgraph_torch_backend():
    """torch.compile traces the registered ops, forward and backward, without a graph break;
    new index and scale values reuse the graph (they are tensors, not constants)."""
    inputs = make_inputs((2, 5, 24), (3, 4, 2))
    grad_out = torch.randn(2, 5, 24)
    activations = ("identity", "silu", "tanh")

    def fn(hidden, down, up, down_bias, up_bias, residual=None, *, adapter_index, scales):
        return multi_adapter_steer(
            hidden,
            down,
            up,
            down_bias,
            up_bias,
            adapter_index=adapter_index,
            scales=scales,
            activations=activations,
            residual=residual,
            backend="torch",
        )

    routings = [
        dict(adapter_index=torch.randint(0, 3, (2, 5)), scales=make_scales((2, 5)))
        for _ in range(2)
    ]
    detached = [t.detach() for t in inputs.tensors()]
    explanation = torch._dynamo.explain(fn)(*detached, **routings[0])
    assert explanation.graph_break_count == 0
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for routing in routings:
        eager_out, eager_grads = run_op(fn, inputs.converted(torch.float32), grad_out, **routing)
        compiled_out, compiled_grads = run_op(
            compiled, inputs.converted(torch.float32), grad_out, **routing
        )
        torch.testing.assert_close(compiled_out, eager_out)
        for a, b in zip(compiled_grads, eager_grads):
            torch.testing.assert_close(a, b)
    # Under compile the index check is a device-side assert: a RuntimeError, not a ValueError.
    with pytest.raises(RuntimeError, match="adapter_index"):
        compiled(*detached, adapter_index=torch.full((2, 5), 3), scales=routings[0]["scales"])


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _valid_arguments() -> dict:
    return dict(
        hidden=torch.randn(5, 8),
        down_weights=torch.randn(3, 2, 8),
        up_weights=torch.randn(3, 8, 2),
        down_biases=torch.randn(3, 2),
        up_biases=torch.randn(3, 8),
        adapter_index=torch.tensor([0, 1, 2, 1, 0]),
        scales=torch.ones(5),
        activations="silu",
        residual=torch.randn(5, 8),
    )


BAD_INPUTS = {
    "hidden_1d": ("hidden", dict(hidden=torch.randn(8))),
    "hidden_int": ("hidden", dict(hidden=torch.ones(5, 8, dtype=torch.int32))),
    "down_weights_2d": ("down_weights", dict(down_weights=torch.randn(2, 8))),
    "down_weights_d": ("down_weights", dict(down_weights=torch.randn(3, 2, 9))),
    "up_weights_shape": ("up_weights", dict(up_weights=torch.randn(3, 8, 3))),
    "up_weights_dtype": ("up_weights", dict(up_weights=torch.randn(3, 8, 2).double())),
    "down_biases_shape": ("down_biases", dict(down_biases=torch.randn(2, 2))),
    "up_biases_shape": ("up_biases", dict(up_biases=torch.randn(3, 7))),
    "residual_shape": ("residual", dict(residual=torch.randn(4, 8))),
    "index_float": ("adapter_index", dict(adapter_index=torch.zeros(5))),
    "index_int16": ("adapter_index", dict(adapter_index=torch.zeros(5, dtype=torch.int16))),
    "index_shape": ("adapter_index", dict(adapter_index=torch.zeros(5, 1, dtype=torch.int64))),
    "index_too_big": ("adapter_index", dict(adapter_index=torch.tensor([0, 1, 3, 1, 0]))),
    "index_negative": ("adapter_index", dict(adapter_index=torch.tensor([0, -1, 2, 1, 0]))),
    "scales_int": ("scales", dict(scales=torch.ones(5, dtype=torch.int64))),
    "scales_shape": ("scales", dict(scales=torch.ones(6))),
    "scales_requires_grad": ("scales", dict(scales=torch.ones(5, requires_grad=True))),
    "activation_unknown": ("activations", dict(activations="swish")),
    "activations_count": ("activations", dict(activations=("silu", "relu"))),
    "activations_entry": ("activations", dict(activations=("silu", "relu", "swish"))),
    "activations_type": ("activations", dict(activations=3)),
    "backend": ("backend", dict(backend="cuda")),
    "path": ("path", dict(path="sorted")),
    "triton_fp64": (
        "backend",
        dict(
            backend="triton",
            **{
                k: v.double()
                for k, v in _valid_arguments().items()
                if isinstance(v, torch.Tensor) and v.is_floating_point()
            },
        ),
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_value_error_naming_the_argument(case):
    name, changes = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=name):
        multi_adapter_steer(**{**_valid_arguments(), **changes})
