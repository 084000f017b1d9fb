"""Both overlap measures through a short joint training run, under each constraint.

A tiny Llama (hidden 32, 2 layers) learns a fixed random batch for 30 AdamW steps, with LoRA
(r=4) on q, v and the two residual writers (o_proj, down_proj) and a rank-4 post-block adapter
after each layer, from the same initialisation under every constraint. After 0, 10, 20 and 30
optimizer steps (after any projection) it measures the task loss,

    O = sum_l || D_l V_l ||_F^2          (the down-projection constraint's measure)
    P = sum_l || hat(U_l)^T hat(B_l) ||_F^2   (the up-projection constraint's measure)

The loop applies each constraint as JointTrainer does: the down projection at the start of
every optimizer step, the up-projection penalty in the loss, its projection after every step.

    python tests/test_joint_modes.py        # prints the table
"""

import peft
import torch

from steer_fast import OrthogonalityConfig, SteerConfig, get_joint_model

from tiny_models import random_input_ids, tiny_causal_lm

STEPS = 30
CHECKPOINTS = (0, 10, 20, 30)
RUNS = {
    "none": OrthogonalityConfig(constraint="none"),
    "down_projection (step)": OrthogonalityConfig(frequency="step"),
    "up_projection penalty (0.1)": OrthogonalityConfig(mode="penalty", weight=0.1),
    "up_projection penalty (1.0)": OrthogonalityConfig(mode="penalty", weight=1.0),
    "up_projection project": OrthogonalityConfig(mode="project"),
}


def run(orthogonality: OrthogonalityConfig, steps: int = STEPS) -> dict[int, tuple[float, ...]]:
    """Optimizer step -> (task loss, O, P) after that many steps."""
    torch.manual_seed(0)
    model = get_joint_model(
        tiny_causal_lm("llama"),
        SteerConfig(rank=4, activation="identity", bias=True, backend="torch"),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        ),
        orthogonality,
    )
    down_projection = orthogonality.constraint == "down_projection"
    input_ids = random_input_ids(4, 16, seed=7)
    optimizer = torch.optim.AdamW(model.parameter_groups(3e-2, 3e-2))
    model.train()
    measured = {}
    for step in range(steps + 1):
        if down_projection:  # frequency "step": at the start of every optimizer step
            model.apply_orthogonality()
        task = model(input_ids=input_ids, labels=input_ids).loss
        if step in CHECKPOINTS:
            overlap = model.down_projection_overlap().item()
            measured[step] = (task.item(), overlap, model.orthogonality_loss().item())
        if step == steps:
            break
        (task + model.orthogonality_term()).backward()
        optimizer.step()
        optimizer.zero_grad()
        if not down_projection:  # the up-projection's projection (mode "project") comes here
            model.apply_orthogonality()
    return measured


def table() -> str:
    header = "".join(f"{'O@' + str(s):>10}" for s in CHECKPOINTS)
    header += "".join(f"{'P@' + str(s):>10}" for s in CHECKPOINTS)
    lines = [f"{'constraint':<29}{header}   task loss 0 -> {STEPS}"]
    for name, orthogonality in RUNS.items():
        measured = run(orthogonality)
        overlaps = "".join(f"{measured[s][1]:>10.2e}" for s in CHECKPOINTS)
        penalties = "".join(f"{measured[s][2]:>10.2e}" for s in CHECKPOINTS)
        losses = f"   {measured[0][0]:.4f} -> {measured[STEPS][0]:.4f}"
        lines.append(f"{name:<29}{overlaps}{penalties}{losses}")
    return "\n".join(lines)


def test_measures_through_training_under_each_constraint():
    results = {name: run(orthogonality) for name, orthogonality in RUNS.items()}
    free = results["none"]
    for measured in results.values():
        assert measured[0][1] == 0 and measured[0][2] == 0  # LoRA's B starts at zero
        assert measured[STEPS][0] < measured[0][0] - 0.05  # every constraint learns
    # Left alone, the adapter comes to read and write what LoRA writes.
    assert free[STEPS][1] > 1e-3 and free[STEPS][2] > 1e-3
    # Each constraint holds its own measure down.
    assert all(overlap < 1e-8 for _, overlap, _ in results["down_projection (step)"].values())
    assert all(penalty < 1e-6 for _, _, penalty in results["up_projection project"].values())
    for weight in ("0.1", "1.0"):
        penalized = results[f"up_projection penalty ({weight})"]
        assert penalized[STEPS][2] < 0.1 * free[STEPS][2]
        assert penalized[STEPS][2] < penalized[10][2]  # pushed down as training goes on


if __name__ == "__main__":
    print(table())
