"""steer_fast: fused Triton kernels for post-block activation steering.

After a decoder block, h (the block output, after its skip connection) becomes

    out = h + s * (U phi(D h + b_d) + b_u)      D: r x d, U: d x r

with the base model frozen and only D, U and the biases trained.
"""

from .activations import ACTIVATIONS
from .adapter import PostBlockAdapter
from .config import SteerConfig
from .model import SteerModel, get_steer_model
from .ops import post_block_steer, resolve_backend

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "PostBlockAdapter",
    "SteerConfig",
    "SteerModel",
    "get_steer_model",
    "post_block_steer",
    "resolve_backend",
    "__version__",
]
