"""Joint adaptation: PEFT LoRA and post-block steering on one model (see ``.model``).

- ``orthogonality``: the constraints' maths and ``OrthogonalityConfig`` (no PEFT needed);
- ``plan``: every check before the model is touched, and the snapshot that undoes a failed
  change;
- ``constraint``: the orthogonality constraint, layer by layer;
- ``files``: PEFT's files beside steer_fast's, and Trainer checkpoints;
- ``modes``: which parts run (InferenceMode), and the SteerModel verbs a JointModel refuses;
- ``model``: JointModel and get_joint_model;
- ``trainer``: JointTrainer (imports transformers' Trainer, so it is not imported here).

The modules that need PEFT load on first use of what they define, so that ``import steer_fast``
(which exports ``OrthogonalityConfig``) imports neither PEFT nor transformers.
"""

import importlib
from typing import Any

from ..constants import JOINT_CONFIG_NAME, JOINT_FORMAT_VERSION, JOINT_TYPE
from .orthogonality import OrthogonalityConfig

_LAZY_EXPORTS = {
    "JointModel": "model",
    "get_joint_model": "model",
    "JointPlan": "plan",
    "plan_joint": "plan",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        module = importlib.import_module(f".{_LAZY_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'steer_fast.joint' has no attribute {name!r}")


__all__ = [
    "JOINT_CONFIG_NAME",
    "JOINT_FORMAT_VERSION",
    "JOINT_TYPE",
    "JointModel",
    "JointPlan",
    "OrthogonalityConfig",
    "get_joint_model",
    "plan_joint",
]
