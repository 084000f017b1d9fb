"""get_joint_model: what it puts on the model, which modules enter the constraint, the penalty on
a real model, bad input that leaves the model untouched, unload, and the Triton path."""

import copy
import warnings

import peft
import pytest
import torch
from peft import LoraConfig

import steer_fast.injection.families as families
from steer_fast import (
    JointModel,
    OrthogonalityConfig,
    SteerConfig,
    get_joint_model,
    get_steer_model,
)

from tiny_models import (
    FAMILIES,
    HIDDEN_SIZE,
    NUM_LAYERS,
    decoder_layers,
    random_input_ids,
    randomize_trainable,
    tiny_causal_lm,
)

LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
INPUT_IDS = random_input_ids(2, 7)


def lora(**overrides):
    settings = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": LORA_TARGETS}
    return LoraConfig(**{**settings, **overrides})


def steer(**overrides):
    settings = {"rank": 4, "activation": "silu", "bias": True, "backend": "torch"}
    return SteerConfig(**{**settings, **overrides})


UP = OrthogonalityConfig(constraint="up_projection")


def joint(family="llama", lora_config=None, orthogonality=None, **steer_overrides):
    return get_joint_model(
        tiny_causal_lm(family), steer(**steer_overrides), lora_config or lora(), orthogonality
    )


def randomize(model, seed=0, std=0.2):
    """N(0, std^2) values for every trainable parameter (both parts start as the identity)."""
    randomize_trainable(model, seed, std)


def logits(model, input_ids=INPUT_IDS):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def fingerprint(model):
    """Everything a failed call must leave as it was."""
    return {
        "modules": [(name, id(module), type(module)) for name, module in model.named_modules()],
        "requires_grad": [(name, p.requires_grad) for name, p in model.named_parameters()],
        "state": {key: value.clone() for key, value in model.state_dict().items()},
        "attributes": sorted(vars(model)),
        "hooks": [
            (name, len(module._forward_hooks), len(module._forward_pre_hooks))
            for name, module in model.named_modules()
        ],
    }


