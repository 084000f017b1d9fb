"""Files and Trainer checkpoints of format 2 (steer_fast before the adapter name became a segment
of every parameter name) load as they did, and give the outputs they gave.

The fixtures in tests/fixtures/format2 were written by steer_fast at commit 3edfe3f
(``make_fixtures.py`` there): a SteerModel with three adapters (save_pretrained and a Trainer
checkpoint's model.safetensors), a JointModel (the same two forms), and the logits each gave on
``tiny_causal_lm("llama")`` and ``random_input_ids(3, 7)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steer_fast import SteerModel
from steer_fast.constants import FORMAT_VERSION

from tiny_models import random_input_ids, tiny_causal_lm

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "format2"
NAMES = ["default", "vector", "mlp"]


def expected(name: str) -> torch.Tensor:
    return load_file(str(FIXTURES / "expected_logits.safetensors"))[name]


def outputs(model) -> dict[str, torch.Tensor]:
    ids = random_input_ids(3, 7)
    with torch.no_grad():
        return {
            "default": model(input_ids=ids).logits,
            "mixed": model(input_ids=ids, adapter_names=NAMES).logits,
        }


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_the_fixtures_are_format_2():
    values = json.loads((FIXTURES / "steer_model" / "steer_config.json").read_text())
    assert values["format_version"] == 2 < FORMAT_VERSION
    keys = load_file(str(FIXTURES / "steer_checkpoint" / "model.safetensors"))
    assert "base_model.model.layers.0.steer_adapter.down.weight" in keys
    assert "base_model.model.layers.1.steer_adapters.vector.steer_adapter.vector" in keys


def test_save_pretrained_directory_of_format_2_loads():
    model = SteerModel.from_pretrained(tiny_causal_lm("llama"), FIXTURES / "steer_model")
    for name in NAMES[1:]:
        model.load_adapter(FIXTURES / "steer_model" / name, name)
    assert model.list_adapters() == NAMES
    got = outputs(model)
    assert_same(got["default"], expected("steer_default"))
    assert_same(got["mixed"], expected("steer_mixed"))


def test_trainer_checkpoint_of_format_2_loads_every_adapter():
    model = SteerModel.from_pretrained(tiny_causal_lm("llama"), FIXTURES / "steer_checkpoint")
    assert model.list_adapters() == NAMES
    assert model.steer_configs["default"].scale == 0.5
    assert model.steer_configs["vector"].layers == (1,)
    got = outputs(model)
    assert_same(got["default"], expected("steer_default"))
    assert_same(got["mixed"], expected("steer_mixed"))
    # What it holds now is named with the adapter segment, and saved as the current format.
    state = model.state_dict()
    assert "base_model.model.layers.0.steer_adapter.default.down.weight" in state
    assert "base_model.model.layers.1.steer_adapter.vector.vector" in state
    assert json.loads(bytes(state["_extra_state"].tolist()))["format_version"] == FORMAT_VERSION


def test_load_state_dict_of_format_2_resumes_training_state():
    """The Trainer's resume: load_state_dict of an old checkpoint into a model built alike."""
    loaded = SteerModel.from_pretrained(
        tiny_causal_lm("llama"), FIXTURES / "steer_checkpoint", is_trainable=True
    )
    fresh = SteerModel.from_pretrained(
        tiny_causal_lm("llama"), FIXTURES / "steer_model", is_trainable=True
    )
    for name in NAMES[1:]:
        fresh.add_adapter(name, loaded.steer_configs[name])
    state = load_file(str(FIXTURES / "steer_checkpoint" / "model.safetensors"))
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    got = outputs(fresh)
    assert_same(got["mixed"], expected("steer_mixed"))


def test_joint_model_files_of_format_2_load():
    pytest.importorskip("peft")
    from steer_fast import JointModel

    ids = random_input_ids(3, 7)
    for folder in ("joint_model", "joint_checkpoint"):
        joint = JointModel.from_pretrained(tiny_causal_lm("llama"), FIXTURES / folder)
        with torch.no_grad():
            assert_same(joint(input_ids=ids).logits, expected("joint"))
        assert "peft_model.base_model.model.model.layers.0.steer_adapter.default.down.weight" in (
            joint.state_dict()
        )
