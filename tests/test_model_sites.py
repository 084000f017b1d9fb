"""Intervention sites ("block", "attn", "mlp", attn + mlp) and rank-0 steering vectors on real
families: identity at init, equality with a forward-hook reference written here (logits,
gradients, generate with the KV cache), save/load, unload, checkpointing and compile."""

import copy

import pytest
import torch
import transformers

from steer_fast import SteerConfig, SteerModel, get_steer_model
from steer_fast.modules import SteeringVector
from steer_fast.ops import reference_post_block_steer

from tiny_models import (
    HIDDEN_SIZE,
    NUM_LAYERS,
    PAD_TOKEN_ID,
    TokenDataset,
    decoder_layers,
    enable_checkpointing,
    random_input_ids,
    randomize_adapters,
    tiny_causal_lm,
)

FAMILIES = ("llama", "qwen3", "gemma3_text", "phi3", "olmo2", "gpt2", "gpt_neox")
SITES = ("block", "attn", "mlp", ("attn", "mlp"))
RANKS = (4, 0)
# The module whose output is each branch's output just before its residual add, written out
# here from the transformers source, independently of steer_fast's family table. Gemma3 has
# "sandwich" norms and OLMo2 post-branch norms: a norm after each branch module; Phi3 and
# GPT-NeoX a residual dropout.
BRANCH_END = {
    "llama": {"attn": "self_attn", "mlp": "mlp"},
    "qwen3": {"attn": "self_attn", "mlp": "mlp"},
    "gemma3_text": {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
    "phi3": {"attn": "resid_attn_dropout", "mlp": "resid_mlp_dropout"},
    "olmo2": {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
    "gpt2": {"attn": "attn", "mlp": "mlp"},
    "gpt_neox": {"attn": "post_attention_dropout", "mlp": "post_mlp_dropout"},
}
INPUT_IDS = random_input_ids(2, 7)
TOL = dict(rtol=1e-5, atol=1e-5)


def sites_of(site):
    return (site,) if isinstance(site, str) else tuple(site)


def config(site, rank, **overrides):
    return SteerConfig(site=site, rank=rank, backend="torch", **overrides)


def adapters_by_site(model):
    return {site: model.get_adapters(site) for site in model.steer_config.site}


def randomize(model, seed=0):
    for offset, adapters in enumerate(adapters_by_site(model).values()):
        randomize_adapters(adapters, seed=seed + offset)


def reference_delta(adapter, hidden):
    """The steered hidden state, in eager PyTorch: the published code's hook maths."""
    if isinstance(adapter, SteeringVector):
        return hidden + adapter.scale * adapter.vector
    return reference_post_block_steer(
        hidden,
        adapter.down.weight,
        adapter.up.weight,
        adapter.down.bias,
        adapter.up.bias,
        activation=adapter.activation,
        scale=adapter.scale,
    )


def add_reference_hooks(model, family, adapters):
    """Hooks on the layer (site "block") and on the branch-end modules ("attn", "mlp")."""
    for site, by_layer in adapters.items():
        for index, adapter in by_layer.items():
            layer = decoder_layers(model, family)[index]
            module = layer if site == "block" else layer.get_submodule(BRANCH_END[family][site])

            def hook(module, args, output, adapter=adapter):
                if isinstance(output, tuple):
                    return (reference_delta(adapter, output[0]), *output[1:])
                return reference_delta(adapter, output)

            module.register_forward_hook(hook)


def steered_and_reference(family, site, rank, seed=0):
    base = tiny_causal_lm(family)
    reference = copy.deepcopy(base)
    model = get_steer_model(base, config(site, rank))
    randomize(model, seed)
    reference_adapters = copy.deepcopy(adapters_by_site(model))
    add_reference_hooks(reference, family, reference_adapters)
    return model, reference, reference_adapters


def logits(model, input_ids=INPUT_IDS):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("family", FAMILIES)
def test_new_steering_is_the_identity_exactly(family, site, rank):
    base = tiny_causal_lm(family)
    expected = logits(base)
    model = get_steer_model(base, config(site, rank))
    assert torch.equal(logits(model), expected)
    per_site = HIDDEN_SIZE if rank == 0 else 2 * rank * HIDDEN_SIZE
    assert model.get_nb_trainable_parameters()[0] == NUM_LAYERS * len(sites_of(site)) * per_site


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("family", FAMILIES)
def test_equals_the_hook_reference_with_gradients(family, site, rank):
    model, reference, reference_adapters = steered_and_reference(family, site, rank)
    model.train()
    reference.train()
    output = model(input_ids=INPUT_IDS, labels=INPUT_IDS)
    expected = reference(input_ids=INPUT_IDS, labels=INPUT_IDS)
    torch.testing.assert_close(output.logits, expected.logits, **TOL)
    output.loss.backward()
    expected.loss.backward()
    for site_name, by_layer in adapters_by_site(model).items():
        for index, adapter in by_layer.items():
            twin = reference_adapters[site_name][index]
            for (name, parameter), (_, twin_parameter) in zip(
                adapter.named_parameters(), twin.named_parameters(), strict=True
            ):
                assert parameter.grad is not None, (site_name, index, name)
                torch.testing.assert_close(parameter.grad, twin_parameter.grad, **TOL)


def test_paths_fuse_where_a_residual_add_is_saved():
    def paths(site, rank):
        model = get_steer_model(tiny_causal_lm("llama"), config(site, rank))
        return set(model.steering_paths().values()), model.steering_report()

    assert paths("block", 4)[0] == {"fused"}
    assert paths(("attn", "mlp"), 0)[0] == {"fused"}  # a vector is fused with the branch's add
    plain, report = paths("mlp", 4)
    assert plain == {"plain"} and "no residual add to fuse" in report and "hooks" in report
    assert paths("mlp", 4)[0] == {"plain"}
    gpt2 = get_steer_model(tiny_causal_lm("gpt2"), config(["attn", "mlp"], 0))
    assert set(gpt2.steering_paths().values()) == {"plain"}


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_with_the_cache_equals_the_reference(family, site, rank):
    model, reference, _ = steered_and_reference(family, site, rank, seed=3)
    prompts = random_input_ids(2, 5, seed=1)
    mask = torch.ones_like(prompts)
    prompts[1, :2], mask[1, :2] = PAD_TOKEN_ID, 0  # left padding
    settings = dict(
        attention_mask=mask,
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        use_cache=True,
        pad_token_id=PAD_TOKEN_ID,
    )
    tokens = model.generate(prompts, **settings)
    assert torch.equal(tokens, reference.generate(prompts, **settings))


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_and_unload(family, site, rank, tmp_path):
    base = tiny_causal_lm(family)
    expected = logits(base)
    model = get_steer_model(base, config(site, rank))
    randomize(model)
    steered = logits(model)
    model.save_pretrained(tmp_path)
    loaded = SteerModel.from_pretrained(tiny_causal_lm(family), tmp_path)
    assert loaded.steer_config.site == sites_of(site)
    assert torch.equal(logits(loaded), steered)
    with model.disable_adapter():
        assert torch.equal(logits(model), expected)
    model.set_scale(0.0)
    assert torch.equal(logits(model), expected)
    model.set_scale(1.0)
    assert torch.equal(logits(model), steered)
    assert model.unload() is base
    assert torch.equal(logits(base), expected)
    for module in base.modules():
        assert not module._forward_hooks, type(module).__name__  # the branch hooks are gone


@pytest.mark.parametrize(
    "family, site, rank", [("llama", "mlp", 4), ("llama", ("attn", "mlp"), 0), ("gpt2", "attn", 4)]
)
def test_gradient_checkpointing_and_compile(family, site, rank):
    model, _, _ = steered_and_reference(family, site, rank)
    model.train()

    def grads(runner):
        model.zero_grad()
        runner(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    eager = grads(model)
    enable_checkpointing(model)
    checkpointed = grads(model)
    for name in eager:
        torch.testing.assert_close(checkpointed[name], eager[name], rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=INPUT_IDS)
    frames = [f.filename for r in explanation.break_reasons for f in r.user_stack]
    assert not [name for name in frames if "steer_fast" in name]


def test_a_site_the_family_cannot_expose_is_an_error_before_any_change():
    base = tiny_causal_lm("llama")
    layers = decoder_layers(base, "llama")
    layers[0].__class__ = type("CustomLayer", (type(layers[0]),), {})  # not in the table
    before = [id(module) for module in base.modules()]
    with pytest.raises(ValueError, match="site"):
        get_steer_model(base, config("mlp", 4))
    assert [id(module) for module in base.modules()] == before
    assert not any(module._forward_hooks for module in base.modules())
    get_steer_model(base, config("block", 4))  # the block site serves any layer


@pytest.mark.parametrize("site, rank", [(("attn", "mlp"), 0), (("block", "mlp"), 4)])
def test_trainer_checkpoints_load_for_every_site(site, rank, tmp_path):
    model = get_steer_model(tiny_causal_lm("llama"), config(site, rank))
    before = {name: p.clone() for name, p in model.named_parameters() if p.requires_grad}
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
    )
    transformers.Trainer(model=model, args=arguments, train_dataset=TokenDataset()).train()
    trained = dict(model.named_parameters())
    assert all(not torch.equal(trained[name], value) for name, value in before.items())
    loaded = SteerModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "checkpoint-2")
    assert torch.equal(logits(loaded), logits(model.eval()))
