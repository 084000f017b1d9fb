"""SteerModel's API: adapters, parameter counts, paths, validation before any change,
disable_steering, set_scale, unload, train/eval, state_dict, and models outside the table."""

import copy
import functools
import json

import pytest
import torch
import transformers
from torch import nn

from steer_fast import PostBlockAdapter, SteerConfig, SteerModel, get_steer_model
from steer_fast.injection import find_decoder_layers, inject_steering, remove_steering
from steer_fast.ops import reference_post_block_steer

from tiny_models import (
    ALL_FAMILIES,
    HIDDEN_SIZE,
    LAYERS_PATH,
    NUM_LAYERS,
    add_reference_steering,
    decoder_layers,
    random_input_ids,
    randomize_adapters,
    tiny_causal_lm,
)

TOL = dict(rtol=1e-5, atol=1e-5)
INPUT_IDS = random_input_ids(2, 7)


def config(**overrides):
    return SteerConfig(**{"rank": 4, "bias": True, "backend": "torch", **overrides})


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def snapshot(model):
    """What a failed call must leave as it was: modules, parameters and their flags."""
    return (
        [(name, type(module), id(module)) for name, module in model.named_modules()],
        [(name, p.data_ptr(), p.requires_grad, p.dtype) for name, p in model.named_parameters()],
    )


def test_adapters_and_trainable_parameters(capsys):
    base = tiny_causal_lm("llama")
    total_base = sum(p.numel() for p in base.parameters())
    model = get_steer_model(base, config(rank=4))
    adapters = model.get_adapters()
    assert sorted(adapters) == list(range(NUM_LAYERS))
    assert all(isinstance(a, PostBlockAdapter) for a in adapters.values())
    per_layer = 4 * (2 * HIDDEN_SIZE + 1) + HIDDEN_SIZE
    assert model.get_nb_trainable_parameters() == (
        NUM_LAYERS * per_layer,
        total_base + NUM_LAYERS * per_layer,
    )
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("steer_adapter" in name for name in trainable)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "steer_adapter" not in n)
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    assert f"trainable params: {NUM_LAYERS * per_layer:,d}" in printed
    assert f"steered layers: {NUM_LAYERS} ({NUM_LAYERS} fused, 0 plain)" in printed
    assert "path='fused'" in repr(model)


def test_layers_subset_steers_only_those_layers():
    base = tiny_causal_lm("qwen3")
    reference = copy.deepcopy(base)
    original_layer0 = decoder_layers(base, "qwen3")[0]
    model = get_steer_model(base, config(layers=[1]))
    assert list(model.get_adapters()) == [1]
    assert decoder_layers(base, "qwen3")[0] is original_layer0
    randomize_adapters(model.get_adapters())
    add_reference_steering(reference, "qwen3", model.get_adapters())
    torch.testing.assert_close(logits(model), logits(reference), **TOL)


def test_attributes_come_from_the_wrapped_model():
    base = tiny_causal_lm("llama")
    model = get_steer_model(base, config())
    assert model.config is base.config
    assert model.get_base_model() is base
    with pytest.raises(AttributeError):
        model.no_such_attribute  # noqa: B018


def test_config_passed_in_is_not_changed():
    cfg = config()
    model = get_steer_model(tiny_causal_lm("llama"), cfg)
    assert cfg.hidden_size is None and cfg.num_layers is None
    assert (model.steer_config.hidden_size, model.steer_config.num_layers) == (
        HIDDEN_SIZE,
        NUM_LAYERS,
    )


def _mutated(**changes):
    cfg = config()
    for name, value in changes.items():
        setattr(cfg, name, value)  # after construction: get_steer_model must check again
    return cfg


@pytest.mark.parametrize(
    "make_config, match",
    [
        (lambda: _mutated(activation="swish"), "activation"),
        (lambda: _mutated(rank=0), "rank"),
        (lambda: _mutated(dtype=torch.int8), "dtype"),
        (lambda: config(layers=[NUM_LAYERS]), "out of range"),
        (lambda: config(layers=[0, 7]), "out of range"),
        (lambda: config(hidden_size=HIDDEN_SIZE + 8), "hidden_size"),
        (lambda: config(num_layers=NUM_LAYERS + 1), "num_layers"),
        (lambda: "rank=4", "SteerConfig"),
    ],
)
def test_bad_input_raises_before_the_model_is_touched(make_config, match):
    base = tiny_causal_lm("llama")
    before, expected = snapshot(base), logits(base)
    with pytest.raises(ValueError, match=match):
        get_steer_model(base, make_config())
    assert snapshot(base) == before
    assert torch.equal(logits(base), expected)


