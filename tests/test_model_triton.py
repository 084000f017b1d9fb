"""The Triton path at model level (compiled on CUDA, the interpreter on the CPU): a fused and a
plain family agree with the torch path, forward and backward, and generate the same tokens."""

import copy

import pytest
import torch

from steer_fast import SteerConfig, get_steer_model

from tiny_models import PAD_TOKEN_ID, random_input_ids, randomize_adapters, tiny_causal_lm


def pair(family, device, **overrides):
    base = tiny_causal_lm(family).to(device)
    twin = copy.deepcopy(base)
    settings = {"rank": 4, "activation": "gelu_tanh", **overrides}
    triton = get_steer_model(base, SteerConfig(backend="triton", **settings))
    torch_path = get_steer_model(twin, SteerConfig(backend="torch", **settings))
    randomize_adapters(triton.get_adapters(), seed=2)
    randomize_adapters(torch_path.get_adapters(), seed=2)
    return triton, torch_path


@pytest.mark.parametrize(
    "family, fuse_residual",
    [("llama", True), ("llama", False), ("gemma3_text", True), ("gpt2", True)],
)
def test_triton_path_agrees_with_the_torch_path(family, fuse_residual, device, kernel_launches):
    triton, torch_path = pair(family, device, fuse_residual=fuse_residual)
    path = "fused" if fuse_residual and family != "gpt2" else "plain"
    assert set(triton.steering_paths().values()) == {path}
    input_ids = random_input_ids(2, 8).to(device)
    got = triton(input_ids=input_ids, labels=input_ids)
    want = torch_path(input_ids=input_ids, labels=input_ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    got.loss.backward()
    want.loss.backward()
    assert kernel_launches == {"forward": 2, "backward": 2}  # one per layer, none on the torch side
    theirs = dict(torch_path.named_parameters())
    for name, parameter in triton.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, theirs[name].grad, rtol=1e-4, atol=1e-6)


def test_triton_path_generates_like_the_torch_path(device):
    triton, torch_path = pair("qwen2", device)
    input_ids = random_input_ids(2, 5).to(device)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD_TOKEN_ID)
    tokens = triton.generate(input_ids, **settings)
    assert torch.equal(tokens, torch_path.generate(input_ids, **settings))
