"""save_pretrained / from_pretrained: identical logits, the files on disk, checks before the
model is touched, and a save that never leaves a half-written directory in place."""

import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open

import steer_fast.saving.atomic as saving_module
import steer_fast.saving.state as saved_state_module
from steer_fast import SteerConfig, SteerModel, get_steer_model

from tiny_models import (
    HIDDEN_SIZE,
    NUM_LAYERS,
    random_input_ids,
    randomize_adapters,
    tiny_causal_lm,
)

INPUT_IDS = random_input_ids(2, 7)


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def trained(family="llama", **overrides):
    cfg = SteerConfig(**{"rank": 4, "bias": True, "backend": "torch", **overrides})
    model = get_steer_model(tiny_causal_lm(family), cfg)
    randomize_adapters(model.get_adapters(), seed=5)
    return model


def tree(directory):
    """Every file under ``directory`` with its bytes."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("llama", {}),
        ("gpt2", {"activation": "relu", "bias": False}),
        ("olmo2", {"layers": [1], "fuse_residual": False, "scale": 0.5}),
        ("gemma3_text", {"dtype": torch.float64}),
    ],
)
def test_save_and_load_give_identical_logits(tmp_path, family, overrides):
    model = trained(family, **overrides)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary directory left
    assert sorted(os.listdir(tmp_path / "adapter")) == [
        "README.md",  # the model card (tests/test_model_card.py)
        "steer_config.json",
        "steer_model.safetensors",
    ]

    loaded = SteerModel.from_pretrained(tiny_causal_lm(family), tmp_path / "adapter")
    assert loaded.steer_config == model.steer_config
    assert loaded.steering_paths() == model.steering_paths()
    assert torch.equal(logits(loaded), expected)


def test_the_files_are_json_and_safetensors(tmp_path):
    model = trained(dtype=torch.bfloat16, activation="silu")
    model.save_pretrained(tmp_path)
    text = (tmp_path / "steer_config.json").read_text()
    values = json.loads(text)
    assert list(values) == sorted(values)
    assert values["steer_type"] == "post_block"
    assert values["hidden_size"] == HIDDEN_SIZE and values["num_layers"] == NUM_LAYERS
    assert values["dtype"] == "bfloat16" and values["activation"] == "silu"
    with safe_open(str(tmp_path / "steer_model.safetensors"), framework="pt") as handle:
        keys = sorted(handle.keys())
        assert keys == sorted(
            f"layers.{i}.{part}.{kind}"
            for i in range(NUM_LAYERS)
            for part in ("down", "up")
            for kind in ("weight", "bias")
        )
        assert handle.get_tensor("layers.0.down.weight").dtype == torch.bfloat16
        assert handle.get_tensor("layers.1.up.weight").shape == (HIDDEN_SIZE, 4)


def test_is_trainable_decides_frozen_and_mode(tmp_path):
    trained().save_pretrained(tmp_path)
    frozen = SteerModel.from_pretrained(tiny_causal_lm("llama"), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0 and not frozen.training
    trainable = SteerModel.from_pretrained(tiny_causal_lm("llama").train(), tmp_path, True)
    assert trainable.get_nb_trainable_parameters()[0] > 0 and trainable.training
    with pytest.raises(ValueError, match="is_trainable"):
        SteerModel.from_pretrained(tiny_causal_lm("llama"), tmp_path, is_trainable="yes")


def test_the_backend_can_be_chosen_at_load_time(tmp_path):
    model = trained(backend="triton")
    expected = logits(model)
    model.save_pretrained(tmp_path)
    loaded = SteerModel.from_pretrained(tiny_causal_lm("llama"), tmp_path, backend="torch")
    assert {a.backend for a in loaded.get_adapters().values()} == {"torch"}
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        SteerModel.from_pretrained(tiny_causal_lm("llama"), tmp_path, backend="cuda")


@pytest.mark.parametrize(
    "make_model, match",
    [
        (lambda: tiny_causal_lm("llama", hidden_size=48), "hidden_size=32"),
        (lambda: tiny_causal_lm("llama", num_layers=3), "num_layers=2"),
        (lambda: tiny_causal_lm("gpt2", hidden_size=48), "hidden_size=32"),
    ],
)
def test_an_adapter_for_another_model_is_refused_before_touching_it(tmp_path, make_model, match):
    trained().save_pretrained(tmp_path)
    model = make_model()
    before = [(n, id(m)) for n, m in model.named_modules()]
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        SteerModel.from_pretrained(model, tmp_path)
    assert [(n, id(m)) for n, m in model.named_modules()] == before
    assert [p.requires_grad for p in model.parameters()] == flags


def test_broken_directories_are_refused(tmp_path):
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="not a directory"):
        SteerModel.from_pretrained(model, tmp_path / "missing")
    with pytest.raises(ValueError, match="holds neither"):
        SteerModel.from_pretrained(model, tmp_path)

    trained().save_pretrained(tmp_path / "a")
    values = json.loads((tmp_path / "a" / "steer_config.json").read_text())
    values["rank"] = 5  # the weights are rank 4
    (tmp_path / "a" / "steer_config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match="shape"):
        SteerModel.from_pretrained(model, tmp_path / "a")

    trained(layers=[0]).save_pretrained(tmp_path / "b")
    values = json.loads((tmp_path / "b" / "steer_config.json").read_text())
    values["layers"] = None  # the file has layer 0 only
    (tmp_path / "b" / "steer_config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match="missing"):
        SteerModel.from_pretrained(model, tmp_path / "b")
    assert not any(type(m).__name__ == "SteeredBlock" for m in model.modules())


def test_saving_over_a_directory_replaces_it_and_keeps_other_files(tmp_path):
    target = tmp_path / "adapter"
    trained().save_pretrained(target)
    (target / "notes.txt").write_text("keep me")
    (target / "sub").mkdir()
    (target / "sub" / "data.bin").write_bytes(b"\x00\x01")
    second = trained(activation="tanh")
    second.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "keep me"
    assert (target / "sub" / "data.bin").read_bytes() == b"\x00\x01"
    assert SteerConfig.from_json_file(target / "steer_config.json") == second.steer_config
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_a_failed_write_leaves_the_old_directory_intact(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    trained().save_pretrained(target)
    before = tree(target)

    def failing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(saved_state_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        trained(activation="relu").save_pretrained(target)
    assert tree(target) == before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_a_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    trained().save_pretrained(target)
    before = tree(target)
    real_rename = os.rename

    def rename(source, destination):
        if os.fspath(destination) == os.fspath(target) and ".saving-" in os.fspath(source):
            raise OSError("rename failed")
        real_rename(source, destination)

    monkeypatch.setattr(saving_module.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        trained(activation="relu").save_pretrained(target)
    assert tree(target) == before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_saving_onto_a_file_is_refused(tmp_path):
    path = tmp_path / "adapter"
    path.write_text("not a directory")
    with pytest.raises(ValueError, match="not a directory"):
        trained().save_pretrained(path)
    assert path.read_text() == "not a directory"


def test_an_adapter_saved_switched_off_loads_switched_off_and_the_save_says_so(tmp_path):
    """The scale is part of the adapter: ``set_scale(0.0)`` then ``save_pretrained`` saves an
    adapter that loads off, with a warning saying how to switch off without saving it."""
    model = trained()
    on = logits(model)
    model.set_scale(0.0)
    with pytest.warns(UserWarning, match=r"\['default'\] with scale 0.0.*disable_adapter"):
        model.save_pretrained(tmp_path / "off")
    assert json.loads((tmp_path / "off" / "steer_config.json").read_text())["scale"] == 0.0
    loaded = SteerModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "off")
    torch.testing.assert_close(logits(loaded), logits(tiny_causal_lm("llama")), rtol=0, atol=0)
    # disable_adapter() switches off without changing what is saved: no warning then.
    model.set_scale(1.0)
    with model.disable_adapter(), warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "on")
    loaded = SteerModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "on")
    torch.testing.assert_close(logits(loaded), on, rtol=0, atol=0)