def test_a_dtype_the_triton_kernels_lack_is_refused_up_front():
    base = tiny_causal_lm("llama", dtype=torch.float64)
    before = snapshot(base)
    with pytest.raises(ValueError, match="triton"):
        get_steer_model(base, config(backend="triton"))
    assert snapshot(base) == before
    # The torch path runs fp64, in the model's dtype by default.
    model = get_steer_model(base, config(backend="torch"))
    assert model.get_adapters()[0].up.weight.dtype == torch.float64


def test_a_model_in_a_dtype_the_kernels_lack_needs_an_adapter_dtype():
    base = tiny_causal_lm("llama").to(torch.float8_e4m3fn)
    before = snapshot(base)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        get_steer_model(base, config())
    assert snapshot(base) == before


def test_a_model_without_decoder_layers_is_refused():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    before = snapshot(model)
    with pytest.raises(ValueError, match="no recognisable decoder layers"):
        get_steer_model(model, config())
    assert snapshot(model) == before


def test_steering_twice_is_refused():
    model = get_steer_model(tiny_causal_lm("llama"), config())
    with pytest.raises(ValueError, match="already steered"):
        get_steer_model(model.base_model, config())
    with pytest.raises(ValueError, match="already steered"):
        get_steer_model(model, config())


def test_disable_steering_gives_the_base_model_exactly():
    base = tiny_causal_lm("gemma3_text")
    expected = logits(base)
    model = get_steer_model(base, config())
    randomize_adapters(model.get_adapters())
    steered = logits(model)
    assert not torch.allclose(steered, expected)
    with model.disable_steering():
        assert torch.equal(logits(model), expected)
    assert torch.equal(logits(model), steered)
    with pytest.raises(RuntimeError, match="inside"), model.disable_steering():
        raise RuntimeError("inside")
    assert torch.equal(logits(model), steered)


def test_set_scale_changes_the_strength_and_zero_turns_it_off():
    base = tiny_causal_lm("phi3")
    reference = copy.deepcopy(base)
    expected = logits(base)
    model = get_steer_model(base, config())
    randomize_adapters(model.get_adapters())
    model.set_scale(0.0)
    assert torch.equal(logits(model), expected)
    model.set_scale(-2.5)
    assert model.steer_config.scale == -2.5
    assert all(a.scale == -2.5 for a in model.get_adapters().values())
    add_reference_steering(reference, "phi3", model.get_adapters())
    torch.testing.assert_close(logits(model), logits(reference), **TOL)
    for bad in (float("inf"), "1", None):
        with pytest.raises(ValueError, match="scale"):
            model.set_scale(bad)


@pytest.mark.parametrize("family", ["olmo2", "gpt_neox"])
def test_unload_puts_the_original_model_back(family):
    base = tiny_causal_lm(family)
    base.get_input_embeddings().weight.requires_grad_(False)  # a flag unload must restore
    originals = list(decoder_layers(base, family))
    keys = list(base.state_dict())
    flags = {name: p.requires_grad for name, p in base.named_parameters()}
    expected = logits(base)
    model = get_steer_model(base, config())
    randomize_adapters(model.get_adapters())
    assert list(base.state_dict()) != keys
    unloaded = model.unload()
    assert unloaded is base
    assert list(decoder_layers(base, family)) == originals
    assert all(a is b for a, b in zip(decoder_layers(base, family), originals, strict=True))
    assert list(base.state_dict()) == keys
    assert {name: p.requires_grad for name, p in base.named_parameters()} == flags
    assert torch.equal(logits(base), expected)
    with pytest.raises(AttributeError, match="unloaded"):
        model.base_model  # noqa: B018
    get_steer_model(base, config())  # it can be steered again


def test_train_and_eval_reach_every_module():
    base = tiny_causal_lm("phi3", dropout=0.3)
    model = get_steer_model(base, config())
    randomize_adapters(model.get_adapters())
    model.train()
    assert all(m.training for m in model.modules())
    assert not torch.equal(logits(model), logits(model))  # dropout is live
    model.eval()
    assert not any(m.training for m in model.modules())
    assert torch.equal(logits(model), logits(model))


def test_state_dict_holds_the_adapters_and_the_config():
    model = get_steer_model(tiny_causal_lm("qwen2", tie_word_embeddings=True), config())
    randomize_adapters(model.get_adapters())
    state = model.state_dict()
    assert "_extra_state" in state
    adapter_keys = [key for key in state if key != "_extra_state"]
    assert len(adapter_keys) == NUM_LAYERS * 4
    # PEFT's naming: every adapter parameter carries its adapter's name.
    assert all(".steer_adapter.default." in key for key in adapter_keys)
    saved = json.loads(bytes(state["_extra_state"].tolist()))
    assert saved == model.steer_config.to_dict()

    other = get_steer_model(tiny_causal_lm("qwen2", tie_word_embeddings=True), config())
    result = other.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(logits(other), logits(model), rtol=0, atol=0)

    wrong = get_steer_model(tiny_causal_lm("qwen2"), config(activation="relu"))
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(ValueError, match="another steering config"):
        wrong.load_state_dict(state)
    after = wrong.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_decoder_layers_are_found(family):
    name, layers = find_decoder_layers(tiny_causal_lm(family))
    assert name == LAYERS_PATH[family] and len(layers) == NUM_LAYERS


