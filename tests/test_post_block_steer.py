"""post_block_steer on both backends against the fp64 eager reference: forward and every gradient.

On a machine without a GPU, backend="triton" runs the real Triton kernels under the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1); with a GPU they run compiled on CUDA tensors.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import steer_fast
from steer_fast import ACTIVATIONS, post_block_steer
from steer_fast.kernels import post_block_steer as kernels
from steer_fast.ops import activation_id, post_block_steer_torch

from op_helpers import (
    TOLERANCES,
    assert_close,
    assert_matches_reference,
    make_inputs,
    run_op,
    run_reference,
)

BACKENDS = ["triton", "torch"]


def check_against_reference(inputs, activation, scale, backend, rel, grad_out=None):
    out_shape = inputs.hidden.shape
    if grad_out is None:
        grad_out = torch.randn(out_shape, dtype=torch.float64).to(inputs.hidden)
    out, grads = run_op(
        post_block_steer, inputs, grad_out, activation=activation, scale=scale, backend=backend
    )
    assert out.dtype == inputs.hidden.dtype and out.shape == out_shape
    for tensor, grad in zip(inputs.tensors(), grads):
        if tensor is not None:
            assert grad is not None and grad.dtype == tensor.dtype
    ref_out, ref_grads = run_reference(inputs, grad_out, activation, scale)
    assert_matches_reference(out, grads, ref_out, ref_grads, rel)


@pytest.mark.parametrize("rank", [1, 3, 8, 16, 64])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_activation_and_rank(backend, activation, rank, device):
    # 37 tokens: odd, and more than one 32-row block; d = 40: not a power of two.
    inputs = make_inputs((37, 40), rank, device=device)
    check_against_reference(inputs, activation, -0.7, backend, TOLERANCES[torch.float32])


@pytest.mark.parametrize("scale", [1.0, -1.5])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize(
    "down_bias, up_bias", [(True, True), (False, False), (True, False), (False, True)]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_biases_residual_scale(backend, down_bias, up_bias, residual, scale, device):
    inputs = make_inputs(
        (2, 9, 24), 8, down_bias=down_bias, up_bias=up_bias, residual=residual, device=device
    )
    check_against_reference(inputs, "silu", scale, backend, TOLERANCES[torch.float32])


@pytest.mark.parametrize(
    "shape",
    [
        (1, 40),  # one token
        (33, 200),  # one token past a 32-row block
        (70, 1000),  # d past the single-pass limit: two passes over column chunks
        (3, 1, 24),  # 3-D with a length-1 sequence
        (4, 50, 24),  # 200 tokens over several row blocks
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_counts_and_sizes(backend, shape, device):
    inputs = make_inputs(shape, 8, device=device)
    check_against_reference(inputs, "gelu_tanh", 0.5, backend, TOLERANCES[torch.float32])


@pytest.mark.parametrize("rank", [100, 256])
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_ranks(backend, rank, device):
    inputs = make_inputs((20, 40), rank, device=device)
    check_against_reference(inputs, "tanh", 0.8, backend, TOLERANCES[torch.float32])


@pytest.mark.parametrize("activation", ["identity", "silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision(backend, dtype, activation, device):
    inputs = make_inputs((37, 200), 16, dtype=dtype, device=device)
    check_against_reference(inputs, activation, -0.7, backend, TOLERANCES[dtype])


def _strided_case(layout: str, device):
    """(inputs, description): hidden / residual / weights in non-contiguous layouts."""
    base = make_inputs((3, 7, 40), 8, device=device)
    if layout == "3d_transposed":
        # [T, B, d] storage seen as [B, T, d]: rows are not mergeable into one stride.
        hidden = base.hidden.detach().transpose(0, 1).contiguous().transpose(0, 1)
        residual = base.residual.detach().transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "row_padding":
        # 2-D rows with a stride larger than d (a slice of a wider buffer).
        wide = torch.randn(21, 64, device=device)
        wide[:, :40] = base.hidden.detach().reshape(21, 40)
        hidden = wide[:, :40]
        residual = base.residual.detach().reshape(21, 40)
    elif layout == "column_stride":
        # Elements of a row two apart.
        hidden = torch.zeros(3, 7, 80, device=device)[..., ::2]
        hidden.copy_(base.hidden.detach())
        residual = base.residual.detach()
    elif layout == "weights_transposed":
        hidden, residual = base.hidden.detach(), base.residual.detach()
        base.down_weight = base.down_weight.detach().T.contiguous().T.requires_grad_()
        base.up_weight = base.up_weight.detach().T.contiguous().T.requires_grad_()
    else:
        raise AssertionError(layout)
    base.hidden = hidden.requires_grad_()
    base.residual = residual.requires_grad_()
    return base


@pytest.mark.parametrize(
    "layout", ["3d_transposed", "row_padding", "column_stride", "weights_transposed"]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_layouts(backend, layout, device):
    inputs = _strided_case(layout, device)
    assert not inputs.hidden.is_contiguous() or layout == "weights_transposed"
    check_against_reference(inputs, "relu", 1.3, backend, TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_grad_out(backend, device):
    # loss = out.sum() gives the backward a stride-0 (expanded) gradient.
    inputs = make_inputs((2, 5, 24), 3, device=device)
    grad_out = torch.ones(()).to(inputs.hidden).expand(2, 5, 24)
    assert grad_out.stride() == (0, 0, 0)
    check_against_reference(inputs, "gelu", 0.9, backend, TOLERANCES[torch.float32], grad_out)


@pytest.mark.parametrize(
    "forward_config, backward_config",
    [
        # Two passes over three column chunks (the last one partial), several row blocks;
        # the backward over three token splits (uneven) and two partial column tiles.
        (kernels.ForwardConfig(16, 16), kernels.BackwardConfig(16, 16, 16, 32, splits=3)),
        (kernels.ForwardConfig(64, 32), kernels.BackwardConfig(64, 64, 32, 16, splits=2)),
    ],
)
def test_explicit_kernel_configs(forward_config, backward_config, device):
    """The launchers with forced block shapes, against the reference."""
    inputs = make_inputs((45, 40), 5, device=device)
    grad_out = torch.randn(45, 40).to(inputs.hidden)
    activation, scale = "silu", -0.6
    detached = [None if t is None else t.detach() for t in inputs.tensors()]
    hidden, down, up, down_bias, up_bias, residual = detached
    phi = activation_id(activation)
    forward = kernels.post_block_steer_forward(
        hidden, down, up, down_bias, up_bias, residual, phi, scale, config=forward_config
    )
    backward = kernels.post_block_steer_backward(
        grad_out,
        forward.out,
        forward.z,
        down,
        up,
        up_bias,
        phi,
        scale,
        config=backward_config,
    )
    ref_out, ref_grads = run_reference(inputs, grad_out, activation, scale)
    rel = TOLERANCES[torch.float32]
    assert_close("out", forward.out, ref_out, rel)
    z_ref = (residual + hidden).double() @ down.double().T + down_bias.double()
    assert_close("z", forward.z, z_ref, rel)
    for name, got, want in [
        ("hidden", backward.grad_hidden, ref_grads[0]),
        ("down_weight", backward.grad_down_weight, ref_grads[1]),
        ("up_weight", backward.grad_up_weight, ref_grads[2]),
        ("down_bias", backward.grad_down_bias, ref_grads[3]),
        ("up_bias", backward.grad_up_bias, ref_grads[4]),
    ]:
        assert_close(f"grad {name}", got, want, rel)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend, device):
    inputs = make_inputs((0, 24), 4, device=device)
    out = post_block_steer(
        inputs.hidden,
        inputs.down_weight,
        inputs.up_weight,
        inputs.down_bias,
        inputs.up_bias,
        residual=inputs.residual,
        backend=backend,
    )
    assert out.shape == (0, 24)
    out.sum().backward()
    assert torch.count_nonzero(inputs.down_weight.grad) == 0
    assert torch.count_nonzero(inputs.up_bias.grad) == 0


def test_triton_backward_is_deterministic(device):
    """The weight gradients are reduced in a fixed order: two runs agree bit for bit."""
    inputs = make_inputs((300, 40), 8, device=device)
    grad_out = torch.randn(300, 40).to(inputs.hidden)
    first = run_op(post_block_steer, inputs, grad_out, activation="silu", backend="triton")[1]
    second = run_op(
        post_block_steer,
        inputs.converted(inputs.hidden.dtype),
        grad_out,
        activation="silu",
        backend="triton",
    )[1]
    for a, b in zip(first, second):
        if a is not None:
            assert torch.equal(a, b)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_torch_path(activation):
    inputs = make_inputs((2, 3, 6), 2, dtype=torch.float64)

    def fn(hidden, down, up, down_bias, up_bias, residual):
        return post_block_steer(
            hidden,
            down,
            up,
            down_bias,
            up_bias,
            activation=activation,
            scale=-0.8,
            residual=residual,
            backend="torch",
        )

    assert torch.autograd.gradcheck(fn, tuple(inputs.tensors()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_adapter_is_identity(backend, device):
    adapter = steer_fast.PostBlockAdapter(40, 8, activation="gelu", backend=backend).to(device)
    hidden = torch.randn(2, 5, 40, device=device, requires_grad=True)
    residual = torch.randn(2, 5, 40, device=device)
    out = adapter(hidden)
    assert torch.equal(out, hidden.detach())
    assert torch.equal(adapter(hidden, residual), hidden.detach() + residual)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert torch.equal(hidden.grad, grad_out)


def test_adapter_parameters_and_validation():
    adapter = steer_fast.PostBlockAdapter(40, 8)  # the published form: no biases, SiLU
    assert adapter.activation == "silu" and adapter.up.bias is None
    assert sum(p.numel() for p in adapter.parameters()) == 2 * 8 * 40
    assert torch.count_nonzero(adapter.down.weight) > 0
    with_bias = steer_fast.PostBlockAdapter(40, 8, bias=True)
    assert sum(p.numel() for p in with_bias.parameters()) == 8 * (2 * 40 + 1) + 40
    with pytest.raises(ValueError, match="init"):
        steer_fast.PostBlockAdapter(40, 4, init="xavier")
    with pytest.raises(ValueError, match="rank"):
        steer_fast.PostBlockAdapter(40, 0)
    with pytest.raises(ValueError, match="hidden_size"):
        steer_fast.PostBlockAdapter(-1, 4)
    with pytest.raises(ValueError, match="activation"):
        steer_fast.PostBlockAdapter(40, 4, activation="swish")
    with pytest.raises(ValueError, match="scale"):
        steer_fast.PostBlockAdapter(40, 4, scale=float("nan"))
    with pytest.raises(ValueError, match="backend"):
        steer_fast.PostBlockAdapter(40, 4, backend="cuda")


def test_default_init_is_the_published_one():
    """down: Kaiming-uniform (a = sqrt 5) times 1e-3, bound 1e-3 / sqrt(d); up: zero. "lora"
    leaves the Kaiming-uniform unscaled."""
    torch.manual_seed(0)
    hidden_size = 512
    bound = 1.0 / math.sqrt(hidden_size)  # kaiming_uniform_ with a = sqrt(5)
    published = steer_fast.PostBlockAdapter(hidden_size, 64).down.weight.detach()
    assert published.abs().max() <= 1e-3 * bound
    # Uniform on [-b, b]: mean |w| = b / 2, so the scale is 1e-3 and not another power of ten.
    assert published.abs().mean() == pytest.approx(1e-3 * bound / 2, rel=0.02)
    lora = steer_fast.PostBlockAdapter(hidden_size, 64, init="lora").down.weight.detach()
    assert lora.abs().max() <= bound and lora.abs().mean() == pytest.approx(bound / 2, rel=0.02)
    assert torch.count_nonzero(steer_fast.PostBlockAdapter(hidden_size, 64).up.weight) == 0


def test_backward_keeps_no_extra_token_by_hidden_tensor(device):
    """Autograd saves out (which the next layer keeps anyway) and z [N, r]: never h or a copy."""
    inputs = make_inputs((16, 40), 4, device=device)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = post_block_steer(
            inputs.hidden,
            inputs.down_weight,
            inputs.up_weight,
            inputs.down_bias,
            inputs.up_bias,
            residual=inputs.residual,
            backend="triton",
        )
    big = [t for t in saved if t.numel() >= inputs.hidden.numel()]
    assert len(big) == 1 and big[0].data_ptr() == out.data_ptr()
    small = [t for t in saved if t.shape == (16, 4)]
    assert len(small) == 1 and small[0].dtype == torch.float32


def test_one_tensor_order_from_the_op_to_the_kernels():
    """The registered ops, both backends and the kernel launchers take the op's tensor order."""
    forward = ["hidden", "down_weight", "up_weight", "down_bias", "up_bias", "residual"]
    backward = ["grad_out", "out", "z", "down_weight", "up_weight", "up_bias"]
    scalars = ["activation", "scale"]

    def names(schema):
        return [argument.name for argument in schema.arguments]

    assert list(inspect.signature(post_block_steer).parameters)[:5] == forward[:5]
    assert names(torch.ops.steer_fast.post_block_steer_forward.default._schema) == [
        *forward,
        *scalars,
        "backend",
    ]
    assert names(torch.ops.steer_fast.post_block_steer_backward.default._schema) == [
        *backward,
        *scalars,
        "backend",
    ]
    for function, order in [
        (post_block_steer_torch.forward, forward),
        (kernels.plan_forward, forward),
        (kernels.post_block_steer_forward, forward),
        (post_block_steer_torch.backward, backward),
        (kernels.plan_backward, backward),
        (kernels.post_block_steer_backward, backward),
    ]:
        assert list(inspect.signature(function).parameters)[:8] == [*order, *scalars], function