def assert_untouched(model, before):
    after = fingerprint(model)
    assert after["modules"] == before["modules"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["attributes"] == before["attributes"]
    assert after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def test_both_parts_are_on_the_model_and_only_they_train(capsys):
    base = tiny_causal_lm("llama")
    expected = logits(base)
    model = get_joint_model(base, steer(), lora(), OrthogonalityConfig(weight=0.5))
    assert isinstance(model, JointModel)
    assert model.get_base_model() is base
    assert isinstance(model.peft_model, peft.PeftModel)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lora_names = {name for name, _ in model.lora_named_parameters()}
    steering_names = {name for name, _ in model.steering_named_parameters()}
    assert trainable == lora_names | steering_names and not lora_names & steering_names
    assert all(".lora_A." in name or ".lora_B." in name for name in lora_names)
    assert len(lora_names) == 2 * len(LORA_TARGETS) * NUM_LAYERS
    assert len(steering_names) == 4 * NUM_LAYERS
    assert set(model.steering_paths().values()) == {"fused"}
    lora_size = sum(p.numel() for _, p in model.lora_named_parameters())
    steering_size = sum(p.numel() for _, p in model.steering_named_parameters())
    model.print_trainable_parameters()
    assert f"(lora: {lora_size:,d}, steering: {steering_size:,d})" in capsys.readouterr().out
    assert model.get_nb_trainable_parameters()[0] == lora_size + steering_size
    # Both start as the identity (LoRA B = 0, U = 0): the base model's logits, exactly.
    assert torch.equal(logits(model), expected)
    # Calls and attributes go through to the model.
    assert model.config is base.config
    with pytest.raises(AttributeError):
        model.no_such_attribute  # noqa: B018


def test_constrained_modules_follow_the_constraint():
    # The default, the down-projection constraint: the MLP writer's LoRA B.
    model = joint()
    assert model.constrained_modules() == {
        index: [f"model.layers.{index}.mlp.down_proj"] for index in range(NUM_LAYERS)
    }
    report = model.orthogonality_report().splitlines()
    assert report[0] == "orthogonality: constraint='down_projection', frequency=100"
    assert report[1] == (
        "layer 0: D 4x32 projected off span(B) of model.layers.0.mlp.down_proj (B 32x4)"
    )
    # The up-projection constraint: the residual writers LoRA adapts.
    model = joint(orthogonality=UP)
    assert model.constrained_modules() == {
        index: [f"model.layers.{index}.self_attn.o_proj", f"model.layers.{index}.mlp.down_proj"]
        for index in range(NUM_LAYERS)
    }
    report = model.orthogonality_report()
    assert report.startswith("orthogonality: constraint='up_projection', mode='penalty'")
    assert "layer 0: U 32x4 against model.layers.0.self_attn.o_proj (B 32x4)" in report
    # No constraint: nothing constrained, both measures still there.
    model = joint(orthogonality=OrthogonalityConfig(constraint="none"))
    assert model.constrained_modules() == {0: [], 1: []}
    assert "constraint='none'" in model.orthogonality_report()
    randomize(model)
    assert model.orthogonality_loss().item() > 0 and model.down_projection_overlap().item() > 0


@pytest.mark.parametrize("orthogonality", [None, UP])
def test_lora_on_q_and_v_only_makes_the_constraint_vacuous(orthogonality):
    with pytest.warns(RuntimeWarning, match="vacuous"):
        model = joint(
            lora_config=lora(target_modules=["q_proj", "v_proj"]), orthogonality=orthogonality
        )
    randomize(model)
    assert model.constrained_modules() == {0: [], 1: []}
    assert model.orthogonality_loss().item() == 0
    assert model.down_projection_overlap().item() == 0
    assert "the constraint is vacuous" in model.orthogonality_report()
    before = {name: p.clone() for name, p in model.steering_named_parameters()}
    model.apply_orthogonality()
    for name, parameter in model.steering_named_parameters():
        assert torch.equal(parameter, before[name]), name
    for unused in (OrthogonalityConfig(mode="none"), OrthogonalityConfig(constraint="none")):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no constraint used: no warning
            joint(lora_config=lora(target_modules=["q_proj", "v_proj"]), orthogonality=unused)


def test_residual_modules_and_modules_override_the_table():
    model = joint(
        lora_config=lora(target_modules=["o_proj", "down_proj"]),
        orthogonality=OrthogonalityConfig(residual_modules=["mlp.down_proj"]),
    )
    assert model.orthogonality.constraint == "up_projection"  # what residual_modules meant
    assert model.constrained_modules()[1] == ["model.layers.1.mlp.down_proj"]
    model = joint(orthogonality=OrthogonalityConfig(modules=["self_attn.o_proj", "mlp.down_proj"]))
    assert model.constrained_modules()[1] == [
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
    ]


# The family table by layer class.
FAMILY_ROWS = {row.layer_class: row for row in families.FAMILIES}
# The leaf names that make LoRA adapt exactly the table's residual writers of each family.
RESIDUAL_LEAVES = {
    "gpt2": ["c_proj"],
    "gpt_neox": ["dense", "dense_4h_to_h"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_writer_table_covers_the_families(family):
    layer_class = type(decoder_layers(tiny_causal_lm(family), family)[0]).__name__
    paths = FAMILY_ROWS[layer_class].residual_writers
    targets = RESIDUAL_LEAVES.get(family, [path.rsplit(".", 1)[1] for path in paths])
    model = joint(family, lora_config=lora(target_modules=targets), orthogonality=UP)
    layers_name = model.layers_name
    assert model.constrained_modules() == {
        index: [f"{layers_name}.{index}.{path}" for path in paths] for index in range(NUM_LAYERS)
    }
    randomize(model, seed=1)
    model.train()
    output = model(input_ids=INPUT_IDS, labels=INPUT_IDS)
    (output.loss + model.orthogonality_loss()).backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    # The default constraint takes the row's MLP writer.
    mlp_writer = FAMILY_ROWS[layer_class].mlp_writer
    model = joint(family, lora_config=lora(target_modules=targets))
    assert model.constrained_modules() == {
        index: [f"{layers_name}.{index}.{mlp_writer}"] for index in range(NUM_LAYERS)
    }
    randomize(model, seed=1)
    assert model.down_projection_overlap().item() > 0
    model.apply_orthogonality()
    assert model.down_projection_overlap().item() < 1e-10


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gpt2", "gpt_neox"])
def test_the_mlp_writer_adds_straight_into_the_residual_stream(family):
    """What the table claims: a change to the writer's output is a change of the layer output."""
    model = tiny_causal_lm(family)
    layer = decoder_layers(model, family)[0]
    paths = FAMILY_ROWS[type(layer).__name__].residual_writers
    writer = layer.get_submodule(paths[-1])
    outputs = []
    layer.register_forward_hook(
        lambda module, args, out: outputs.append(out[0] if isinstance(out, tuple) else out)
    )
    shift = torch.randn(HIDDEN_SIZE)
    logits(model)
    handle = writer.register_forward_hook(lambda module, args, output: output + shift)
    logits(model)
    handle.remove()
    change = outputs[1] - outputs[0]
    torch.testing.assert_close(change, shift.expand_as(change), rtol=0, atol=1e-5)


def residual(paths):
    return OrthogonalityConfig(residual_modules=paths)


def modules(paths):
    return OrthogonalityConfig(modules=paths)


def _with(**changes):
    """A default config with fields changed after construction (checked again on use)."""
    config = OrthogonalityConfig()
    for name, value in changes.items():
        setattr(config, name, value)
    return config


def _bad_inputs():
    orthogonality_weight = OrthogonalityConfig()
    orthogonality_weight.weight = -1.0  # changed after construction: checked again
    orthogonality_mode = OrthogonalityConfig(mode="penalty")
    orthogonality_mode.mode = "soft"
    orthogonality_frequency = _with(frequency=0)
    inference = lora()
    inference.inference_mode = True
    return [
        ("lora_config must be a peft.LoraConfig", {"lora_config": {"r": 4}}),
        (
            "lora_config must be a peft.LoraConfig",
            {"lora_config": peft.IA3Config(target_modules=["o_proj"], feedforward_modules=[])},
        ),
        # PEFT's own error for targets that match nothing.
        ("not found in the base model", {"lora_config": lora(target_modules=["no_such_module"])}),
        ("not found in the base model", {"lora_config": lora(target_modules=r".*\.attn\.c_attn")}),
        ("not found in the base model", {"lora_config": lora(layers_to_transform=[7])}),
        ("inference_mode", {"lora_config": inference}),
        ("weight", {"orthogonality": orthogonality_weight}),
        ("mode", {"orthogonality": orthogonality_mode}),
        ("frequency must be", {"orthogonality": orthogonality_frequency}),
        ("mode configures the up_projection", {"orthogonality": _with(mode="project")}),
        ("OrthogonalityConfig", {"orthogonality": "penalty"}),
        ("out of range", {"steer_config": steer(layers=[7])}),
        ("SteerConfig", {"steer_config": {"rank": 4}}),
        ("writes 64 features", {"orthogonality": residual(["mlp.up_proj"])}),
        ("names no module", {"orthogonality": residual(["mlp.w2"])}),
        ("orthogonality.modules must name", {"orthogonality": modules(["mlp.up_proj"])}),
        ("modules .* names no module", {"orthogonality": modules(["mlp.w2"])}),
        # Found once PEFT has adapted the model: put back as it was all the same.
        (
            r"orthogonality.modules names \['self_attn.o_proj'\], which LoRA adapts in no",
            {
                "orthogonality": modules(["self_attn.o_proj", "mlp.down_proj"]),
                "lora_config": lora(target_modules=["q_proj", "down_proj"]),
            },
        ),
        # PEFT itself raises after it has adapted q_proj: put back as it was all the same.
        ("not supported", {"lora_config": lora(target_modules=["q_proj", "input_layernorm"])}),
    ]


@pytest.mark.parametrize("match, arguments", _bad_inputs())
def test_bad_input_raises_and_leaves_the_model_untouched(match, arguments):
    base = tiny_causal_lm("llama")
    base.model.embed_tokens.weight.requires_grad_(False)  # a mix of flags to keep
    before = fingerprint(base)
    call = {"steer_config": steer(), "lora_config": lora(), "orthogonality": None, **arguments}
    with pytest.raises(ValueError, match=match):
        get_joint_model(base, **call)
    assert_untouched(base, before)
    assert not hasattr(base, "peft_config")


def test_unknown_family_needs_residual_modules_or_modules(monkeypatch):
    monkeypatch.delitem(families._BY_LAYER_CLASS, "LlamaDecoderLayer")
    base = tiny_causal_lm("llama")
    before = fingerprint(base)
    cases = ((None, "OrthogonalityConfig\\(modules="), (UP, "residual_modules"))
    for orthogonality, field in cases:
        with pytest.raises(ValueError, match=field):
            get_joint_model(base, steer(), lora(), orthogonality)
        assert_untouched(base, before)
    with pytest.warns(UserWarning, match="reported as 0"):
        model = get_joint_model(base, steer(), lora(), OrthogonalityConfig(mode="none"))
    assert model.constrained_modules() == {0: [], 1: []}
    named = get_joint_model(
        tiny_causal_lm("llama"),
        steer(),
        lora(),
        OrthogonalityConfig(residual_modules=["self_attn.o_proj", "mlp.down_proj"]),
    )
    assert len(named.constrained_modules()[0]) == 2
    named = get_joint_model(
        tiny_causal_lm("llama"), steer(), lora(), OrthogonalityConfig(modules=["mlp.down_proj"])
    )
    assert named.constrained_modules()[0] == ["model.layers.0.mlp.down_proj"]
    assert named.orthogonality_loss().item() == 0  # P's residual writers are unknown here


def test_mixtral_needs_modules_for_the_down_projection():
    """Mixtral's row has no MLP writer (its experts are fused 3-D parameters)."""
    base = tiny_causal_lm("mixtral")
    before = fingerprint(base)
    lora_config = lora(target_modules=["q_proj", "o_proj"])
    with pytest.raises(ValueError, match=r"no MLP writer .* OrthogonalityConfig\(modules="):
        get_joint_model(base, steer(), lora_config)
    assert_untouched(base, before)
    model = get_joint_model(base, steer(), lora_config, modules(["self_attn.o_proj"]))
    assert model.constrained_modules() == {
        index: [f"model.layers.{index}.self_attn.o_proj"] for index in range(NUM_LAYERS)
    }


def test_models_that_already_have_adapters_are_refused():
    peft_model = peft.get_peft_model(tiny_causal_lm("llama"), lora())
    for model in (peft_model, peft_model.get_base_model()):
        with pytest.raises(ValueError, match="adapters|PeftModel"):
            get_joint_model(model, steer(), lora())
    steered = get_steer_model(tiny_causal_lm("llama"), steer())
    for model in (steered, steered.base_model):
        with pytest.raises(ValueError, match="adapters|SteerModel"):
            get_joint_model(model, steer(), lora())
    with pytest.raises(ValueError, match="JointModel"):
        get_joint_model(joint(), steer(), lora())


def test_the_callers_lora_config_is_not_modified():
    config = lora()
    before = config.to_dict()
    joint(lora_config=config)
    assert config.to_dict() == before


def test_unload_gives_back_the_model_as_it_was():
    base = tiny_causal_lm("llama")
    base.lm_head.weight.requires_grad_(False)
    before = fingerprint(base)
    expected = logits(base)
    model = get_joint_model(base, steer(), lora())
    randomize(model)
    assert not torch.equal(logits(model), expected)
    with model.disable_adapters():
        assert torch.equal(logits(model), expected)
    assert model.unload() is base
    assert_untouched(base, before)
    assert not hasattr(base, "peft_config")
    assert torch.equal(logits(base), expected)
    with pytest.raises(AttributeError, match="unloaded"):
        model.peft_model  # noqa: B018
    get_joint_model(base, steer(), lora())  # and it can be adapted again


@pytest.mark.parametrize("family, path", [("llama", "fused"), ("gpt2", "plain")])
def test_triton_path_agrees_with_the_torch_path(family, path, device, kernel_launches):
    """Triton (the interpreter on the CPU) and torch steering in a joint model: same logits,
    same gradients of task loss + penalty."""
    base = tiny_causal_lm(family).to(device)
    twin = copy.deepcopy(base)
    targets = ["c_proj", "c_attn"] if family == "gpt2" else LORA_TARGETS
    models = [
        get_joint_model(model, steer(backend=backend), lora(target_modules=targets))
        for model, backend in ((base, "triton"), (twin, "torch"))
    ]
    assert set(models[0].steering_paths().values()) == {path}
    input_ids = random_input_ids(1, 6).to(device)
    results = []
    for model in models:
        randomize(model, seed=3)
        model.train()
        output = model(input_ids=input_ids, labels=input_ids)
        (output.loss + model.orthogonality_term()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((output.logits.detach(), grads))
    assert kernel_launches == {"forward": NUM_LAYERS, "backward": NUM_LAYERS}  # Triton side only
    (triton_logits, triton_grads), (torch_logits, torch_grads) = results
    torch.testing.assert_close(triton_logits, torch_logits, rtol=1e-5, atol=1e-5)
    assert triton_grads.keys() == torch_grads.keys()
    for name, grad in triton_grads.items():
        torch.testing.assert_close(grad, torch_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_generate_decodes_greedily_with_both_parts(task_type):
    model = joint(lora_config=lora(task_type=task_type))
    randomize(model, seed=4)
    model.eval()
    input_ids = random_input_ids(1, 5)
    tokens = model.generate(input_ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = input_ids
    for _ in range(4):
        with torch.no_grad():
            next_token = model(input_ids=expected, use_cache=False).logits[:, -1].argmax(-1)
        expected = torch.cat([expected, next_token[:, None]], 1)
    assert torch.equal(tokens, expected)
