"""Mixed batches on a SteerModel: ``adapter_names=`` and ``steering_scales=`` in forward and
generate. Every row equals that row run alone with its adapter (left padding included);
"__base__" rows equal the base model exactly; gradients reach each adapter from its own rows
only and equal the sum of per-adapter runs; bad input raises ValueError and changes nothing."""

import dataclasses

import pytest
import torch

from steer_fast import SteerConfig, get_steer_model

from tiny_models import (
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    enable_checkpointing,
    random_input_ids,
    tiny_causal_lm,
)

DEFAULT = SteerConfig(rank=4, backend="torch")
OTHERS = {
    "narrow": SteerConfig(
        rank=2, activation="identity", bias=True, scale=0.5, layers=[1], backend="torch"
    ),
    "mlp": SteerConfig(rank=3, activation="gelu", site="mlp", backend="torch"),
    "vector": SteerConfig(rank=0, site=["attn", "block"], backend="torch"),
}
ROWS = ["narrow", "__base__", "default", "mlp", "vector", "default"]


def batch(rows=6, length=7, seed=0):
    """Left-padded input ids and attention mask: row i has i % 3 pad tokens."""
    input_ids = random_input_ids(rows, length, seed)
    mask = torch.ones_like(input_ids)
    for row in range(rows):
        mask[row, : row % 3] = 0
        input_ids[row, : row % 3] = PAD_TOKEN_ID
    return input_ids, mask


def steer_model(family="llama", backend="torch", device="cpu"):
    configs = {
        name: dataclasses.replace(config, backend=backend)
        for name, config in {"default": DEFAULT, **OTHERS}.items()
    }
    model = get_steer_model(tiny_causal_lm(family).to(device), configs.pop("default"))
    for name, config in configs.items():
        model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def row_alone(model, name, input_ids, mask, row, scale=None):
    """Logits of one row run alone with adapter ``name`` (its scale replaced by ``scale``)."""
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return model(
                    input_ids=input_ids[row : row + 1], attention_mask=mask[row : row + 1]
                ).logits[0]
        model.set_adapter(name)
        saved = model.steer_configs[name].scale
        if scale is not None:
            model.set_scale(scale, adapter_name=name)
        try:
            return model(
                input_ids=input_ids[row : row + 1], attention_mask=mask[row : row + 1]
            ).logits[0]
        finally:
            model.set_scale(saved, adapter_name=name)
            model.set_adapter("default")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_row_equals_the_row_run_alone_with_its_adapter(family):
    model = steer_model(family)
    input_ids, mask = batch()
    with torch.no_grad():
        mixed = model(input_ids=input_ids, attention_mask=mask, adapter_names=ROWS).logits
        with model.disable_adapter():
            base = model(input_ids=input_ids, attention_mask=mask).logits
    for row, name in enumerate(ROWS):
        attended = mask[row].bool()
        expected = row_alone(model, name, input_ids, mask, row)
        torch.testing.assert_close(mixed[row][attended], expected[attended], rtol=0, atol=1e-5)
        if name == "__base__":
            assert torch.equal(mixed[row], base[row])
        else:
            assert not torch.allclose(mixed[row][attended], base[row][attended], atol=1e-3)
    # The routing ends with the call: the next call runs the active adapter on every row.
    with torch.no_grad():
        plain = model(input_ids=input_ids, attention_mask=mask).logits
        everyone = model(
            input_ids=input_ids, attention_mask=mask, adapter_names=["default"] * len(ROWS)
        ).logits
    torch.testing.assert_close(everyone, plain, rtol=0, atol=1e-5)


