"""What the paper published, for the report to set beside the measured numbers: its claims, its
ListOps accuracies and the setup they were measured in.

Source: the authors' blog post, "Weight updates as activation shifts" (SprocketLab, 2025-11-26;
github.com/SprocketLab/SprocketLab.github.io, _posts/2025-11-26-actvweight.md), Table 1
(``images/blogposts/actvweight/table_1b.png``: 1B-parameter models), the ListOps column; its
appendix "Implementation details" for the setup; the abstract of the paper (Adila, Cooper et
al., "Weight Updates as Activation Shifts: A Principled Framework for Steering", arXiv
2603.00425) for the claims.
"""

from __future__ import annotations

# Test accuracy (%) on ListOps, Table 1, by our method names: SFT = full, ReFT = loreft (the
# better of its two swept positions), "Ours r=8 (nonlinear)" = steer_silu, "Ours r=8 (linear)"
# = steer_identity, "Ours vector" = steer_vector.
PUBLISHED_LISTOPS: dict[str, dict[str, float]] = {
    "Llama-3.2-1B": {
        "full": 66.2,
        "lora": 65.3,
        "loreft": 64.1,
        "steer_silu": 65.3,
        "steer_identity": 65.5,
        "steer_vector": 64.9,
    },
    "gemma-3-1b": {
        "full": 65.8,
        "lora": 65.0,
        "loreft": 55.7,
        "steer_silu": 63.3,
        "steer_identity": 65.3,
        "steer_vector": 54.6,
    },
}
PUBLISHED_SOURCE = (
    "the authors' blog post (SprocketLab, 2025-11-26), Table 1 (1B models), ListOps column"
)

# The paper's setup for those numbers, beside which the report puts the measured one.
PAPER_SETUP: dict[str, str] = {
    "models": "Llama-3.2-1B and gemma-3-1b (about 1.2B and 1.0B parameters)",
    "data": "listops-64 (expressions of up to 64 tokens; fengyang0317/listops-64)",
    "training": "one epoch over the whole listops-64 training split, batch 8 x 2",
    "rates": "5 learning rates per method, the best on validation (LoReFT: then 2 positions)",
    "seeds": "not stated in the post",
}

# The claims, each as (claim, method, compared with, kind): "close" means within about a point
# of the other; "better" means above the best of the others. A compared method stands for its
# reported row (loreft: the validation-chosen position; joint_orth: its per-part rates).
CLAIMS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    (
        "post-block steering is within 0.2-0.9 points of full fine-tuning (abstract)",
        "steer_silu",
        ("full",),
        "close",
    ),
    (
        "linear post-block steering gets close to full fine-tuning (Table 1)",
        "steer_identity",
        ("full",),
        "close",
    ),
    ("post-block steering outperforms LoRA (abstract)", "steer_silu", ("lora",), "better"),
    (
        "post-block steering outperforms ReFT (abstract)",
        "steer_silu",
        ("loreft",),
        "better",
    ),
    (
        "linear post-block steering outperforms ReFT at the same parameter budget (blog)",
        "steer_identity",
        ("loreft",),
        "better",
    ),
    (
        "joint adaptation often surpasses weight and activation updates in isolation "
        "(here: the better of LoRA and post-block steering on the task)",
        "joint_orth",
        ("lora", "steer_silu"),
        "better",
    ),
)
PAPER_TRAINABLE_PERCENT = 0.04


def published_difference(model: str, method: str, others: tuple[str, ...]) -> float | None:
    """The published ListOps difference (points) between ``method`` and the best of
    ``others`` on ``model``, or None when the table lacks one of them."""
    table = PUBLISHED_LISTOPS[model]
    if method not in table or any(o not in table for o in others):
        return None
    return table[method] - max(table[o] for o in others)
