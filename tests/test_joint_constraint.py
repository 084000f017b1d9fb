"""The constraints on a joint model: the down projection and the up-projection penalty and
projection layer by layer, JointTrainer's frequencies and logs, set_inference_mode, and configs
and files written before the constraint had a name."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, TrainingArguments

from steer_fast import JointModel, JointTrainer, OrthogonalityConfig, SteerConfig, get_joint_model
from steer_fast.joint.orthogonality import layer_penalty
from steer_fast.saving.state import decode_state, encode_state

from tiny_models import TokenDataset, random_input_ids, randomize_trainable, tiny_causal_lm

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
INPUT_IDS = random_input_ids(2, 7)
UP = OrthogonalityConfig(constraint="up_projection")


def build(orthogonality=None, seed=0, randomized=True):
    torch.manual_seed(seed)  # LoRA A's initialisation
    model = get_joint_model(
        tiny_causal_lm("llama"),
        SteerConfig(rank=4, activation="silu", bias=True, backend="torch"),
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS),
        orthogonality,
    )
    if randomized:  # both parts start at the identity: give them directions to compare
        randomize_trainable(model, seed=seed + 1)
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def lora_b(model, index, path):
    layer = model.get_base_model().model.layers[index].base_layer
    return layer.get_submodule(path).lora_B["default"].weight


def basis(*bs):
    """An orthonormal basis of span(B_1 ... B_k), in float64, computed here independently."""
    left, singular_values, _ = torch.linalg.svd(torch.cat(bs, 1).double(), full_matrices=False)
    return left[:, singular_values > 1e-9 * singular_values[0]]


# ----------------------------------------------------------------------------------------------
# The projection on a model
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "modules, paths",
    [(None, ["mlp.down_proj"]), (["self_attn.o_proj", "mlp.down_proj"], None)],
)
def test_apply_orthogonality_projects_every_down_projection_off_span_b(modules, paths):
    paths = paths or modules
    model = build(OrthogonalityConfig(modules=modules))
    downs = {index: adapter.down.weight for index, adapter in model.get_adapters().items()}
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    bases = {index: basis(*[lora_b(model, index, path) for path in paths]) for index in downs}
    assert all(b.shape[1] == 4 * len(paths) for b in bases.values())
    assert model.down_projection_overlap().item() > 0.1

    model.apply_orthogonality()
    for index, down in downs.items():
        adapter = model.get_adapters()[index]
        assert adapter.down.weight is down  # in place: optimizer state stays valid
        v = bases[index]
        after = down.detach().double()
        assert (after @ v).norm() <= 1e-6 * after.norm()
        # Only the component along span(V) changed.
        original = before[
            next(n for n in before if f"layers.{index}.steer_adapter.default.down" in n)
        ]
        complement = torch.eye(v.shape[0], dtype=torch.float64) - v @ v.T
        torch.testing.assert_close(
            after @ complement, original.double() @ complement, rtol=0, atol=1e-6
        )
    assert model.down_projection_overlap().item() < 1e-10
    # Nothing else moved: LoRA, U and the biases.
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and ".steer_adapter.default.down.weight" not in name:
            assert torch.equal(parameter, before[name]), name


def test_overlap_is_the_sum_over_layers_of_the_squared_norm_of_d_v():
    model = build()
    expected = sum(
        (adapter.down.weight.double() @ basis(lora_b(model, index, "mlp.down_proj"))).pow(2).sum()
        for index, adapter in model.get_adapters().items()
    )
    overlap = model.down_projection_overlap()
    assert overlap.dtype == torch.float32 and overlap.dim() == 0 and not overlap.requires_grad
    torch.testing.assert_close(overlap.double(), expected, rtol=1e-5, atol=0)
    # Zero B (LoRA's initialisation): span {0}, nothing to project, O = 0.
    fresh = build(randomized=False)
    down = fresh.get_adapters()[0].down.weight.detach().clone()
    assert fresh.down_projection_overlap().item() == 0
    fresh.apply_orthogonality()
    assert torch.equal(fresh.get_adapters()[0].down.weight, down)


# ----------------------------------------------------------------------------------------------
# The up-projection constraint on a model
# ----------------------------------------------------------------------------------------------


def test_penalty_on_a_model_is_differentiable_and_reaches_both_parts():
    assert build(UP, randomized=False).orthogonality_loss().item() == 0  # zero initialisations
    model = build(UP)
    penalty = model.orthogonality_loss()
    assert penalty.dtype == torch.float32 and penalty.dim() == 0 and penalty.item() > 0
    terms = []
    for index, adapter in model.get_adapters().items():
        bs = [lora_b(model, index, path) for path in ("self_attn.o_proj", "mlp.down_proj")]
        terms.append(layer_penalty(adapter.up.weight, bs, 1e-3))
    torch.testing.assert_close(penalty, sum(terms))
    penalty.backward()
    adapter = model.get_adapters()[1]
    assert adapter.up.weight.grad.abs().sum() > 0
    for path in ("self_attn.o_proj", "mlp.down_proj"):
        assert lora_b(model, 1, path).grad.abs().sum() > 0
    # Only U and the residual writers' B take part.
    layer = model.get_base_model().model.layers[1].base_layer
    assert adapter.down.weight.grad is None
    assert layer.self_attn.q_proj.lora_B["default"].weight.grad is None
    assert layer.self_attn.o_proj.lora_A["default"].weight.grad is None


def test_orthogonality_term_is_the_weighted_penalty_only_in_mode_penalty():
    for mode, weight in (("penalty", 0.5), ("project", 0.5), ("none", 0.5), ("penalty", 0.0)):
        model = build(OrthogonalityConfig(mode=mode, weight=weight))
        term = model.orthogonality_term()
        if mode == "penalty" and weight > 0:
            assert model.orthogonality_loss().item() > 0
            torch.testing.assert_close(term, weight * model.orthogonality_loss())
        else:
            assert term.item() == 0 and not term.requires_grad
    for other in (OrthogonalityConfig(), OrthogonalityConfig(constraint="none")):
        term = build(other).orthogonality_term()
        assert term.item() == 0 and not term.requires_grad


@pytest.mark.parametrize("mode", ["penalty", "none", "project"])
def test_apply_orthogonality_on_the_up_projection_projects_only_in_mode_project(mode):
    model = build(OrthogonalityConfig(mode=mode))
    before = model.orthogonality_loss().item()
    up = model.get_adapters()[0].up.weight
    down = model.get_adapters()[0].down.weight.detach().clone()
    model.apply_orthogonality()
    after = model.orthogonality_loss().item()
    assert torch.equal(model.get_adapters()[0].down.weight, down)  # D is not its concern
    if mode == "project":
        assert before > 0.1 and after < 1e-10
        assert model.get_adapters()[0].up.weight is up  # in place: optimizer state stays valid
    else:
        assert after == before


def test_constraint_none_projects_nothing():
    model = build(OrthogonalityConfig(constraint="none"))
    before = {name: p.detach().clone() for name, p in model.steering_named_parameters()}
    model.apply_orthogonality()
    for name, parameter in model.steering_named_parameters():
        assert torch.equal(parameter, before[name]), name


# ----------------------------------------------------------------------------------------------
# JointTrainer
# ----------------------------------------------------------------------------------------------


def arguments(output_dir, **overrides):
    settings = dict(
        output_dir=str(output_dir),
        max_steps=5,
        per_device_train_batch_size=4,  # 16 rows: 4 steps an epoch
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        report_to=[],
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**settings, **overrides})


def projection_steps(tmp_path, orthogonality, **overrides):
    """Train 5 steps; the (global step, epoch) of every apply_orthogonality call."""
    model = build(orthogonality)
    trainer = JointTrainer(
        model=model, args=arguments(tmp_path, **overrides), train_dataset=TokenDataset()
    )
    calls = []
    project = model.apply_orthogonality

    def counted():
        calls.append((trainer.state.global_step, trainer.state.epoch))
        project()

    model.apply_orthogonality = counted
    trainer.train()
    return [step for step, _ in calls], calls


@pytest.mark.parametrize(
    "frequency, expected",
    [
        ("step", [0, 1, 2, 3, 4]),
        (2, [0, 2, 4]),
        (3, [0, 3]),
        ("init", [0]),
        ("epoch", [0, 4]),
    ],
)
def test_trainer_projects_at_the_configured_frequency(tmp_path, frequency, expected):
    steps, calls = projection_steps(tmp_path, OrthogonalityConfig(frequency=frequency))
    assert steps == expected
    if frequency == "epoch":
        assert [epoch for _, epoch in calls] == [0, 1.0]  # at each epoch's start
    if frequency == "init":
        assert calls == [(0, 0)]  # before the first step: on_train_begin


def test_trainer_frequency_counts_optimizer_steps_under_gradient_accumulation(tmp_path):
    steps, _ = projection_steps(
        tmp_path,
        OrthogonalityConfig(frequency=2),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    assert steps == [0, 2, 4]


def test_trainer_keeps_the_up_projection_schedule(tmp_path):
    # Mode "project": once at the start, then after every optimizer step (global step not yet
    # incremented when on_optimizer_step runs).
    steps, _ = projection_steps(tmp_path, OrthogonalityConfig(mode="project"))
    assert steps == [0, 0, 1, 2, 3, 4]
    for config in (OrthogonalityConfig(mode="penalty"), OrthogonalityConfig(constraint="none")):
        assert projection_steps(tmp_path, config)[0] == []


class _Overlaps(TrainerCallback):
    """O at the start of each step (before JointTrainer's own callback) and at its end."""

    def __init__(self, model):
        self.model, self.begin, self.end = model, [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.begin.append(self.model.down_projection_overlap().item())

    def on_step_end(self, args, state, control, **kwargs):
        self.end.append(self.model.down_projection_overlap().item())


def train_logged(tmp_path, orthogonality, **overrides):
    model = build(orthogonality)
    trainer = JointTrainer(
        model=model, args=arguments(tmp_path, **overrides), train_dataset=TokenDataset()
    )
    overlaps = _Overlaps(model)
    trainer.add_callback(overlaps)  # runs after JointTrainer's: sees the projected weights
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return model, logs, overlaps


def test_logged_overlap_is_zero_right_after_every_step_projection(tmp_path):
    model, logs, overlaps = train_logged(tmp_path, OrthogonalityConfig(frequency="step"))
    assert len(logs) == 5
    for entry in logs:
        assert set(entry) >= {"task_loss", "down_projection_overlap"}
        assert entry["down_projection_overlap"] < 1e-10
        # P belongs to the up-projection constraint: not in this loss, not logged.
        assert "orthogonality_penalty" not in entry
    # The measure is not trivially zero: each optimizer step leaves an overlap behind.
    assert min(overlaps.end) > 1e-4
    assert overlaps.begin == pytest.approx([0.0] * 5, abs=1e-10)
    assert model.down_projection_overlap().item() == pytest.approx(overlaps.end[-1])


@pytest.mark.parametrize("orthogonality", [OrthogonalityConfig(frequency="init"), None])
def test_logged_overlap_is_the_model_s_averaged_over_the_logged_steps(tmp_path, orthogonality):
    orthogonality = orthogonality or OrthogonalityConfig(constraint="none")
    _, logs, overlaps = train_logged(tmp_path, orthogonality, max_steps=4, logging_steps=2)
    assert len(logs) == 2
    # No projection at step starts here: O at a step's start is the model's O after the last.
    measured = overlaps.begin
    assert measured[1] > 1e-4
    for entry, pair in zip(logs, (measured[0:2], measured[2:4]), strict=True):
        assert entry["down_projection_overlap"] == pytest.approx(sum(pair) / 2, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# set_inference_mode
# ----------------------------------------------------------------------------------------------


def test_set_inference_mode_runs_the_parts_it_names_and_restores():
    model = build()
    both = logits(model)
    with model.disable_steering():
        lora_only = logits(model)
    with model.peft_model.disable_adapter():
        steering_only = logits(model)
    assert not torch.equal(lora_only, both) and not torch.equal(steering_only, both)
    assert not torch.equal(lora_only, steering_only)
    expected = {"lora_only": lora_only, "adapter_only": steering_only, "all": both}
    for mode, reference in expected.items():
        with model.set_inference_mode(mode) as switch:
            assert switch.mode == mode
            assert torch.equal(logits(model), reference)
        assert torch.equal(logits(model), both)
    # At once, without a context; a context then restores that state, also after an error.
    model.set_inference_mode("adapter_only")
    assert torch.equal(logits(model), steering_only)
    with pytest.raises(RuntimeError, match="inside"), model.set_inference_mode("lora_only"):
        assert torch.equal(logits(model), lora_only)
        raise RuntimeError("inside")
    assert torch.equal(logits(model), steering_only)
    model.set_inference_mode("all")
    assert torch.equal(logits(model), both)
    for bad in ("lora", "ALL", None):
        with pytest.raises(ValueError, match="mode must be one of"):
            model.set_inference_mode(bad)
        assert torch.equal(logits(model), both)


# ----------------------------------------------------------------------------------------------
# Configs and files from before the constraint had a name
# ----------------------------------------------------------------------------------------------

FORMAT_1_ORTHOGONALITY = {
    "eps": 0.001,
    "mode": "project",
    "rank_tolerance": 1e-06,
    "residual_modules": None,
    "weight": 0.3,
}


def _as_format_1(values):
    return {**values, "format_version": 1, "orthogonality": FORMAT_1_ORTHOGONALITY}


def test_save_writes_format_2_with_the_constraint(tmp_path):
    config = OrthogonalityConfig(frequency=7, modules=["mlp.down_proj"])
    build(config).save_pretrained(tmp_path / "joint")
    saved = json.loads((tmp_path / "joint" / "joint_config.json").read_text())
    assert saved["format_version"] == 2
    assert saved["orthogonality"]["constraint"] == "down_projection"
    assert saved["orthogonality"]["frequency"] == 7
    loaded = JointModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "joint")
    assert loaded.orthogonality == config


def test_a_format_1_directory_loads_as_the_up_projection(tmp_path):
    model = build(OrthogonalityConfig(mode="project", weight=0.3))
    model.save_pretrained(tmp_path / "joint")
    path = tmp_path / "joint" / "joint_config.json"
    path.write_text(json.dumps(_as_format_1(json.loads(path.read_text())), indent=2))
    loaded = JointModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "joint")
    assert loaded.orthogonality == OrthogonalityConfig(
        constraint="up_projection", mode="project", weight=0.3
    )
    assert torch.equal(logits(loaded), logits(model))
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 3}))
    with pytest.raises(ValueError, match=r"format_version 3; .* reads 1\.\.2"):
        JointModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "joint")


