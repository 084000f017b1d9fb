"""Every family: the path its layers take, exactness against the layer's own forward, and
agreement with the forward-hook reference (logits, hidden states, gradients), fp32."""

import copy

import pytest
import torch

from steer_fast import SteerConfig, get_steer_model
from steer_fast.injection import SteeredBlock

from tiny_models import (
    ALL_FAMILIES,
    EXPECTED_PATH,
    NUM_LAYERS,
    add_reference_steering,
    capture_layer_calls,
    decoder_layers,
    random_input_ids,
    randomize_adapters,
    tiny_causal_lm,
)

TOL = dict(rtol=1e-5, atol=1e-5)


def steer(model, **overrides):
    return get_steer_model(model, SteerConfig(**{"rank": 4, "backend": "torch", **overrides}))


def hidden_of(output):
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_paths_follow_the_family_table(family):
    fused = steer(tiny_causal_lm(family))
    assert fused.steering_paths() == {i: EXPECTED_PATH[family] for i in range(NUM_LAYERS)}
    report = fused.steering_report()
    assert report.count("\n") == NUM_LAYERS - 1 and EXPECTED_PATH[family] in report
    plain = steer(tiny_causal_lm(family), fuse_residual=False)
    assert plain.steering_paths() == {i: "plain" for i in range(NUM_LAYERS)}
    assert "fuse_residual=False" in plain.steering_report()


@pytest.mark.parametrize("fuse_residual", [True, False])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_zero_adapter_block_is_the_layer_exactly(family, fuse_residual):
    model = tiny_causal_lm(family)
    input_ids = random_input_ids(2, 9)
    calls = capture_layer_calls(model, family, input_ids)
    layers = decoder_layers(model, family)
    with torch.no_grad():
        expected = {i: hidden_of(layers[i](*args, **kwargs)) for i, (args, kwargs) in calls.items()}
    steer(model, fuse_residual=fuse_residual)
    with torch.no_grad():
        for i, (args, kwargs) in calls.items():
            assert isinstance(layers[i], SteeredBlock)
            assert torch.equal(hidden_of(layers[i](*args, **kwargs)), expected[i])


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_train_mode_dropout_matches_the_layer_under_the_same_seed(family):
    """With dropout everywhere, the fused block draws the same masks as the layer."""
    model = tiny_causal_lm(family, dropout=0.3).train()
    input_ids = random_input_ids(2, 9)
    calls = capture_layer_calls(model, family, input_ids)
    layer = decoder_layers(model, family)[1]
    args, kwargs = calls[1]
    with torch.no_grad():
        torch.manual_seed(7)
        expected = hidden_of(layer(*args, **kwargs))
        torch.manual_seed(8)
        other_seed = hidden_of(layer(*args, **kwargs))
    steer(model)
    block = decoder_layers(model, family)[1]
    with torch.no_grad():
        torch.manual_seed(7)
        assert torch.equal(hidden_of(block(*args, **kwargs)), expected)
    assert not torch.equal(expected, other_seed)  # dropout is live


@pytest.mark.parametrize("fuse_residual", [True, False])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_new_adapter_leaves_logits_equal_to_the_base_model(family, fuse_residual):
    model = tiny_causal_lm(family)
    input_ids = random_input_ids(2, 9)
    with torch.no_grad():
        expected = model(input_ids).logits
        steered = steer(model, fuse_residual=fuse_residual)
        assert torch.equal(steered(input_ids=input_ids).logits, expected)


@pytest.mark.parametrize("fuse_residual", [True, False])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_random_adapter_matches_the_forward_hook_reference(family, fuse_residual):
    base = tiny_causal_lm(family)
    reference = copy.deepcopy(base)
    input_ids = random_input_ids(2, 9)
    with torch.no_grad():
        base_output = base(input_ids, output_hidden_states=True)
    model = steer(base, fuse_residual=fuse_residual, activation="silu")
    randomize_adapters(model.get_adapters())
    reference_adapters = copy.deepcopy(model.get_adapters())
    add_reference_steering(reference, family, reference_adapters)

    output = model(input_ids=input_ids, labels=input_ids, output_hidden_states=True)
    expected = reference(input_ids, labels=input_ids, output_hidden_states=True)
    torch.testing.assert_close(output.logits, expected.logits, **TOL)
    assert (output.logits - base_output.logits).abs().max() > 1e-2  # the steering is visible
    # output_hidden_states sees the steered layer outputs.
    assert len(output.hidden_states) == len(expected.hidden_states) == NUM_LAYERS + 1
    for got, want in zip(output.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(output.hidden_states[1], base_output.hidden_states[1])

    output.loss.backward()
    expected.loss.backward()
    for index, adapter in model.get_adapters().items():
        for name, parameter in adapter.named_parameters():
            want = dict(reference_adapters[index].named_parameters())[name].grad
            torch.testing.assert_close(parameter.grad, want, **TOL)
            assert parameter.grad.abs().max() > 0
