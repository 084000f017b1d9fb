"""dtypes: adapters default to the model's dtype; hidden states in another dtype than the adapter
(torch.autocast, fp32 adapters in a bf16 model) run in the dtype the block returns."""

import copy

import pytest
import torch

from steer_fast import PostBlockAdapter, SteerConfig, get_steer_model
from steer_fast.injection.families import PRE_NORM, run_fused_block
from steer_fast.injection.steered_block import steer_hidden_states
from steer_fast.ops import reference_post_block_steer

from tiny_models import (
    add_reference_steering,
    capture_layer_calls,
    decoder_layers,
    random_input_ids,
    randomize_adapters,
    tiny_causal_lm,
)

INPUT_IDS = random_input_ids(2, 7)


def config(**overrides):
    return SteerConfig(**{"rank": 4, "backend": "torch", **overrides})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_adapters_default_to_the_model_dtype(dtype):
    model = get_steer_model(tiny_causal_lm("llama", dtype=dtype), config())
    assert {p.dtype for a in model.get_adapters().values() for p in a.parameters()} == {dtype}
    with torch.no_grad():
        assert model(input_ids=INPUT_IDS).logits.dtype == dtype


def test_mixed_dtypes_run_in_the_promoted_dtype_of_hidden_and_residual():
    adapter = PostBlockAdapter(16, 4, activation="tanh", dtype=torch.float32)
    with torch.no_grad():
        adapter.up.weight.normal_()
    hidden = torch.randn(2, 3, 16).to(torch.bfloat16)
    residual = torch.randn(2, 3, 16)
    out = steer_hidden_states(adapter, hidden, residual)
    assert out.dtype == torch.float32
    expected = reference_post_block_steer(
        hidden.float(),
        adapter.down.weight,
        adapter.up.weight,
        adapter.down.bias,
        adapter.up.bias,
        activation="tanh",
        residual=residual,
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # No residual: the hidden states' dtype wins; the weight cast is differentiable.
    out = steer_hidden_states(adapter, hidden)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert adapter.up.weight.grad.dtype == torch.float32


def test_fused_block_under_autocast_matches_the_layer():
    """Under autocast the residual stream is fp32 while the MLP branch is bf16: the block
    returns what the layer returns (fp32) and agrees with it."""
    model = tiny_causal_lm("llama")
    args, kwargs = capture_layer_calls(model, "llama", INPUT_IDS)[0]
    layer = decoder_layers(model, "llama")[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(*args, **kwargs)
        branch, residual = run_fused_block(layer, PRE_NORM, args[0], kwargs)
        assert (branch.dtype, residual.dtype) == (torch.bfloat16, torch.float32)
    get_steer_model(model, config())
    block = decoder_layers(model, "llama")[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(*args, **kwargs)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "olmo2"])
def test_steered_model_trains_under_autocast(family):
    base = tiny_causal_lm(family)
    reference = copy.deepcopy(base)
    model = get_steer_model(base, config(activation="gelu"))
    randomize_adapters(model.get_adapters())
    add_reference_steering(reference, family, copy.deepcopy(model.get_adapters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(input_ids=INPUT_IDS, labels=INPUT_IDS)
        expected = reference(INPUT_IDS).logits
    assert output.logits.dtype == expected.dtype
    torch.testing.assert_close(output.logits.float(), expected.float(), rtol=2e-2, atol=2e-2)
    output.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().max() > 0 for g in grads)


def test_fp32_adapters_in_a_bf16_model():
    model = get_steer_model(
        tiny_causal_lm("qwen3", dtype=torch.bfloat16), config(dtype=torch.float32)
    )
    randomize_adapters(model.get_adapters())
    adapters = model.get_adapters()
    assert adapters[0].up.weight.dtype == torch.float32
    output = model(input_ids=INPUT_IDS, labels=INPUT_IDS)
    assert output.logits.dtype == torch.bfloat16
    output.loss.backward()
    assert adapters[0].up.weight.grad.dtype == torch.float32

    same_in_bf16 = get_steer_model(
        tiny_causal_lm("qwen3", dtype=torch.bfloat16), config(dtype=torch.bfloat16)
    )
    with torch.no_grad():
        for index, adapter in same_in_bf16.get_adapters().items():
            theirs = adapters[index].parameters()
            for mine, value in zip(adapter.parameters(), theirs, strict=True):
                mine.copy_(value)
        torch.testing.assert_close(
            same_in_bf16(input_ids=INPUT_IDS).logits, output.logits.detach(), rtol=0, atol=0
        )


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.complex64, "int32"])
def test_unsupported_adapter_dtypes_are_value_errors(dtype):
    with pytest.raises(ValueError, match="dtype"):
        SteerConfig(dtype=dtype)