def test_a_format_1_trainer_checkpoint_loads_and_resumes_as_the_up_projection(tmp_path):
    model = build(OrthogonalityConfig(mode="project", weight=0.3))
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    state["_extra_state"] = encode_state(_as_format_1(decode_state(state["_extra_state"], "")))
    save_file(state, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    loaded = JointModel.from_pretrained(tiny_causal_lm("llama"), checkpoint)
    assert loaded.orthogonality.constraint == "up_projection"
    assert (loaded.orthogonality.mode, loaded.orthogonality.weight) == ("project", 0.3)
    assert torch.equal(logits(loaded), logits(model))
    # What resume_from_checkpoint does: load_state_dict into a model built for the run.
    resumed = build(OrthogonalityConfig(mode="project", weight=0.3), seed=5)
    result = resumed.load_state_dict(load_file(str(checkpoint / "model.safetensors")), False)
    assert not result.unexpected_keys
    assert torch.equal(logits(resumed), logits(model))


# ----------------------------------------------------------------------------------------------
# Sites and steering vectors
# ----------------------------------------------------------------------------------------------


def joint_with(steer_config, orthogonality=None):
    torch.manual_seed(0)
    return get_joint_model(
        tiny_causal_lm("llama"),
        steer_config,
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS),
        orthogonality,
    )


