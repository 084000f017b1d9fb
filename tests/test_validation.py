"""Bad input to post_block_steer raises ValueError naming the argument, before any kernel runs."""

from __future__ import annotations

import pytest
import torch

import steer_fast.ops.post_block_steer as op_module
from steer_fast import post_block_steer, resolve_backend

from op_helpers import make_inputs


def _arguments():
    inputs = make_inputs((5, 24), 4)
    return {
        "hidden": inputs.hidden.detach(),
        "down_weight": inputs.down_weight.detach(),
        "up_weight": inputs.up_weight.detach(),
        "down_bias": inputs.down_bias.detach(),
        "up_bias": inputs.up_bias.detach(),
        "residual": inputs.residual.detach(),
    }


BAD_INPUTS = [
    # (what to change, the words the error must contain)
    ("hidden-size mismatch", {"down_weight": torch.randn(4, 23)}, "down_weight"),
    ("rank mismatch", {"up_weight": torch.randn(24, 5)}, "up_weight"),
    ("up_weight transposed", {"up_weight": torch.randn(4, 24)}, "up_weight"),
    ("rank 0", {"down_weight": torch.randn(0, 24), "up_weight": torch.randn(24, 0)}, "rank"),
    ("down_bias shape", {"down_bias": torch.randn(5)}, "down_bias"),
    ("up_bias shape", {"up_bias": torch.randn(23)}, "up_bias"),
    ("up_bias 2-D", {"up_bias": torch.randn(1, 24)}, "up_bias"),
    ("residual shape", {"residual": torch.randn(5, 1, 24)}, "residual"),
    ("residual broadcast", {"residual": torch.randn(1, 24)}, "residual"),
    ("mixed dtypes", {"up_weight": torch.randn(24, 4, dtype=torch.float64)}, "dtype"),
    ("mixed residual dtype", {"residual": torch.randn(5, 24).half()}, "residual"),
    ("integer hidden", {"hidden": torch.ones(5, 24, dtype=torch.int32)}, "hidden"),
    ("integer weights", {"down_weight": torch.ones(4, 24, dtype=torch.int64)}, "down_weight"),
    ("1-D hidden", {"hidden": torch.randn(24)}, "hidden"),
    ("4-D hidden", {"hidden": torch.randn(1, 1, 5, 24)}, "hidden"),
    ("not a tensor", {"down_weight": [[0.0] * 24] * 4}, "down_weight"),
    ("unknown activation", {"activation": "swish"}, "activation"),
    ("activation not a string", {"activation": torch.relu}, "activation"),
    ("unknown backend", {"backend": "cuda"}, "backend"),
    ("scale not a number", {"scale": "1.0"}, "scale"),
    ("scale infinite", {"scale": float("inf")}, "scale"),
    ("scale a bool", {"scale": True}, "scale"),
    (
        "fp64 on triton",
        {"backend": "triton", **{k: v.double() for k, v in _arguments().items()}},
        "backend",
    ),
]


@pytest.mark.parametrize(
    "change, words", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_raises_before_any_launch(change, words, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the op ran on invalid input")

    monkeypatch.setattr(op_module, "_forward_op", must_not_run)
    monkeypatch.setattr(op_module, "_forward_impl", must_not_run)
    arguments = {**_arguments(), "activation": "silu", "scale": 1.0, "backend": "torch", **change}
    tensors = [
        arguments.pop(name)
        for name in ("hidden", "down_weight", "up_weight", "down_bias", "up_bias")
    ]
    with pytest.raises(ValueError, match=words):
        post_block_steer(*tensors, **arguments)


def test_auto_backend_on_cpu_is_torch():
    hidden = torch.randn(3, 8)
    assert resolve_backend(hidden, "auto") == "torch"
    assert resolve_backend(hidden.double(), "auto") == "torch"
    assert resolve_backend(hidden, "torch") == "torch"
    if not torch.cuda.is_available():
        # Under the interpreter (tests/conftest.py) the Triton kernels accept CPU tensors.
        assert resolve_backend(hidden, "triton") == "triton"


def test_the_guard_sees_both_entry_points(monkeypatch):
    """Valid input reaches the op through one of the two patched entry points."""
    calls = []
    monkeypatch.setattr(op_module, "_forward_impl", lambda *a: calls.append(a) or (a[0], a[0]))
    arguments = _arguments()
    tensors = [
        arguments.pop(name)
        for name in ("hidden", "down_weight", "up_weight", "down_bias", "up_bias")
    ]
    post_block_steer(*tensors, residual=arguments["residual"], backend="torch")
    assert len(calls) == 1