def test_compile_fullgraph_torch_backend():
    """torch.compile traces the registered ops, forward and backward, without a graph break."""
    inputs = make_inputs((2, 5, 24), 4)
    grad_out = torch.randn(2, 5, 24)

    def fn(hidden, down, up, down_bias, up_bias, residual=None):
        return post_block_steer(
            hidden,
            down,
            up,
            down_bias,
            up_bias,
            activation="silu",
            scale=0.5,
            residual=residual,
            backend="torch",
        )

    explanation = torch._dynamo.explain(fn)(*[t.detach() for t in inputs.tensors()])
    assert explanation.graph_break_count == 0
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_out, eager_grads = run_op(fn, inputs, grad_out)
    compiled_out, compiled_grads = run_op(compiled, inputs.converted(torch.float32), grad_out)
    torch.testing.assert_close(compiled_out, eager_out)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_calls_match_autograd_calls(backend, device):
    """Without autograd the op skips the registered op's dispatch; results are identical."""
    inputs = make_inputs((2, 7, 40), 8, device=device)
    arguments = dict(activation="gelu", scale=0.3, residual=inputs.residual, backend=backend)
    tensors = [
        inputs.hidden,
        inputs.down_weight,
        inputs.up_weight,
        inputs.down_bias,
        inputs.up_bias,
    ]
    with_graph = post_block_steer(*tensors, **arguments)
    assert with_graph.grad_fn is not None
    with torch.no_grad():
        without_graph = post_block_steer(*tensors, **arguments)
    assert without_graph.grad_fn is None
    assert torch.equal(with_graph.detach(), without_graph)
