"""steering_vector on both backends against the fp64 eager reference: forward and both gradients.

    out = h + s b,  h = residual + hidden;   d hidden = d residual = g,  d b = s sum_rows(g)

On a machine without a GPU, backend="triton" runs the real Triton kernels under the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1); with a GPU they run compiled on CUDA tensors.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import pytest
import torch

import steer_fast
from steer_fast import steering_vector
from steer_fast.kernels import launch as kernel_launch
from steer_fast.kernels import steering_vector as kernels
from steer_fast.ops import reference_steering_vector, steering_vector_torch

from op_helpers import TOLERANCES, assert_close

BACKENDS = ["triton", "torch"]
FORWARD_KERNEL = "_steering_vector_forward_kernel"
BACKWARD_KERNEL = "_steering_vector_backward_kernel"
REDUCE_KERNEL = "_steering_vector_reduce_kernel"


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


@dataclass
class VectorInputs:
    hidden: torch.Tensor
    bias: torch.Tensor
    residual: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.hidden, self.bias, self.residual]

    def converted(self, dtype: torch.dtype) -> VectorInputs:
        """Detached leaf copies in ``dtype`` (same values) that require grad."""

        def leaf(t):
            return None if t is None else t.detach().to(dtype).requires_grad_()

        return VectorInputs(*[leaf(t) for t in self.tensors()])


def make_inputs(
    shape: tuple[int, ...],
    *,
    residual: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> VectorInputs:
    """O(1) random hidden, bias and residual, rounded to ``dtype``, as leaves requiring grad."""

    def randn(*size):
        return torch.randn(*size, dtype=torch.float64).to(device=device, dtype=dtype)

    return VectorInputs(
        hidden=randn(*shape), bias=randn(shape[-1]), residual=randn(*shape) if residual else None
    ).converted(dtype)


def run(fn, inputs: VectorInputs, grad_out: torch.Tensor, scale: float, **kwargs):
    """Forward ``fn`` on ``inputs``, backward with ``grad_out``; (out, [grads or None])."""
    out = fn(inputs.hidden, inputs.bias, scale=scale, residual=inputs.residual, **kwargs)
    out.backward(grad_out)
    return out, [None if t is None else t.grad for t in inputs.tensors()]


def run_reference(inputs: VectorInputs, grad_out: torch.Tensor, scale: float):
    """The fp64 eager reference on the same (possibly low-precision) input values."""
    return run(reference_steering_vector, inputs.converted(torch.float64), grad_out.double(), scale)


def check_against_reference(inputs, scale, backend, rel, grad_out=None):
    shape = inputs.hidden.shape
    if grad_out is None:
        grad_out = torch.randn(shape, dtype=torch.float64).to(inputs.hidden)
    out, grads = run(steering_vector, inputs, grad_out, scale, backend=backend)
    assert out.dtype == inputs.hidden.dtype and out.shape == shape and out.is_contiguous()
    ref_out, ref_grads = run_reference(inputs, grad_out, scale)
    assert_close("out", out, ref_out, rel)
    for name, tensor, got, want in zip(
        ["hidden", "bias", "residual"], inputs.tensors(), grads, ref_grads
    ):
        if tensor is None or not tensor.requires_grad:
            assert got is None, f"{name}: unexpected gradient"
            continue
        assert got is not None and got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert_close(f"grad {name}", got, want, rel)
    return out, grads


@pytest.fixture
def launches(monkeypatch):
    """The names of the Triton kernels launched (every launcher runs ``KernelLaunch``es)."""
    names: list[str] = []
    original = kernel_launch.KernelLaunch.__call__

    def counted(launch):
        names.append(launch.kernel.__name__)
        return original(launch)

    monkeypatch.setattr(kernel_launch.KernelLaunch, "__call__", counted)
    return names


# ----------------------------------------------------------------------------------------------
# Against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden_size", [1, 24, 200, 1000])
@pytest.mark.parametrize("tokens", [1, 33, 200])
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_counts_and_sizes(backend, tokens, hidden_size, device):
    # d = 1000 spans two forward column tiles and four backward ones (the last partial); 200
    # tokens take two token splits in the backward, 1 and 33 tokens one.
    inputs = make_inputs((tokens, hidden_size), device=device)
    check_against_reference(inputs, -0.7, backend, TOLERANCES[torch.float32])


@pytest.mark.parametrize("shape", [(33, 1000), (2, 100, 24)])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes(backend, dtype, residual, shape, device):
    inputs = make_inputs(shape, residual=residual, dtype=dtype, device=device)
    check_against_reference(inputs, 1.3, backend, TOLERANCES[dtype])


@pytest.mark.parametrize("scale", [1.0, -1.5, 0.0])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scales(backend, residual, scale, device):
    inputs = make_inputs((3, 11, 40), residual=residual, device=device)
    out, grads = check_against_reference(inputs, scale, backend, TOLERANCES[torch.float32])
    if scale == 0.0:
        h = inputs.hidden if inputs.residual is None else inputs.residual + inputs.hidden
        assert torch.equal(out, h.detach())
        assert torch.count_nonzero(grads[1]) == 0


def _strided_case(layout: str, device) -> VectorInputs:
    """Inputs in non-contiguous layouts (values from make_inputs)."""
    base = make_inputs((3, 7, 40), device=device)
    hidden, bias, residual = (t.detach() for t in base.tensors())
    if layout == "3d_transposed":
        # [T, B, d] storage seen as [B, T, d]: rows are not mergeable into one stride.
        hidden = hidden.transpose(0, 1).contiguous().transpose(0, 1)
        residual = residual.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "row_padding":
        # 2-D rows with a stride larger than d (a slice of a wider buffer); residual contiguous.
        wide = torch.randn(21, 64, device=device)
        wide[:, :40] = hidden.reshape(21, 40)
        hidden, residual = wide[:, :40], residual.reshape(21, 40)
    elif layout == "column_stride":
        # Elements of a row two apart, in hidden and residual.
        hidden = torch.zeros(3, 7, 80, device=device)[..., ::2].copy_(hidden)
        residual = torch.zeros(3, 7, 80, device=device)[..., 1::2].copy_(residual)
    elif layout == "strided_bias":
        bias = torch.zeros(40, 3, device=device)[:, 1].copy_(bias)
    elif layout == "broadcast_residual":
        # One residual row seen by every token (strides 0, 0, 1).
        residual = residual[:1, :1].expand(3, 7, 40)
    else:
        raise AssertionError(layout)
    # An expanded residual is not a leaf that can take a gradient: it stays constant.
    if residual.stride(0) != 0:
        residual.requires_grad_()
    return VectorInputs(hidden.requires_grad_(), bias.requires_grad_(), residual)


@pytest.mark.parametrize(
    "layout",
    ["3d_transposed", "row_padding", "column_stride", "strided_bias", "broadcast_residual"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_layouts(backend, layout, device):
    inputs = _strided_case(layout, device)
    non_contiguous = [t for t in inputs.tensors() if not t.is_contiguous()]
    assert non_contiguous, layout
    check_against_reference(inputs, -0.9, backend, TOLERANCES[torch.float32])


@pytest.mark.parametrize("shape", [(60, 24), (2, 30, 24)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_grad_out(backend, shape, device):
    # loss = out.sum() gives the backward a stride-0 (expanded) gradient.
    inputs = make_inputs(shape, device=device)
    grad_out = torch.ones(()).to(inputs.hidden).expand(shape)
    assert set(grad_out.stride()) == {0}
    check_against_reference(inputs, 0.6, backend, TOLERANCES[torch.float32], grad_out)


@pytest.mark.parametrize(
    "forward_config, backward_config",
    [
        # Three column tiles (the last partial) and several row blocks forward; backward over
        # three uneven token splits and two column tiles (the second partial).
        (kernels.ForwardConfig(16, 16), kernels.BackwardConfig(16, 32, splits=3)),
        # One split covering several row blocks: the single-launch (FINAL) backward.
        (kernels.ForwardConfig(64, 64), kernels.BackwardConfig(8, 64, splits=1)),
        # More splits asked for than row blocks: clamped to one split per row block.
        (kernels.ForwardConfig(8, 32), kernels.BackwardConfig(32, 16, splits=50)),
    ],
)
def test_explicit_kernel_configs(forward_config, backward_config, device):
    """The launchers with forced tile shapes and split counts, against the reference."""
    inputs = make_inputs((3, 15, 40), device=device)
    hidden, bias, residual = (t.detach() for t in inputs.tensors())
    grad_out = torch.randn(3, 15, 40).to(hidden)
    scale = -0.6
    out = kernels.steering_vector_forward(hidden, bias, residual, scale, config=forward_config)
    plan = kernels.plan_backward(grad_out, scale, config=backward_config)
    for launch in plan.launches:
        launch()
    ref_out, ref_grads = run_reference(inputs, grad_out, scale)
    rel = TOLERANCES[torch.float32]
    assert_close("out", out, ref_out, rel)
    assert_close("grad bias", plan.result.grad_bias, ref_grads[1], rel)
    n_launches = 1 if backward_config.splits == 1 else 2
    assert len(plan.launches) == n_launches


@pytest.mark.parametrize("shape", [(0, 24), (2, 0, 24)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend, shape, device, launches):
    inputs = make_inputs(shape, device=device)
    out = steering_vector(
        inputs.hidden, inputs.bias, scale=0.5, residual=inputs.residual, backend=backend
    )
    assert out.shape == shape and out.dtype == inputs.hidden.dtype
    out.sum().backward()
    assert inputs.bias.grad.shape == (24,)
    assert torch.count_nonzero(inputs.bias.grad) == 0
    assert inputs.hidden.grad.shape == shape
    assert launches == []


# ----------------------------------------------------------------------------------------------
# Properties of the implementation
# ----------------------------------------------------------------------------------------------


def test_triton_backward_is_deterministic(device):
    """db sums token splits in a fixed order, with no atomics: two runs agree bit for bit."""
    inputs = make_inputs((2, 150, 200), device=device)
    grad_out = torch.randn(2, 150, 200).to(inputs.hidden)
    assert len(kernels.plan_backward(grad_out, 0.5).launches) == 2  # several token splits
    first = run(steering_vector, inputs, grad_out, 0.5, backend="triton")[1][1]
    second = run(steering_vector, inputs.converted(torch.float32), grad_out, 0.5, backend="triton")[
        1
    ][1]
    assert torch.equal(first, second)


@pytest.mark.skipif(
    not kernel_launch.interpreted(), reason="bit equality holds without FMA contraction"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backends_agree_bit_for_bit(dtype):
    """Both paths round h, form h + s b in fp32 and round once: identical outputs.

    Under the interpreter (numpy, no fused multiply-add) in fp32 and fp16. bf16 is left out: the
    interpreter's fp32 -> bf16 cast may round differently from torch's by one ulp.
    """
    inputs = make_inputs((2, 33, 200), dtype=dtype)
    hidden, bias, residual = (t.detach() for t in inputs.tensors())
    triton_out = steering_vector(hidden, bias, scale=-0.7, residual=residual, backend="triton")
    torch_out = steering_vector(hidden, bias, scale=-0.7, residual=residual, backend="torch")
    assert torch.equal(triton_out, torch_out)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_saves_nothing(backend, residual, device):
    """Neither gradient needs a forward tensor: autograd keeps no tensor for the op."""
    inputs = make_inputs((16, 40), residual=residual, device=device)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = steering_vector(
            inputs.hidden, inputs.bias, scale=0.5, residual=inputs.residual, backend=backend
        )
    assert saved == []
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    # The gradient of hidden and of residual is grad_out's values, with no kernel in between.
    assert torch.equal(inputs.hidden.grad, grad_out)
    if residual:
        assert torch.equal(inputs.residual.grad, grad_out)


@pytest.mark.parametrize("residual", [True, False])
def test_gradcheck_torch_path(residual):
    inputs = make_inputs((2, 3, 6), residual=residual, dtype=torch.float64)

    def fn(hidden, bias, residual=None):
        return steering_vector(hidden, bias, scale=-0.8, residual=residual, backend="torch")

    tensors = tuple(t for t in inputs.tensors() if t is not None)
    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend, device):
    """torch.compile traces the registered ops, forward and backward, without a graph break."""
    inputs = make_inputs((2, 5, 24), device=device)
    grad_out = torch.randn(2, 5, 24).to(inputs.hidden)

    def fn(hidden, bias, scale, residual=None):
        return steering_vector(hidden, bias, scale=scale, residual=residual, backend=backend)

    detached = [t.detach() for t in inputs.tensors()]
    explanation = torch._dynamo.explain(fn)(detached[0], detached[1], 0.5, detached[2])
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_out, eager_grads = run(fn, inputs, grad_out, 0.5)
    compiled_out, compiled_grads = run(compiled, inputs.converted(torch.float32), grad_out, 0.5)
    assert torch.equal(compiled_out, eager_out)
    for a, b in zip(compiled_grads, eager_grads):
        assert torch.equal(a, b)


def test_kernel_launches(launches, device):
    """One forward launch; one backward launch for one token split, two for several; none for a
    frozen bias (the gradients of hidden and residual need no kernel)."""
    inputs = make_inputs((33, 40), device=device)
    out = steering_vector(inputs.hidden, inputs.bias, residual=inputs.residual, backend="triton")
    assert launches == [FORWARD_KERNEL]
    out.backward(torch.randn_like(out))
    assert launches == [FORWARD_KERNEL, BACKWARD_KERNEL]

    launches.clear()
    inputs = make_inputs((300, 40), device=device)
    out = steering_vector(inputs.hidden, inputs.bias, scale=2.0, backend="triton")
    out.backward(torch.randn_like(out))
    assert launches == [FORWARD_KERNEL, BACKWARD_KERNEL, REDUCE_KERNEL]

    launches.clear()
    hidden = torch.randn(33, 40, device=device, requires_grad=True)
    frozen = torch.randn(40, device=device)
    out = steering_vector(hidden, frozen, scale=2.0, backend="triton")
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert launches == [FORWARD_KERNEL]
    assert torch.equal(hidden.grad, grad_out)

    launches.clear()
    steering_vector(hidden, frozen, backend="torch").sum().backward()
    assert launches == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_calls_match_autograd_calls(backend, device):
    """Without autograd the op skips the registered op's dispatch; results are identical."""
    inputs = make_inputs((2, 7, 40), device=device)
    arguments = dict(scale=0.3, residual=inputs.residual, backend=backend)
    with_graph = steering_vector(inputs.hidden, inputs.bias, **arguments)
    assert with_graph.grad_fn is not None
    with torch.no_grad():
        without_graph = steering_vector(inputs.hidden, inputs.bias, **arguments)
    assert without_graph.grad_fn is None
    assert torch.equal(with_graph.detach(), without_graph)