def test_the_submodule_variant_constrains_the_mlp_adapter():
    """As the paper's code does with --submodules: D of the MLP site's adapter is projected."""
    model = joint_with(SteerConfig(rank=4, site=["attn", "mlp"], backend="torch"))
    with torch.no_grad():
        for _, parameter in model.lora_named_parameters():
            parameter.normal_(0, 0.2)
    attention = model.get_adapters("attn")
    attention_down = {i: adapter.down.weight.detach().clone() for i, adapter in attention.items()}
    assert model.down_projection_overlap().item() > 1e-8
    model.apply_orthogonality()
    assert model.down_projection_overlap().item() < 1e-12
    for index, adapter in model.get_adapters("mlp").items():
        down = adapter.down.weight.detach().double()
        assert (down @ basis(lora_b(model, index, "mlp.down_proj"))).norm() < 1e-6 * down.norm()
    for index, adapter in model.get_adapters("attn").items():
        assert torch.equal(adapter.down.weight, attention_down[index])  # not constrained


@pytest.mark.parametrize(
    "steer_overrides, match",
    [
        ({"rank": 0}, "rank=0"),
        ({"rank": 0, "site": ["attn", "mlp"]}, "rank=0"),
        ({"site": "attn"}, "site"),
    ],
)
@pytest.mark.parametrize("constraint", ["down_projection", "up_projection"])
def test_a_constraint_without_an_adapter_to_act_on_is_an_error(steer_overrides, match, constraint):
    base = tiny_causal_lm("llama")
    modules_before = [id(module) for module in base.modules()]
    with pytest.raises(ValueError, match=match):
        get_joint_model(
            base,
            SteerConfig(backend="torch", **steer_overrides),
            peft.LoraConfig(r=4, target_modules=TARGETS),
            OrthogonalityConfig(constraint=constraint),
        )
    assert [id(module) for module in base.modules()] == modules_before
    vectors = get_joint_model(
        base,
        SteerConfig(backend="torch", **steer_overrides),
        peft.LoraConfig(r=4, target_modules=TARGETS),
        OrthogonalityConfig(constraint="none"),
    )
    assert vectors.get_nb_trainable_parameters()[0] > 0
