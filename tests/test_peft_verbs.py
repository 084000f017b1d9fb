"""PEFT's verbs on SteerModel and JointModel: the switches, the counts, and the verbs that have
no meaning for steering (a clear error instead of the wrapped transformers model's method)."""

import re

import pytest
import torch
from peft import LoraConfig

from steer_fast import SteerConfig, get_joint_model, get_steer_model

from tiny_models import random_input_ids, randomize_trainable, tiny_causal_lm

INPUT_IDS = random_input_ids(2, 7)
STEER = dict(rank=4, activation="silu", backend="torch")
PEFT_LINE = re.compile(
    r"trainable params: [\d,]+.* \|\| all params: [\d,]+ \|\| trainable%: [\d.]+"
)


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def randomize(model, seed=0):
    randomize_trainable(model, seed)


def steer_model():
    base = tiny_causal_lm("llama")
    expected = logits(base)
    model = get_steer_model(base, SteerConfig(**STEER))
    randomize(model)
    return model, expected


def joint_model():
    base = tiny_causal_lm("llama")
    expected = logits(base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    model = get_joint_model(base, SteerConfig(**STEER), lora)
    randomize(model)
    return model, expected


MODELS = {"steer": steer_model, "joint": joint_model}


@pytest.mark.parametrize("kind", MODELS)
def test_disable_adapter_runs_the_base_model_and_restores(kind):
    model, expected = MODELS[kind]()
    adapted = logits(model)
    assert not torch.equal(adapted, expected)
    with model.disable_adapter():
        assert torch.equal(logits(model), expected)
    assert torch.equal(logits(model), adapted)
    # The previous state comes back, also when it was "off", and after an error inside.
    model.disable_adapter_layers()
    with pytest.raises(RuntimeError, match="inside"), model.disable_adapter():
        raise RuntimeError("inside")
    assert torch.equal(logits(model), expected)
    model.enable_adapter_layers()
    assert torch.equal(logits(model), adapted)


@pytest.mark.parametrize("kind", MODELS)
def test_transformers_switches_switch_now_and_back_as_context_managers(kind):
    model, expected = MODELS[kind]()
    adapted = logits(model)
    model.disable_adapters()
    assert torch.equal(logits(model), expected)
    with model.enable_adapters():
        assert torch.equal(logits(model), adapted)
    assert torch.equal(logits(model), expected)
    model.enable_adapters()
    with model.disable_adapters():
        assert torch.equal(logits(model), expected)
    assert torch.equal(logits(model), adapted)


def test_disable_steering_keeps_the_lora_part_of_a_joint_model():
    model, expected = joint_model()
    adapted = logits(model)
    with model.disable_steering():
        lora_only = logits(model)
    with model.peft_model.disable_adapter():
        with model.disable_steering():
            assert torch.equal(logits(model), expected)
        steering_only = logits(model)
    assert not torch.equal(lora_only, expected) and not torch.equal(lora_only, adapted)
    assert not torch.equal(steering_only, expected) and not torch.equal(steering_only, lora_only)
    assert torch.equal(logits(model), adapted)


@pytest.mark.parametrize("kind", MODELS)
def test_parameter_counts_are_peft_s(kind, capsys):
    model, _ = MODELS[kind]()
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert total == sum(p.numel() for p in model.parameters())
    model.print_trainable_parameters()
    first_line = capsys.readouterr().out.splitlines()[0]
    assert PEFT_LINE.fullmatch(first_line)
    assert f"{trainable:,d}" in first_line and f"{total:,d}" in first_line


@pytest.mark.parametrize(
    "kind, verb, match",
    [
        *(
            (kind, verb, "cannot be merged")
            for kind in MODELS
            for verb in ("merge_and_unload", "merge_adapter", "unmerge_adapter")
        ),
        # SteerModel holds named adapters (tests/test_named_adapters.py); a JointModel does not.
        *(
            ("joint", verb, "JointModel holds one steering adapter and one LoRA adapter")
            for verb in ("add_adapter", "load_adapter", "set_adapter", "delete_adapter")
        ),
    ],
)
def test_verbs_without_meaning_raise_and_change_nothing(kind, verb, match):
    model, _ = MODELS[kind]()
    adapted = logits(model)
    with pytest.raises(NotImplementedError, match=match):
        getattr(model, verb)("default")
    assert torch.equal(logits(model), adapted)
