"""The penalty through a short joint training run, in each orthogonality mode.

A tiny Llama (hidden 32, 2 layers) learns a fixed random batch for 30 AdamW steps, with LoRA
(r=4) on q, v and the two residual writers (o_proj, down_proj) and a rank-4 post-block adapter
after each layer, from the same initialisation in every mode. P is measured after 0, 10, 20 and
30 optimizer steps (after the projection in mode "project").

    python tests/test_joint_modes.py        # prints the table
"""

import peft
import torch

from steer_fast import OrthogonalityConfig, SteerConfig, get_joint_model

from tiny_models import random_input_ids, tiny_causal_lm

STEPS = 30
CHECKPOINTS = (0, 10, 20, 30)
RUNS = (("none", 0.0), ("penalty", 0.1), ("penalty", 1.0), ("project", 0.0))


def run(mode: str, weight: float, steps: int = STEPS) -> dict[int, tuple[float, float]]:
    """Optimizer step -> (task loss, P) after that many steps."""
    torch.manual_seed(0)
    model = get_joint_model(
        tiny_causal_lm("llama"),
        SteerConfig(rank=4, activation="identity", backend="torch"),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        ),
        OrthogonalityConfig(mode=mode, weight=weight),
    )
    input_ids = random_input_ids(4, 16, seed=7)
    optimizer = torch.optim.AdamW(model.parameter_groups(3e-2, 3e-2))
    model.train()
    measured = {}
    for step in range(steps + 1):
        task = model(input_ids=input_ids, labels=input_ids).loss
        if step in CHECKPOINTS:
            measured[step] = (task.item(), model.orthogonality_loss().item())
        if step == steps:
            break
        (task + model.orthogonality_term()).backward()
        optimizer.step()
        optimizer.zero_grad()
        model.apply_orthogonality()
    return measured


def table() -> str:
    lines = ["mode (weight)    " + "".join(f"{'P@' + str(s):>11}" for s in CHECKPOINTS)]
    lines[0] += "   task loss 0 -> 30"
    for mode, weight in RUNS:
        measured = run(mode, weight)
        name = f"{mode} ({weight})" if mode == "penalty" else mode
        penalties = "".join(f"{measured[s][1]:>11.3e}" for s in CHECKPOINTS)
        losses = f"   {measured[0][0]:.4f} -> {measured[STEPS][0]:.4f}"
        lines.append(f"{name:<17}{penalties}{losses}")
    return "\n".join(lines)


def test_penalty_through_training_in_each_mode():
    results = {(mode, weight): run(mode, weight) for mode, weight in RUNS}
    free = results["none", 0.0]
    projected = results["project", 0.0]
    for measured in results.values():
        assert measured[0][1] == 0  # both parts start at zero
        assert measured[STEPS][0] < measured[0][0] - 0.05  # every mode learns
    assert free[STEPS][1] > 1e-3  # left alone, the two parts come to overlap
    assert all(penalty < 1e-6 for _, penalty in projected.values())
    for weight in (0.1, 1.0):
        penalized = results["penalty", weight]
        assert penalized[STEPS][1] < 0.1 * free[STEPS][1]
        assert penalized[STEPS][1] < penalized[10][1]  # pushed down as training goes on


if __name__ == "__main__":
    print(table())
