"""JointModel.save_pretrained / from_pretrained: exact round trips, PEFT's files loadable by PEFT
alone, atomic saves, and loads that fail without touching the model."""

import json
import os

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import steer_fast.saving.state as saved_state_module
from steer_fast import JointModel, OrthogonalityConfig, SteerConfig, get_joint_model

from tiny_models import random_input_ids, randomize_trainable, tiny_causal_lm

INPUT_IDS = random_input_ids(2, 7)
JOINT_FILES = [
    "README.md",  # the model card (tests/test_model_card.py)
    "adapter_config.json",
    "adapter_model.safetensors",
    "joint_config.json",
    "steer_config.json",
    "steer_model.safetensors",
]


def lora(**overrides):
    settings = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    settings["target_modules"] = ["q_proj", "v_proj", "o_proj", "down_proj"]
    return peft.LoraConfig(**{**settings, **overrides})


def trained(family="llama", lora_config=None, orthogonality=None, **steer_overrides):
    settings = {"rank": 4, "activation": "silu", "bias": True, "backend": "torch"}
    steer = SteerConfig(**{**settings, **steer_overrides})
    model = get_joint_model(tiny_causal_lm(family), steer, lora_config or lora(), orthogonality)
    randomize_trainable(model, seed=5)
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def tree(directory):
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def fingerprint(model):
    return (
        [(name, id(module)) for name, module in model.named_modules()],
        [(name, p.requires_grad) for name, p in model.named_parameters()],
        {key: value.clone() for key, value in model.state_dict().items()},
    )


def assert_untouched(model, before):
    modules, flags, state = fingerprint(model)
    assert modules == before[0] and flags == before[1] and state.keys() == before[2].keys()
    assert all(torch.equal(state[key], before[2][key]) for key in state)
    assert not hasattr(model, "peft_config")


@pytest.mark.parametrize(
    "family, steer_overrides, lora_overrides",
    [
        ("llama", {}, {}),
        ("gpt2", {"layers": [1], "bias": False}, {"target_modules": ["c_attn", "c_proj"]}),
        ("qwen2", {"scale": 0.5}, {"task_type": "CAUSAL_LM", "use_rslora": True}),
    ],
)
def test_save_and_load_give_identical_logits(tmp_path, family, steer_overrides, lora_overrides):
    orthogonality = OrthogonalityConfig(weight=0.3, mode="project")
    model = trained(family, lora(**lora_overrides), orthogonality, **steer_overrides)
    expected = logits(model)
    model.save_pretrained(tmp_path / "joint")
    assert sorted(os.listdir(tmp_path)) == ["joint"]  # no temporary directory left
    assert sorted(os.listdir(tmp_path / "joint")) == JOINT_FILES

    loaded = JointModel.from_pretrained(tiny_causal_lm(family), tmp_path / "joint")
    assert torch.equal(logits(loaded), expected)
    assert loaded.orthogonality == orthogonality
    assert loaded.steer_config == model.steer_config
    assert loaded.constrained_modules() == model.constrained_modules()
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False

    trainable = JointModel.from_pretrained(tiny_causal_lm(family), tmp_path / "joint", True)
    names = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert names(trainable) == names(model)
    assert torch.equal(logits(trainable), expected)


def test_peft_files_load_with_peft_alone(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path / "joint")
    saved_config = json.loads((tmp_path / "joint" / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "LORA" and saved_config["inference_mode"] is True

    # The keys are those of a plain PEFT model of the same config: no steering segment.
    plain = peft.get_peft_model(tiny_causal_lm("llama"), lora())
    with safe_open(str(tmp_path / "joint" / "adapter_model.safetensors"), framework="pt") as f:
        saved = {key: f.get_tensor(key) for key in f.keys()}
    assert set(saved) == set(peft.get_peft_model_state_dict(plain))
    assert not any(".base_layer." in key for key in saved)

    alone = peft.PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "joint")
    loaded = peft.get_peft_model_state_dict(alone)
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    # The same weights: PEFT's model computes what the joint model computes without steering.
    with model.disable_steering():
        assert torch.equal(logits(alone), logits(model))


def test_save_replaces_an_existing_directory_and_keeps_other_files(tmp_path):
    target = tmp_path / "joint"
    trained().save_pretrained(target)
    (target / "README.md").write_text("notes")
    (target / "runs").mkdir()
    (target / "runs" / "log.txt").write_text("log")
    model = trained(scale=0.25)
    model.save_pretrained(target)
    files = tree(target)
    # The README is the model card: updated, its author's text kept.
    assert files["README.md"].decode().split("---\n", 2)[2].startswith("notes\n")
    assert files["runs/log.txt"] == b"log"
    assert sorted(name for name in files if "/" not in name) == JOINT_FILES
    assert json.loads(files["steer_config.json"])["scale"] == 0.25
    assert sorted(os.listdir(tmp_path)) == ["joint"]


def test_a_failed_save_leaves_the_existing_directory_as_it_was(tmp_path, monkeypatch):
    target = tmp_path / "joint"
    trained().save_pretrained(target)
    before = tree(target)
    calls = []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # after PEFT's weights, at the steering weights
            raise OSError("disk full")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(saved_state_module, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        trained(scale=0.5).save_pretrained(target)
    assert tree(target) == before
    assert sorted(os.listdir(tmp_path)) == ["joint"]


def _corrupt_lora_shape(directory):
    path = directory / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    key = next(key for key in tensors if "lora_A" in key)
    tensors[key] = torch.zeros(3, tensors[key].shape[1])
    save_file(tensors, str(path), metadata={"format": "pt"})


def _drop_a_lora_tensor(directory):
    path = directory / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(path), metadata={"format": "pt"})


def _bad_joint_config(directory):
    path = directory / "joint_config.json"
    values = json.loads(path.read_text())
    values["orthogonality"]["weight"] = -1
    path.write_text(json.dumps(values))


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "steer_model.safetensors").unlink(), "without"),
        (lambda d: (d / "adapter_config.json").write_text("{"), "valid"),
        (_bad_joint_config, "weight"),
        (_corrupt_lora_shape, "does not fit"),  # found after the model was adapted: undone
        (_drop_a_lora_tensor, "missing"),
    ],
)
def test_a_bad_directory_raises_and_leaves_the_model_untouched(tmp_path, damage, match):
    trained().save_pretrained(tmp_path / "joint")
    damage(tmp_path / "joint")
    base = tiny_causal_lm("llama")
    before = fingerprint(base)
    with pytest.raises(ValueError, match=match):
        JointModel.from_pretrained(base, tmp_path / "joint")
    assert_untouched(base, before)


def test_a_model_of_another_size_is_refused_untouched(tmp_path):
    trained().save_pretrained(tmp_path / "joint")
    base = tiny_causal_lm("llama", hidden_size=48)
    before = fingerprint(base)
    with pytest.raises(ValueError, match="hidden_size"):
        JointModel.from_pretrained(base, tmp_path / "joint")
    assert_untouched(base, before)
    with pytest.raises(ValueError, match="neither"):
        JointModel.from_pretrained(base, tmp_path)


def test_backend_can_be_overridden_on_load(tmp_path):
    trained().save_pretrained(tmp_path / "joint")
    loaded = JointModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "joint", backend="auto")
    assert {adapter.backend for adapter in loaded.get_adapters().values()} == {"auto"}
