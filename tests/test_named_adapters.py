"""Named adapters on a SteerModel, PEFT's verbs: add_adapter, load_adapter, set_adapter,
delete_adapter, active_adapter, list_adapters, save_pretrained with a subfolder per adapter; each
adapter run alone equals a model steered with that adapter only; bad input changes nothing."""

import json

import pytest
import torch

from steer_fast import SteerConfig, SteerModel, get_steer_model
from steer_fast.constants import CONFIG_NAME, WEIGHTS_NAME

from tiny_models import random_input_ids, tiny_causal_lm

INPUT_IDS = random_input_ids(3, 6)
DEFAULT = SteerConfig(rank=4, backend="torch")
# Another rank, activation, bias, scale, layer set and site than the default.
OTHERS = {
    "narrow": SteerConfig(
        rank=2, activation="identity", bias=True, scale=0.5, layers=[1], backend="torch"
    ),
    "mlp": SteerConfig(rank=3, activation="gelu", site="mlp", backend="torch"),
    "vector": SteerConfig(rank=0, site=["attn", "block"], backend="torch"),
}


def logits(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS, **kwargs).logits


def randomize(model, adapter_name, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model._adapter_modules(adapter_name):
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def model_with_adapters(family="llama", names=tuple(OTHERS)):
    model = get_steer_model(tiny_causal_lm(family), DEFAULT)
    randomize(model, "default", 0)
    for seed, name in enumerate(names, start=1):
        model.add_adapter(name, OTHERS[name])
        randomize(model, name, seed)
    return model


def alone(model, name, family="llama"):
    """A fresh model steered with adapter ``name`` of ``model`` only."""
    config = model.steer_configs[name]
    single = get_steer_model(tiny_causal_lm(family), SteerConfig.from_dict(config.to_dict()))
    single.load_steering_tensors(model.steering_tensors(name))
    return single


def adapter_count(model):
    return sum(p.numel() for n, p in model.named_parameters() if "steer_adapter" in n)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_each_adapter_runs_as_a_model_steered_with_it_alone(family):
    model = model_with_adapters(family)
    assert model.list_adapters() == ["default", *OTHERS]
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    base = logits(tiny_causal_lm(family))
    for name in model.list_adapters():
        model.set_adapter(name)
        assert model.active_adapter == name
        steered = logits(model)
        torch.testing.assert_close(steered, logits(alone(model, name, family)), rtol=0, atol=1e-6)
        assert not torch.allclose(steered, base, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0)


def test_a_new_adapter_starts_as_the_identity_and_trains():
    model = get_steer_model(tiny_causal_lm("llama"), DEFAULT)
    before = adapter_count(model)
    model.add_adapter("extra", SteerConfig(rank=2, backend="torch"))
    assert adapter_count(model) == before + 2 * (2 * 2 * 32)
    model.set_adapter("extra")
    torch.testing.assert_close(logits(model), logits(tiny_causal_lm("llama")), rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".steer_adapter.extra." in n for n in trainable)
    assert all("steer_adapter" in n for n in trainable)


def test_save_writes_the_default_at_the_top_and_the_others_in_subfolders(tmp_path):
    model = model_with_adapters()
    model.save_pretrained(tmp_path / "saved")
    for folder in (tmp_path / "saved", *(tmp_path / "saved" / name for name in OTHERS)):
        assert (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()
    assert json.loads((tmp_path / "saved" / "narrow" / CONFIG_NAME).read_text())["rank"] == 2

    loaded = SteerModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "saved")
    assert loaded.list_adapters() == ["default"]
    for name in OTHERS:
        loaded.load_adapter(tmp_path / "saved" / name, name)
    assert loaded.list_adapters() == model.list_adapters()
    assert not any(p.requires_grad for p in loaded.parameters())
    for name in model.list_adapters():
        model.set_adapter(name)
        loaded.set_adapter(name)
        torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)

    model.save_pretrained(tmp_path / "some", selected_adapters=["narrow"])
    assert sorted(p.name for p in (tmp_path / "some").iterdir()) == ["README.md", "narrow"]
    trainable = get_steer_model(tiny_causal_lm("llama"), DEFAULT)
    trainable.load_adapter(tmp_path / "some" / "narrow", "narrow", is_trainable=True)
    assert any(p.requires_grad for p in trainable._adapter_modules("narrow")[0].parameters())


