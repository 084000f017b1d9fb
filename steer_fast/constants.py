"""The names steer_fast gives things, in one place: files, formats, adapters, state keys, sites,
and the one rule that names every steering parameter.

The naming rule. A steered decoder layer (a ``SteeredBlock``) keeps its steering modules in one
``nn.ModuleDict`` per site, keyed by adapter name, as PEFT keeps ``lora_A[adapter_name]``::

    {layers}.{index}.steer_adapter.{adapter}.{tensor}          site "block"
    {layers}.{index}.steer_adapter_attn.{adapter}.{tensor}     site "attn"
    {layers}.{index}.steer_adapter_mlp.{adapter}.{tensor}      site "mlp"

with ``tensor`` one of "down.weight", "down.bias", "up.weight", "up.bias" (rank >= 1) or "vector"
(rank 0), and the first adapter named "default". Every parameter and state-dict key of an
adapter therefore carries the adapter's name as a segment
(``...steer_adapter.default.down.weight``). Files written by ``save_pretrained`` hold one
adapter each and key its tensors by layer and site only (``steering_file_key``). Saved state of
format 2 and earlier named the default adapter's parameters without the segment;
``steer_fast.saving.legacy`` reads it.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

CONFIG_NAME = "steer_config.json"  # SteerConfig of one steering adapter
WEIGHTS_NAME = "steer_model.safetensors"  # its tensors, keyed by steering_file_key
TRAINER_WEIGHTS_NAME = "model.safetensors"  # what transformers.Trainer saves a state_dict as
JOINT_CONFIG_NAME = "joint_config.json"  # a JointModel's joint type and orthogonality config
PEFT_CONFIG_NAME = "adapter_config.json"  # PEFT's LoRA config (PeftConfig.save_pretrained)
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's LoRA tensors (PeftModel.save_pretrained)
MODEL_CARD_NAME = "README.md"  # the model card save_pretrained writes (huggingface_hub's ModelCard)
# The files of a save_pretrained folder that from_pretrained reads: what is downloaded from the Hub
# for a repo id (the folder's top, or a subfolder's).
HUB_ADAPTER_FILES: tuple[str, ...] = (
    CONFIG_NAME,
    WEIGHTS_NAME,
    JOINT_CONFIG_NAME,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
)

# ----------------------------------------------------------------------------------------------
# The Hub: the model card's metadata and the method it cites
# ----------------------------------------------------------------------------------------------

LIBRARY_NAME = "steer_fast"  # the model card's library_name
MODEL_CARD_TAGS: tuple[str, ...] = ("steer_fast", "activation-steering", "post-block-steering")
JOINT_MODEL_CARD_TAGS: tuple[str, ...] = ("lora", "peft")  # added for a JointModel's folder
PAPER_ARXIV_ID = "2603.00425"
PAPER_TITLE = "Weight Updates as Activation Shifts: A Principled Framework for Steering"
# The SteerConfig fields naming the base model an adapter was put on (PEFT's PeftConfig names);
# recorded, never compared on load.
BASE_MODEL_FIELDS: tuple[str, ...] = ("base_model_name_or_path", "revision")

# llama.cpp's control vectors (``--control-vector``, repeng's ``export_gguf``): a GGUF file of
# one f32 tensor "direction.<layer>" of the hidden size per steered decoder layer (0-based, added
# to that layer's output), with these metadata keys.
CONTROL_VECTOR_ARCHITECTURE = "controlvector"  # its general.architecture
GGUF_ARCHITECTURE_KEY = "general.architecture"
CONTROL_VECTOR_MODEL_HINT_KEY = "controlvector.model_hint"  # the model's model_type, a hint
CONTROL_VECTOR_LAYER_COUNT_KEY = "controlvector.layer_count"  # the number of direction tensors
CONTROL_VECTOR_TENSOR_PREFIX = "direction."

# ----------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------

STEER_TYPE = "post_block"
# The format of a steering adapter's saved state (steer_config.json, the state_dict's extra
# state): 2 added rank 0 (steering vectors), sites and the init option; 3 names every adapter's
# parameters with the adapter's name ("steer_adapter.default.down.weight"), the default's
# included.
FORMAT_VERSION = 3
# The first format whose state-dict keys carry the adapter name.
NAMED_KEYS_FORMAT_VERSION = 3
JOINT_TYPE = "lora+post_block"
# 2: the orthogonality config names its constraint (format 1: the up-projection constraint).
JOINT_FORMAT_VERSION = 2

# ----------------------------------------------------------------------------------------------
# Adapters and state keys
# ----------------------------------------------------------------------------------------------

# The name of the adapter a model is built with, as in PEFT.
DEFAULT_ADAPTER_NAME = "default"
# A row of a mixed batch that no adapter steers (PEFT's name for it).
BASE_ADAPTER_NAME = "__base__"
# An adapter name is a folder name and a module name: letters, digits, "_" and "-".
ADAPTER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
EXTRA_STATE_KEY = "_extra_state"  # nn.Module's key for get_extra_state()
# In a SteerModel's extra state: its adapters other than "default", as [name, config] pairs in
# the order they were loaded (the state's JSON sorts object keys); absent when it has none.
NAMED_ADAPTERS_KEY = "named_adapters"

# ----------------------------------------------------------------------------------------------
# Sites and paths
# ----------------------------------------------------------------------------------------------

# Where in a decoder layer steering is applied: after the block (its output, after the skip
# connection), or on the attention / MLP branch output before its residual add.
SITES: tuple[str, ...] = ("block", "attn", "mlp")
# How a steered layer runs: its own submodules with the final residual add fused into the
# steering op, or the layer as it is with its output steered.
PATH_FUSED = "fused"
PATH_PLAIN = "plain"

# ----------------------------------------------------------------------------------------------
# The naming rule
# ----------------------------------------------------------------------------------------------

# The SteeredBlock attribute holding each site's steering modules, by adapter name.
SITE_ATTRIBUTES: dict[str, str] = {
    "block": "steer_adapter",
    "attn": "steer_adapter_attn",
    "mlp": "steer_adapter_mlp",
}
# The tensors of one steering module, under the names its state_dict gives them.
STEERING_TENSORS: tuple[str, ...] = ("down.weight", "down.bias", "up.weight", "up.bias", "vector")

_SITE_GROUP = r"steer_adapter(?:_(attn|mlp))?"
_ADAPTER_GROUP = r"([A-Za-z0-9_-]+)"
_TENSOR_GROUP = r"((?:down|up)\.(?:weight|bias)|vector)"
_STEERING_PARAMETER = re.compile(rf"(?:^|\.){_SITE_GROUP}\.{_ADAPTER_GROUP}\.{_TENSOR_GROUP}$")
_STEERING_KEY = re.compile(rf"(?:^|\.)(\d+)\.{_SITE_GROUP}\.{_ADAPTER_GROUP}\.{_TENSOR_GROUP}$")


class SteeringKey(NamedTuple):
    """What a steering parameter's name says: layer ``index``, ``site``, ``adapter``, and
    ``tensor`` ("down.weight", ..., "vector")."""

    index: int
    site: str
    adapter: str
    tensor: str


def site_attribute(site: str) -> str:
    """The SteeredBlock attribute holding the steering modules of ``site``."""
    return SITE_ATTRIBUTES[site]


def is_steering_parameter(name: str) -> bool:
    """Whether the parameter (or state-dict key) called ``name``, in any enclosing module,
    belongs to a steering module."""
    return _STEERING_PARAMETER.search(name) is not None


def parse_steering_key(key: str) -> SteeringKey | None:
    """The layer index, site, adapter and tensor a state-dict ``key`` names (under any prefix),
    or None for a key that is not a steering parameter's."""
    match = _STEERING_KEY.search(key)
    if match is None:
        return None
    index, site, adapter, tensor = match.groups()
    return SteeringKey(int(index), site or "block", adapter, tensor)


def steering_file_key(index: int, site: str, tensor: str) -> str:
    """The steer_model.safetensors key of ``tensor`` ("down.weight", "vector", ...) of layer
    ``index``'s steering at ``site``: "layers.{index}.{tensor}" at "block" (the original
    layout), "layers.{index}.{site}.{tensor}" at "attn" and "mlp"."""
    return f"layers.{index}.{tensor}" if site == "block" else f"layers.{index}.{site}.{tensor}"
