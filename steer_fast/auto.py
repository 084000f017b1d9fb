"""``AutoSteerModelForCausalLM``: a saved adapter in, its base model with the adapter on it out,
in one call, as PEFT's ``AutoPeftModelForCausalLM`` does for PEFT adapters.

The adapter folder (or Hub repo, ``steer_fast.hub``) records its base model in
steer_config.json (``SteerConfig.base_model_name_or_path`` and ``revision``, filled in when the
adapter was put on a model; a JointModel's folder records it there too, and in PEFT's
adapter_config.json). ``from_pretrained`` reads and checks the adapter first, then loads that
base with ``transformers.AutoModelForCausalLM.from_pretrained(base, revision=..., **kwargs)``,
then puts the adapter on it: ``SteerModel.from_pretrained`` for a SteerModel's folder (its
top-level "default" adapter, as PEFT's Auto class loads the top one; ``load_adapter`` adds the
named ones from their subfolders), ``JointModel.from_pretrained`` for a JointModel's
(joint_config.json), so one Auto class loads whatever steer_fast saved. Trainer checkpoints of
either, in a local folder, load the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import SteerConfig
from .constants import CONFIG_NAME, JOINT_CONFIG_NAME, TRAINER_WEIGHTS_NAME
from .hub import is_hub_id, resolve_adapter
from .ops import BACKENDS
from .saving.state import check_is_trainable, read_trainer_checkpoint
from .saving.steering_files import has_steering_files, read_all_steering
from .steer_model import SteerModel

_ARGUMENT = "pretrained_model_name_or_path"


def _is_joint(directory: Path) -> bool:
    """Whether ``directory`` holds a JointModel's save (or Trainer checkpoint)."""
    if (directory / JOINT_CONFIG_NAME).is_file():
        return True
    if not directory.is_dir() or has_steering_files(directory):
        return False
    checkpoint = read_trainer_checkpoint(directory, "steer_fast model")
    return checkpoint is not None and "joint_type" in checkpoint[0]


def recorded_base(directory: Path) -> tuple[str | None, str | None, bool]:
    """(base_model_name_or_path, revision, is_joint) of the adapter saved in ``directory``, its
    files read and checked (ValueError if they are not a valid steer_fast adapter)."""
    if _is_joint(directory):
        from .joint.files import read_saved_joint

        saved = read_saved_joint(directory)
        steer: SteerConfig = saved.steer_config
        if steer.base_model_name_or_path is not None:
            return steer.base_model_name_or_path, steer.revision, True
        # A joint folder saved before steer_config.json recorded it: PEFT's record.
        lora = saved.lora_config
        return lora.base_model_name_or_path or None, lora.revision or None, True
    config = read_all_steering(directory)["default"][0]
    return config.base_model_name_or_path, config.revision, False


def _why_not_loaded(base: str, error: BaseException, local_files_only: bool) -> str:
    from huggingface_hub import constants

    if not is_hub_id(base) and not Path(base).is_dir():
        return (
            "it is a local path that is not a folder on this machine (the adapter was put on a "
            "model loaded from there)"
        )
    if local_files_only or constants.HF_HUB_OFFLINE:
        switch = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
        return f"it is not in the Hub cache ({constants.HF_HUB_CACHE}) and {switch}: {error}"
    return f"{type(error).__name__}: {error}"


class AutoSteerModelForCausalLM:
    """Loads a saved steer_fast adapter together with the base model it records, as PEFT's
    ``AutoPeftModelForCausalLM``::

        model = AutoSteerModelForCausalLM.from_pretrained("user/llama-french-steering")

    Not instantiated: use ``from_pretrained``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(
            "AutoSteerModelForCausalLM is not instantiated: use "
            "AutoSteerModelForCausalLM.from_pretrained(adapter_folder_or_repo_id)"
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        is_trainable: bool = False,
        backend: str | None = None,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        token: bool | str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Load the base model recorded in the adapter saved at
        ``pretrained_model_name_or_path`` (a folder or a Hub repo id) and put the adapter on it.

        Args:
            pretrained_model_name_or_path: a ``SteerModel`` / ``JointModel``
                ``save_pretrained`` folder, a Hub repo id of one, or a local Trainer checkpoint.
            is_trainable: as in ``SteerModel.from_pretrained``: False (PEFT's default) freezes
                the adapter and puts the model in eval mode.
            backend: overrides the saved steering backend ("torch" to run on the CPU).
            revision, subfolder: the adapter's revision and subfolder in its repo (as PEFT's
                Auto class takes them); the base model's revision is the one recorded.
            token, cache_dir, local_files_only: for the adapter's download and the base's.
            **kwargs: for the base's ``AutoModelForCausalLM.from_pretrained``: ``dtype``,
                ``device_map``, ``quantization_config``, ``attn_implementation``, ...

        Returns:
            a ``SteerModel``, or a ``JointModel`` for a JointModel's folder.

        Raises:
            ValueError: naming ``pretrained_model_name_or_path`` when the adapter cannot be had,
                records no base model, or records one that cannot be loaded (which, and why);
                as ``SteerModel.from_pretrained`` for an adapter that does not fit the base.
                Nothing is returned half-built.
        """
        check_is_trainable(is_trainable)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        hub = {"token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
        directory = resolve_adapter(
            pretrained_model_name_or_path, _ARGUMENT, revision=revision, subfolder=subfolder, **hub
        )
        # The same Hub settings for the base (transformers' defaults where they are unset).
        download = {key: value for key, value in hub.items() if value not in (None, False)}
        if not directory.is_dir():
            raise ValueError(f"{_ARGUMENT}: {directory} is not a directory")
        base, base_revision, joint = recorded_base(directory)
        if base is None:
            raise ValueError(
                f"{_ARGUMENT}: {directory} records no base model ({CONFIG_NAME} has no "
                "base_model_name_or_path: it was saved by an older steer_fast, or from a model "
                "built from a config, or is a Trainer checkpoint of one "
                f"({TRAINER_WEIGHTS_NAME})); load the base yourself and call "
                "SteerModel.from_pretrained(base, path), or set base_model_name_or_path in "
                f"its {CONFIG_NAME}"
            )
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                base, revision=base_revision, **download, **kwargs
            )
        except (OSError, ValueError) as error:
            at = f" (revision {base_revision!r})" if base_revision else ""
            raise ValueError(
                f"{_ARGUMENT}: the base model {base!r}{at} that {directory} records cannot be "
                f"loaded: {_why_not_loaded(base, error, local_files_only)}. To put the adapter "
                "on another copy of it: SteerModel.from_pretrained(AutoModelForCausalLM."
                "from_pretrained(<base>), <adapter>)"
            ) from error
        if joint:
            from .joint.model import JointModel

            return JointModel.from_pretrained(model, directory, is_trainable, backend)
        return SteerModel.from_pretrained(model, directory, is_trainable, backend)