def test_delete_adapter():
    model = model_with_adapters()
    count = adapter_count(model)
    model.set_adapter("mlp")
    with pytest.raises(ValueError, match="new_active_adapter"):
        model.delete_adapter("mlp")
    assert model.list_adapters() == ["default", *OTHERS] and adapter_count(model) == count
    model.delete_adapter("mlp", new_active_adapter="narrow")
    assert model.active_adapter == "narrow"
    assert model.list_adapters() == ["default", "narrow", "vector"]
    assert adapter_count(model) == count - 2 * 2 * 3 * 32
    torch.testing.assert_close(logits(model), logits(alone(model, "narrow")), rtol=0, atol=1e-6)
    model.delete_adapter("vector")
    assert model.list_adapters() == ["default", "narrow"]


def test_set_scale_of_one_adapter_or_of_all():
    model = model_with_adapters()
    model.set_scale(0.0, adapter_name="narrow")
    model.set_adapter("narrow")
    torch.testing.assert_close(logits(model), logits(tiny_causal_lm("llama")), rtol=0, atol=0)
    model.set_adapter("default")
    assert not torch.allclose(logits(model), logits(tiny_causal_lm("llama")))
    model.set_scale(0.0)
    assert all(config.scale == 0.0 for config in model.steer_configs.values())
    torch.testing.assert_close(logits(model), logits(tiny_causal_lm("llama")), rtol=0, atol=0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m.add_adapter("narrow", DEFAULT), "adapter_name: an adapter 'narrow' is loaded"),
        (lambda m: m.add_adapter("default", DEFAULT), "is loaded already"),
        (lambda m: m.add_adapter("__base__", DEFAULT), "reserved"),
        (lambda m: m.add_adapter("a.b", DEFAULT), "adapter_name must be"),
        (lambda m: m.add_adapter("", DEFAULT), "adapter_name must be"),
        (lambda m: m.add_adapter("keys", DEFAULT), "reserved"),
        (lambda m: m.add_adapter("wide", SteerConfig(rank=2, hidden_size=64)), "hidden_size=64"),
        (lambda m: m.add_adapter("deep", SteerConfig(rank=2, num_layers=3)), "num_layers=3"),
        (lambda m: m.add_adapter("far", SteerConfig(rank=2, layers=[5])), "out of range"),
        (lambda m: m.add_adapter("x", "rank 2"), "config must be"),
        (lambda m: m.set_adapter("nope"), "adapter_name: no adapter 'nope'"),
        (lambda m: m.delete_adapter("nope"), "adapter_name: no adapter 'nope'"),
        (lambda m: m.delete_adapter("default"), "default adapter cannot be deleted"),
        (lambda m: m.delete_adapter("narrow", new_active_adapter="nope"), "new_active_adapter"),
        (lambda m: m.set_scale(1.0, adapter_name="nope"), "adapter_name"),
        (lambda m: m.save_pretrained("unused", selected_adapters=["nope"]), "selected_adapters"),
    ],
)
def test_bad_input_raises_and_changes_nothing(call, match):
    model = model_with_adapters()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = logits(model)
    with pytest.raises(ValueError, match=match):
        call(model)
    assert model.list_adapters() == ["default", *OTHERS] and model.active_adapter == "default"
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


def test_load_adapter_of_another_base_model_loads_nothing(tmp_path):
    wide = get_steer_model(tiny_causal_lm("llama", hidden_size=64), DEFAULT)
    wide.save_pretrained(tmp_path / "wide")
    deep = get_steer_model(tiny_causal_lm("llama", num_layers=3), DEFAULT)
    deep.save_pretrained(tmp_path / "deep")
    model = model_with_adapters()
    count = adapter_count(model)
    for folder, match in (
        ("wide", "hidden_size=64"),
        ("deep", "num_layers=3"),
        ("missing", "is not a directory"),
    ):
        with pytest.raises(ValueError, match=match):
            model.load_adapter(tmp_path / folder, "other")
        assert model.list_adapters() == ["default", *OTHERS] and adapter_count(model) == count