def test_a_vision_language_model_steers_its_language_model():
    text = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=4,
    )
    vision = dict(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
    )
    gemma3 = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=299,
        boi_token_index=297,
        eoi_token_index=298,
    )
    torch.manual_seed(0)
    base = transformers.Gemma3ForConditionalGeneration(gemma3).eval()
    expected = logits(base)
    model = get_steer_model(base, config())
    assert model.layers_name == "model.language_model.layers"
    assert model.steering_paths() == {0: "fused", 1: "fused"}
    assert model.steer_config.hidden_size == 32
    assert torch.equal(logits(model), expected)


class TupleBlock(nn.Module):
    """A block outside transformers that returns (hidden, extra)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, hidden, gain=1.0):
        return hidden + gain * torch.tanh(self.linear(hidden)), "extra"


class TupleStack(nn.Module):
    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, width)
        self.layers = nn.ModuleList(TupleBlock(width) for _ in range(depth))

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden, extra = layer(hidden, gain=0.5)
            assert extra == "extra"
        return hidden


def add_reference_steering_on(layer, adapter):
    """The forward-hook reference for one TupleBlock."""

    def hook(module, args, output):
        steered = reference_post_block_steer(
            output[0],
            adapter.down.weight,
            adapter.up.weight,
            adapter.down.bias,
            adapter.up.bias,
            activation=adapter.activation,
            scale=adapter.scale,
        )
        return (steered, *output[1:])

    return layer.register_forward_hook(hook)


def test_any_model_with_a_layer_list_takes_the_plain_path():
    base = TupleStack()
    reference = copy.deepcopy(base)
    model = get_steer_model(base, config(rank=2, activation="tanh"))
    assert model.steering_paths() == {0: "plain", 1: "plain", 2: "plain"}
    assert "not in the family table" in model.steering_report()
    randomize_adapters(model.get_adapters())
    for index, adapter in model.get_adapters().items():
        add_reference_steering_on(reference.layers[index], adapter)
    ids = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(model.base_model(ids), reference(ids), **TOL)


def test_a_layer_with_an_instance_forward_takes_the_plain_path_and_says_so():
    """accelerate-style hooks set forward on the instance; the fused path would bypass them."""
    base = tiny_causal_lm("llama")
    reference = copy.deepcopy(base)
    calls = []
    layer = decoder_layers(base, "llama")[1]
    original = layer.forward

    @functools.wraps(original)
    def hooked_forward(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    layer.forward = hooked_forward
    with pytest.warns(RuntimeWarning, match="plain path"):
        model = get_steer_model(base, config())
    assert model.steering_paths() == {0: "fused", 1: "plain"}
    assert "set on the instance" in model.steering_report()
    randomize_adapters(model.get_adapters())
    add_reference_steering(reference, "llama", model.get_adapters())
    torch.testing.assert_close(logits(model), logits(reference), **TOL)
    assert calls


def test_inject_and_remove_work_without_the_wrapper():
    base = tiny_causal_lm("mistral")
    expected = logits(base)
    blocks = inject_steering(base, config())
    assert sorted(blocks) == [0, 1]
    assert all(list(block.adapters()) == ["block"] for block in blocks.values())
    assert all(p.requires_grad for p in base.parameters())  # freezing is SteerModel's job
    removed = remove_steering(base)
    assert removed.keys() == blocks.keys()
    assert all(removed[i] is blocks[i] for i in blocks)
    assert torch.equal(logits(base), expected)


def test_steer_model_is_exported():
    assert isinstance(get_steer_model(tiny_causal_lm("llama"), config()), SteerModel)


def test_published_defaults_on_a_llama_3_2_1b_shaped_model(capsys):
    """The paper's budget: rank 8, no biases, after each of the 16 blocks of a 2048-wide model:
    16 x 2 x 8 x 2048 = 524,288 trainable parameters, 0.042% (the paper's 0.04%)."""
    llama_1b = transformers.LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):  # shapes only: nothing is allocated
        base = transformers.AutoModelForCausalLM.from_config(llama_1b)
    base_parameters = sum(p.numel() for p in base.parameters())
    model = get_steer_model(base, SteerConfig())
    assert model.get_nb_trainable_parameters() == (524_288, base_parameters + 524_288)
    model.print_trainable_parameters()
    assert "trainable params: 524,288 ||" in capsys.readouterr().out
    assert f"{100 * 524_288 / (base_parameters + 524_288):.3f}" == "0.042"
