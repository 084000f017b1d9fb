"""Joint adaptation: PEFT LoRA and post-block steering on one model (see ``.model``).

- ``plan``: every check before the model is touched, and the snapshot that undoes a failed
  change;
- ``constraint``: the orthogonality constraint, layer by layer;
- ``files``: PEFT's files beside steer_fast's, and Trainer checkpoints;
- ``model``: JointModel and get_joint_model;
- ``trainer``: JointTrainer (imports transformers' Trainer, so it is not imported here).
"""

from .files import JOINT_CONFIG_NAME, JOINT_FORMAT_VERSION, JOINT_TYPE
from .model import JointModel, get_joint_model
from .plan import JointPlan, plan_joint

__all__ = [
    "JOINT_CONFIG_NAME",
    "JOINT_FORMAT_VERSION",
    "JOINT_TYPE",
    "JointModel",
    "JointPlan",
    "get_joint_model",
    "plan_joint",
]