def test_auto_backend(launches, device):
    """ "auto" runs the kernels on CUDA tensors and the torch path on CPU tensors."""
    inputs = make_inputs((4, 24), device=device)
    out = steering_vector(inputs.hidden, inputs.bias, residual=inputs.residual)
    assert launches == ([FORWARD_KERNEL] if device.type == "cuda" else [])
    ref = reference_steering_vector(inputs.hidden, inputs.bias, residual=inputs.residual)
    assert_close("out", out, ref, TOLERANCES[torch.float32])


def test_one_tensor_order_from_the_op_to_the_kernels():
    """The public op, the registered ops, the torch path and the launchers take one order."""

    def names(schema):
        return [argument.name for argument in schema.arguments]

    assert list(inspect.signature(steering_vector).parameters) == [
        "hidden",
        "bias",
        "scale",
        "residual",
        "backend",
    ]
    forward = ["hidden", "bias", "residual", "scale"]
    assert names(torch.ops.steer_fast.steering_vector_forward.default._schema) == [
        *forward,
        "backend",
    ]
    assert names(torch.ops.steer_fast.steering_vector_backward.default._schema) == [
        "grad_out",
        "scale",
        "backend",
    ]
    for function in [
        steering_vector_torch.forward,
        kernels.plan_forward,
        kernels.steering_vector_forward,
    ]:
        assert list(inspect.signature(function).parameters)[:4] == forward, function
    for function in [
        steering_vector_torch.backward,
        kernels.plan_backward,
        kernels.steering_vector_backward,
    ]:
        assert list(inspect.signature(function).parameters)[:2] == ["grad_out", "scale"]
    assert "steering_vector" in steer_fast.__all__


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _bad_call(case: str) -> tuple[dict, str]:
    """(keyword arguments of one invalid call, the argument its ValueError must name)."""
    hidden, bias, residual = torch.randn(5, 8), torch.randn(8), torch.randn(5, 8)
    good = dict(hidden=hidden, bias=bias, residual=residual, scale=0.5, backend="triton")
    bad = {
        "hidden_not_tensor": (dict(hidden=[[1.0] * 8] * 5), "hidden"),
        "hidden_1d": (dict(hidden=torch.randn(8)), "hidden"),
        "hidden_4d": (dict(hidden=torch.randn(1, 1, 5, 8), residual=None), "hidden"),
        "hidden_int": (dict(hidden=torch.ones(5, 8, dtype=torch.int32)), "hidden"),
        "hidden_empty_rows": (dict(hidden=torch.randn(5, 0), bias=torch.randn(0)), "hidden"),
        "bias_2d": (dict(bias=torch.randn(1, 8)), "bias"),
        "bias_length": (dict(bias=torch.randn(9)), "bias"),
        "bias_dtype": (dict(bias=bias.half()), "bias"),
        "bias_device": (dict(bias=torch.empty(8, device="meta")), "bias"),
        "bias_missing": (dict(bias=None), "bias"),
        "residual_shape": (dict(residual=torch.randn(1, 5, 8)), "residual"),
        "residual_dtype": (dict(residual=residual.double()), "residual"),
        "scale_nan": (dict(scale=math.nan), "scale"),
        "scale_inf": (dict(scale=-math.inf), "scale"),
        "scale_string": (dict(scale="0.5"), "scale"),
        "scale_bool": (dict(scale=True), "scale"),
        "backend_unknown": (dict(backend="cuda"), "backend"),
        "backend_triton_fp64": (
            dict(hidden=hidden.double(), bias=bias.double(), residual=None),
            "hidden",
        ),
    }[case]
    return {**good, **bad[0]}, bad[1]


@pytest.mark.parametrize(
    "case",
    [
        "hidden_not_tensor",
        "hidden_1d",
        "hidden_4d",
        "hidden_int",
        "hidden_empty_rows",
        "bias_2d",
        "bias_length",
        "bias_dtype",
        "bias_device",
        "bias_missing",
        "residual_shape",
        "residual_dtype",
        "scale_nan",
        "scale_inf",
        "scale_string",
        "scale_bool",
        "backend_unknown",
        "backend_triton_fp64",
    ],
)
def test_bad_input_raises_before_any_launch(case, launches):
    kwargs, name = _bad_call(case)
    hidden, bias = kwargs.pop("hidden"), kwargs.pop("bias")
    with pytest.raises(ValueError, match=name):
        steering_vector(hidden, bias, **kwargs)
    assert launches == []


def test_fp64_runs_on_the_torch_path():
    inputs = make_inputs((4, 3, 10), dtype=torch.float64)
    check_against_reference(inputs, 0.25, "torch", 1e-12)
    hidden, bias = inputs.hidden.detach(), inputs.bias.detach()
    assert torch.equal(steering_vector(hidden, bias, scale=0.25), hidden + 0.25 * bias)
