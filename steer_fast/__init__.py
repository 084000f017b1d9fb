"""steer_fast: fused Triton kernels for post-block activation steering.

After a decoder block, h (the block output, after its skip connection) becomes

    out = h + s * (U phi(D h + b_d) + b_u)      D: r x d, U: d x r

with the base model frozen and only D, U and the biases trained.
"""

import importlib
from typing import Any

from .auto import AutoSteerModelForCausalLM
from .config import SteerConfig
from .constants import BASE_ADAPTER_NAME
from .control_vector import load_control_vector
from .hub import HubKwargs
from .injection import find_decoder_layers
from .joint.orthogonality import OrthogonalityConfig
from .modules import PostBlockAdapter, SteeringVector
from .ops import ACTIVATIONS, resolve_backend
from .ops.multi_adapter_steer import multi_adapter_steer
from .ops.post_block_steer import post_block_steer
from .ops.steering_vector import steering_vector
from .steer_model import SteerModel, get_steer_model

__version__ = "0.1.0"

# Joint LoRA + steering needs PEFT (steer_fast.joint) and transformers' Trainer
# (steer_fast.joint.trainer): they are imported on first use, so that importing steer_fast stays
# light.
_LAZY_EXPORTS = {
    "JointModel": "joint",
    "get_joint_model": "joint",
    "JointTrainer": "joint.trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        module = importlib.import_module(f".{_LAZY_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'steer_fast' has no attribute {name!r}")


__all__ = [
    "ACTIVATIONS",
    "AutoSteerModelForCausalLM",
    "BASE_ADAPTER_NAME",
    "HubKwargs",
    "JointModel",
    "JointTrainer",
    "OrthogonalityConfig",
    "PostBlockAdapter",
    "SteerConfig",
    "SteerModel",
    "SteeringVector",
    "find_decoder_layers",
    "get_joint_model",
    "get_steer_model",
    "load_control_vector",
    "multi_adapter_steer",
    "post_block_steer",
    "resolve_backend",
    "steering_vector",
    "__version__",
]
