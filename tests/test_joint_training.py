"""Training a JointModel: a plain loop with the model's own calls, and JointTrainer (penalty,
projection, logs, learning rates per part, gradient accumulation, checkpoints and resume)."""

import json
import math

import peft
import pytest
import torch
from safetensors import safe_open
from transformers import TrainingArguments

from steer_fast import JointModel, JointTrainer, OrthogonalityConfig, SteerConfig, get_joint_model

from tiny_models import (
    TokenDataset,
    enable_checkpointing,
    random_input_ids,
    randomize_trainable,
    tiny_causal_lm,
)

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def build(mode="penalty", weight=0.1, seed=0, family="llama"):
    torch.manual_seed(seed)  # LoRA A's initialisation
    return get_joint_model(
        tiny_causal_lm(family),
        SteerConfig(rank=4, activation="silu", bias=True, backend="torch"),
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS),
        OrthogonalityConfig(weight=weight, mode=mode),
    )


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def arguments(output_dir, **overrides):
    settings = dict(
        output_dir=str(output_dir),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**settings, **overrides})


def train_own_loop(model, steps, input_ids):
    optimizer = torch.optim.AdamW(model.parameter_groups(3e-2, 3e-2))
    model.train()
    history = []
    for _ in range(steps):
        task = model(input_ids=input_ids, labels=input_ids).loss
        (task + model.orthogonality_term()).backward()
        optimizer.step()
        optimizer.zero_grad()
        model.apply_orthogonality()
        history.append((task.item(), model.orthogonality_loss().item()))
    return history


def test_joint_training_lowers_the_loss_and_moves_both_parts():
    model = build()
    before = trainable_state(model)
    history = train_own_loop(model, 20, random_input_ids(4, 12, seed=3))
    assert history[-1][0] < 0.97 * history[0][0]
    assert all(later < earlier for (earlier, _), (later, _) in zip(history, history[5::5]))
    after = trainable_state(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(".lora_A." in name for name in changed)
    assert any(".lora_B." in name for name in changed)
    assert any(".steer_adapter.default.up." in name for name in changed)
    assert any(".steer_adapter.default.down." in name for name in changed)
    assert history[-1][1] > 0  # trained freely enough that the parts overlap somewhat


def test_project_mode_keeps_the_penalty_at_zero_through_training():
    model = build(mode="project")
    history = train_own_loop(model, 10, random_input_ids(4, 12, seed=3))
    assert all(penalty < 1e-6 for _, penalty in history)
    assert history[-1][0] < history[0][0]
    assert all(adapter.up.weight.abs().sum() > 0 for adapter in model.get_adapters().values())


def test_parameter_groups_give_each_part_its_learning_rate():
    model = build()
    groups = model.parameter_groups(1e-4, 5e-3, weight_decay=0.01)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("lora", 1e-4, 0.01),
        ("steering", 5e-3, 0.01),
    ]
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="steering learning rate"):
        model.parameter_groups(1e-4, -1.0)


def test_trainer_checkpoints_hold_both_parts_and_resume(tmp_path):
    uninterrupted = build()
    trainer = JointTrainer(
        model=uninterrupted,
        args=arguments(tmp_path / "a"),
        train_dataset=TokenDataset(),
        lora_learning_rate=1e-2,
        steer_learning_rate=4e-2,
    )
    trainer.train()
    final = trainable_state(uninterrupted)
    groups = trainer.optimizer.param_groups
    assert {(g["name"], g["lr"]) for g in groups} == {("lora", 1e-2), ("steering", 4e-2)}
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4  # every logging step
    for entry in logs:
        assert entry["steer_learning_rate"] == 4e-2 and entry["learning_rate"] == 1e-2
        assert entry["orthogonality_penalty"] >= 0
        # O belongs to the down-projection constraint: not logged under this one.
        assert "down_projection_overlap" not in entry
        expected = entry["task_loss"] + 0.1 * entry["orthogonality_penalty"]
        assert math.isclose(entry["loss"], expected, rel_tol=0, abs_tol=1e-4)
    assert logs[-1]["orthogonality_penalty"] > 0
    assert "eval_loss" in trainer.evaluate(TokenDataset(rows=4))

    checkpoint = tmp_path / "a" / "checkpoint-2"
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        state = json.loads(bytes(handle.get_tensor("_extra_state").tolist()))
    assert keys == {"_extra_state", *final}
    assert state["format_version"] == 2
    assert state["orthogonality"]["constraint"] == "up_projection"
    assert state["orthogonality"]["weight"] == 0.1
    assert state["steer_config"] == uninterrupted.steer_config.to_dict()

    resumed = build(seed=1)  # another LoRA initialisation: the resume must overwrite it
    JointTrainer(
        model=resumed,
        args=arguments(tmp_path / "b"),
        train_dataset=TokenDataset(),
        lora_learning_rate=1e-2,
        steer_learning_rate=4e-2,
    ).train(resume_from_checkpoint=str(checkpoint))
    after = trainable_state(resumed)
    for name in final:
        torch.testing.assert_close(after[name], final[name], rtol=1e-6, atol=1e-7)

    # A checkpoint loads with from_pretrained too.
    loaded = JointModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "a" / "checkpoint-4")
    input_ids = random_input_ids(2, 6)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, uninterrupted.eval()(input_ids).logits)


