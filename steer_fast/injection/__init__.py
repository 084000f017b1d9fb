"""Putting steering on a transformers model and taking it off again.

- ``layers``: finding the model's decoder layers (``find_decoder_layers``);
- ``families``: the family table, how each decoder-layer class is run fused, and its residual
  writers;
- ``steered_block``: ``SteeredBlock``, the layer with its steering modules, in the layer's place;
- ``routing``: mixed batches, every row with its own adapter and strength;
- ``plan``: checking a config against a model and deciding each layer's path before anything is
  touched (``plan_steering``, ``plan_named_adapter``), then applying it (``inject_steering``,
  ``remove_steering``).
"""

from .layers import find_decoder_layers
from .plan import (
    NamedAdapterPlan,
    SteeringPlan,
    apply_named_adapter,
    apply_steering_plan,
    inject_steering,
    plan_named_adapter,
    plan_steering,
    remove_steering,
    steered_blocks,
)
from .steered_block import SteeredBlock

__all__ = [
    "NamedAdapterPlan",
    "SteeredBlock",
    "SteeringPlan",
    "apply_named_adapter",
    "apply_steering_plan",
    "find_decoder_layers",
    "inject_steering",
    "plan_named_adapter",
    "plan_steering",
    "remove_steering",
    "steered_blocks",
]