def test_per_row_scales():
    model = steer_model()
    input_ids, mask = batch()
    scales = [2.0, 1.0, 0.0, -1.0, 0.25, 3.0]
    with torch.no_grad():
        mixed = model(
            input_ids=input_ids, attention_mask=mask, adapter_names=ROWS, steering_scales=scales
        ).logits
        with model.disable_adapter():
            base = model(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(mixed[2], base[2], rtol=0, atol=1e-6)  # scale 0
    for row, (name, scale) in enumerate(zip(ROWS, scales, strict=True)):
        attended = mask[row].bool()
        expected = row_alone(model, name, input_ids, mask, row, scale=scale)
        torch.testing.assert_close(mixed[row][attended], expected[attended], rtol=0, atol=1e-5)
    # Per-row scales alone steer every row with the active adapter at its own strength.
    with torch.no_grad():
        tensor_scales = model(
            input_ids=input_ids, attention_mask=mask, steering_scales=torch.tensor(scales)
        ).logits
    for row, scale in enumerate(scales):
        attended = mask[row].bool()
        expected = row_alone(model, "default", input_ids, mask, row, scale=scale)
        torch.testing.assert_close(
            tensor_scales[row][attended], expected[attended], rtol=0, atol=1e-5
        )


def test_gradients_reach_each_adapter_from_its_rows_and_sum_like_separate_runs():
    model = steer_model()
    model.train()
    input_ids, mask = batch()
    weights = torch.randn((*input_ids.shape, 128), generator=torch.Generator().manual_seed(1))
    loss = (
        model(input_ids=input_ids, attention_mask=mask, adapter_names=ROWS).logits
        * weights
        * mask[..., None]
    ).sum()
    loss.backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    for name in dict.fromkeys(r for r in ROWS if r != "__base__"):
        rows = [i for i, r in enumerate(ROWS) if r == name]
        model.set_adapter(name)
        out = model(input_ids=input_ids[rows], attention_mask=mask[rows]).logits
        (out * weights[rows] * mask[rows][..., None]).sum().backward()
    model.set_adapter("default")
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            expected = torch.zeros_like(parameter) if parameter.grad is None else parameter.grad
            torch.testing.assert_close(mixed[name], expected, rtol=1e-4, atol=1e-5)
            assert mixed[name].abs().sum() > 0, name
    # An adapter without rows gets no gradient.
    model.zero_grad(set_to_none=True)
    model(
        input_ids=input_ids, attention_mask=mask, adapter_names=["narrow"] * len(ROWS)
    ).logits.sum().backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and ".narrow." not in name:
            assert parameter.grad is None or not parameter.grad.any(), name


def test_gradient_checkpointing_recomputes_with_the_same_rows():
    """The recompute runs in the backward, after the call returned: the routing travels with
    the checkpointed call."""
    grads = []
    for checkpointing in (False, True):
        model = steer_model()
        model.train()
        if checkpointing:
            enable_checkpointing(model, use_reentrant=False)
        input_ids, mask = batch()
        model(
            input_ids=input_ids, attention_mask=mask, adapter_names=ROWS, labels=input_ids
        ).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_follows_each_row_alone(family):
    model = steer_model(family)
    input_ids, mask = batch(rows=4, length=5)
    rows = ["mlp", "__base__", "narrow", "default"]
    settings = dict(
        max_new_tokens=4, do_sample=False, pad_token_id=PAD_TOKEN_ID, eos_token_id=EOS_TOKEN_ID
    )
    mixed = model.generate(input_ids=input_ids, attention_mask=mask, adapter_names=rows, **settings)
    for row, name in enumerate(rows):
        one = dict(input_ids=input_ids[row : row + 1], attention_mask=mask[row : row + 1])
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(**one, **settings)
        else:
            model.set_adapter(name)
            alone = model.generate(**one, **settings)
            model.set_adapter("default")
        assert torch.equal(mixed[row], alone[0]), (row, name)
    # Beams and several return sequences: every copy of a row keeps its adapter.
    beams = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        adapter_names=rows,
        num_beams=2,
        num_return_sequences=2,
        **settings,
    )
    assert beams.shape[0] == 8
    for row, name in enumerate(rows):
        one = dict(input_ids=input_ids[row : row + 1], attention_mask=mask[row : row + 1])
        model.set_adapter("default" if name == "__base__" else name)
        with model.disable_adapter() if name == "__base__" else _nothing():
            alone = model.generate(**one, num_beams=2, num_return_sequences=2, **settings)
        model.set_adapter("default")
        assert torch.equal(beams[2 * row : 2 * row + 2], alone), (row, name)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *args):
        return None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(adapter_names=["default", "nope", "default", "default", "default", "default"]),
            "adapter_names: unknown adapter",
        ),
        (dict(adapter_names=["default"] * 5), "adapter_names has 5 names for a batch of 6 rows"),
        (dict(adapter_names="default"), "adapter_names must be a list"),
        (dict(adapter_names=ROWS, steering_scales=[1.0] * 4), "steering_scales has 4 values"),
        (
            dict(adapter_names=ROWS, steering_scales=[1.0] * 5 + [float("nan")]),
            "steering_scales must be finite",
        ),
        (
            dict(steering_scales=torch.tensor([1.0] * 5 + [float("inf")])),
            "steering_scales must be finite",
        ),
        (dict(steering_scales=["1"] * 6), "steering_scales must hold numbers"),
        (dict(steering_scales=torch.ones(6, 1)), "steering_scales must be a 1-D"),
    ],
)
def test_bad_mixed_batch_input_raises_before_running(kwargs, match):
    model = steer_model()
    input_ids, mask = batch()
    with pytest.raises(ValueError, match=match):
        model(input_ids=input_ids, attention_mask=mask, **kwargs)
    assert all(block.routing is None for block in model._steered_blocks().values())
    with pytest.raises(ValueError, match=match):
        model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=2,
            pad_token_id=PAD_TOKEN_ID,
            **kwargs,
        )


def test_compile_traces_a_mixed_batch_whole():
    """No graph break from a mixed batch (names, scales, routing, the op), and a fullgraph
    compile computes what eager does for two routings, forward and gradients."""
    model = steer_model()
    input_ids, mask = batch()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(
        input_ids=input_ids, attention_mask=mask, adapter_names=ROWS, steering_scales=[1.0] * 6
    )
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.train()
    for rows in (ROWS, list(reversed(ROWS))):
        grads = []
        for run in (model, compiled):
            model.zero_grad(set_to_none=True)
            logits = run(input_ids=input_ids, attention_mask=mask, adapter_names=rows).logits
            (logits * mask[..., None]).square().mean().backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys()
        for name, grad in grads[0].items():
            torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)
    assert all(block.routing is None for block in model._steered_blocks().values())
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_triton_path_agrees_with_the_torch_path(family, device):
    """The same mixed batch through the kernels (compiled on CUDA, the interpreter on the CPU)
    and through the torch path: logits and every adapter gradient."""
    results = []
    for backend in ("triton", "torch"):
        model = steer_model(family, backend, device)
        model.train()
        input_ids, mask = (t.to(device) for t in batch(length=5))
        logits = model(
            input_ids=input_ids,
            attention_mask=mask,
            adapter_names=ROWS,
            steering_scales=[1.0, 2.0, -0.5, 1.0, 0.5, 1.5],
        ).logits
        (logits * mask[..., None]).square().mean().backward()
        results.append(
            (
                logits.detach(),
                {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            )
        )
    (triton_logits, triton_grads), (torch_logits, torch_grads) = results
    torch.testing.assert_close(triton_logits, torch_logits, rtol=1e-5, atol=1e-5)
    assert triton_grads.keys() == torch_grads.keys()
    for name, grad in torch_grads.items():
        torch.testing.assert_close(triton_grads[name], grad, rtol=1e-4, atol=1e-5)