def test_trainer_in_project_mode_keeps_the_penalty_at_zero(tmp_path):
    model = build(mode="project")
    trainer = JointTrainer(model=model, args=arguments(tmp_path), train_dataset=TokenDataset())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    assert all(entry["orthogonality_penalty"] < 1e-6 for entry in logs)
    assert model.orthogonality_loss().item() < 1e-6
    assert all(entry["loss"] == pytest.approx(entry["task_loss"], abs=1e-4) for entry in logs)


def test_penalty_counts_once_per_step_under_gradient_accumulation(tmp_path):
    """Two micro-batches of 2 and one batch of 4 make the same updates, penalty included."""
    weight = 1.0
    results = []
    for batch, accumulation in ((4, 1), (2, 2)):
        model = build(weight=weight)
        trainer = JointTrainer(
            model=model,
            args=arguments(
                tmp_path / str(batch),
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                save_strategy="no",
            ),
            train_dataset=TokenDataset(),
        )
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        results.append((trainable_state(model), logs))
    (single, single_logs), (accumulated, accumulated_logs) = results
    for name in single:
        torch.testing.assert_close(accumulated[name], single[name], rtol=1e-4, atol=1e-6)
    for one, two in zip(single_logs, accumulated_logs, strict=True):
        assert two["loss"] == pytest.approx(one["loss"], abs=1e-4)
        assert two["orthogonality_penalty"] == pytest.approx(one["orthogonality_penalty"], rel=1e-4)
        expected = two["task_loss"] + weight * two["orthogonality_penalty"]
        assert two["loss"] == pytest.approx(expected, abs=1e-4)
    assert single_logs[-1]["orthogonality_penalty"] > 0


def test_trainer_rejects_bad_arguments(tmp_path):
    model = build()
    with pytest.raises(ValueError, match="JointModel"):
        JointTrainer(model=tiny_causal_lm("llama"), args=arguments(tmp_path))
    with pytest.raises(ValueError, match="lora_learning_rate"):
        JointTrainer(model=model, args=arguments(tmp_path), lora_learning_rate=-1e-3)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="ready-made optimizer"):
        JointTrainer(
            model=model,
            args=arguments(tmp_path),
            optimizers=(optimizer, None),
            steer_learning_rate=1e-3,
        )


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    model = build()
    randomize_trainable(model, seed=0)
    input_ids = random_input_ids(2, 8)

    def gradients():
        model.zero_grad()
        model.train()
        task = model(input_ids=input_ids, labels=input_ids).loss
        (task + model.orthogonality_term()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    expected = gradients()
    enable_checkpointing(model, use_reentrant=reentrant)
    checkpointed = gradients()
    for name, grad in expected.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


def test_both_learning_rates_are_logged_for_the_same_step(tmp_path):
    """Under a decaying schedule the two parts' logged rates are those of one optimizer step
    (the ratio of their peaks), not one step apart."""
    model = build()
    trainer = JointTrainer(
        model=model,
        args=arguments(tmp_path, lr_scheduler_type="linear", max_steps=4),
        train_dataset=TokenDataset(),
        lora_learning_rate=1e-2,
        steer_learning_rate=4e-2,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len({entry["learning_rate"] for entry in logs}) == len(logs)  # it decays
    for entry in logs:
        assert entry["steer_learning_rate"] == pytest.approx(4 * entry["learning_rate"], rel=1e-9)
