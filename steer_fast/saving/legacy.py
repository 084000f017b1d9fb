"""Saved state of format 2 and earlier: the state-dict keys it named steering parameters with.

Before format 3 a SteeredBlock kept the default adapter's modules in its own attributes and the
other adapters under ``steer_adapters``, so a state_dict named them

    {layers}.{index}.steer_adapter[_attn|_mlp].{tensor}                      the default adapter
    {layers}.{index}.steer_adapters.{name}.steer_adapter[_attn|_mlp].{tensor}  adapter ``name``

where format 3 names both ``{layers}.{index}.steer_adapter[_attn|_mlp].{name}.{tensor}``
(``steer_fast.constants``). save_pretrained directories never held these keys (their files key
tensors by layer and site), so only Trainer checkpoints and state_dicts of a SteerModel or
JointModel are affected: ``parse_legacy_steering_key`` reads a key of theirs, and
``upgrade_state_dict_keys`` renames the keys of a state_dict about to be loaded. Which naming a
state uses is told by the format version of the config it carries, never guessed from the keys.
"""

from __future__ import annotations

import re

from ..constants import (
    DEFAULT_ADAPTER_NAME,
    NAMED_KEYS_FORMAT_VERSION,
    SteeringKey,
    site_attribute,
)

_LEGACY_STEERING_KEY = re.compile(
    r"(?:^|\.)(\d+)\.(?:steer_adapters\.([A-Za-z0-9_-]+)\.)?steer_adapter(?:_(attn|mlp))?\."
    r"((?:down|up)\.(?:weight|bias)|vector)$"
)


def is_legacy_format(format_version: object) -> bool:
    """Whether a steer config of ``format_version`` comes with state-dict keys without the
    adapter-name segment (formats 1 and 2)."""
    return (
        isinstance(format_version, int)
        and not isinstance(format_version, bool)
        and format_version < NAMED_KEYS_FORMAT_VERSION
    )


def parse_legacy_steering_key(key: str) -> SteeringKey | None:
    """The layer index, site, adapter and tensor a format-2 state-dict ``key`` names, or None."""
    match = _LEGACY_STEERING_KEY.search(key)
    if match is None:
        return None
    index, adapter, site, tensor = match.groups()
    return SteeringKey(int(index), site or "block", adapter or DEFAULT_ADAPTER_NAME, tensor)


def upgraded_key(key: str) -> str:
    """A format-2 steering key renamed as format 3 names it (other keys as they are)."""
    match = _LEGACY_STEERING_KEY.search(key)
    if match is None:
        return key
    parsed = parse_legacy_steering_key(key)
    separator = "." if match.group(0).startswith(".") else ""
    renamed = f"{parsed.index}.{site_attribute(parsed.site)}.{parsed.adapter}.{parsed.tensor}"
    return key[: match.start()] + separator + renamed


def upgrade_state_dict_keys(state_dict: dict, prefix: str = "") -> None:
    """Rename, in place, the format-2 steering keys of ``state_dict`` under ``prefix`` (a
    load_state_dict pre-hook's view) to format 3's."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        renamed = prefix + upgraded_key(key[len(prefix) :])
        if renamed != key:
            state_dict[renamed] = state_dict.pop(key)
