"""SteerModel: a transformers model with post-block steering, in the manner of a PeftModel.

``get_steer_model(model, config)`` replaces each chosen decoder layer of ``model`` with a
``SteeredBlock`` (``steer_fast.injection.steered_block``) holding the original layer and a
``PostBlockAdapter``:

    out = h + s * (U phi(D h + b_d) + b_u)       h: the layer's output (after its skip add)

and freezes everything else. ``steer_fast.injection`` finds the layers and plans each one's path;
``steer_fast.saving`` writes and reads what ``save_pretrained`` and the Trainer save. Named
adapters and mixed batches come from ``NamedAdapterWrapper`` (``steer_fast.named_adapters``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from .config import SteerConfig
from .constants import (
    DEFAULT_ADAPTER_NAME,
    NAMED_ADAPTERS_KEY,
    PATH_FUSED,
    PATH_PLAIN,
    is_steering_parameter,
)
from .distributed import is_main_process as default_is_main_process
from .hub import resolve_adapter
from .injection import (
    SteeredBlock,
    apply_steering_plan,
    find_decoder_layers,
    plan_named_adapter,
    plan_steering,
    remove_steering,
    steered_blocks,
)
from .model_card import card_contents, save_with_model_card
from .named_adapters import NamedAdapterWrapper
from .push import PushToHubMixin
from .saving.state import (
    check_is_trainable,
    raise_if_different,
    structural_differences,
    with_backend,
)
from .saving.steering_files import read_all_steering, split_named_state


class SteerModel(NamedAdapterWrapper, PushToHubMixin):
    """A transformers model with post-block steering adapters, in the manner of a PeftModel.

    Build it with ``get_steer_model(model, config)``. Calls go to the wrapped model (``forward``
    with labels and all, ``generate``, and any attribute SteerModel does not have); only the
    adapters are trainable. ``state_dict()`` holds the adapters and the steer config (under
    "_extra_state"), not the frozen base weights, so that a transformers Trainer checkpoint of a
    SteerModel is an adapter checkpoint; ``base_model.state_dict()`` has everything. PEFT's
    verbs (``disable_adapter()``, ``print_trainable_parameters()``, ``unload()``, ...) work as
    in PEFT: see ``steer_fast.wrapper``. Further named adapters (``add_adapter``,
    ``load_adapter``, ``set_adapter``, ``delete_adapter``) and mixed batches
    (``adapter_names=`` and ``steering_scales=`` in forward and generate): see
    ``steer_fast.named_adapters``. ``save_pretrained`` writes a model card (README.md) too;
    ``push_to_hub`` uploads what it writes; ``from_pretrained`` and ``load_adapter`` take Hub
    repo ids (``steer_fast.hub``), and ``AutoSteerModelForCausalLM`` loads the base model too.

    Args:
        model: a transformers model (any module whose decoder layers
            ``steer_fast.injection.find_decoder_layers`` finds). It is modified in place;
            ``unload()`` gives it back as it was.
        config: the steering to apply.
    """

    wrapped_attribute = "base_model"

    def __init__(self, model: nn.Module, config: SteerConfig) -> None:
        super().__init__()
        plan = plan_steering(model, config)
        self._trainable_before = [p for p in model.parameters() if p.requires_grad]
        apply_steering_plan(model, plan)
        self.base_model = model
        self.steer_config = plan.config
        self.layers_name = plan.layers_name
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(is_steering_parameter(name))
        self._init_named_adapters()

    def get_base_model(self) -> nn.Module:
        """The wrapped model, steered blocks in place."""
        return self.base_model

    def _steered_blocks(self) -> dict[int, SteeredBlock]:
        blocks = steered_blocks(self.base_model)
        return {index: blocks[index] for index in sorted(blocks)}

    def _adapter_parameter_names(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if is_steering_parameter(name)}

    def print_trainable_parameters(self) -> None:
        """Print the parameter counts and how many layers take each path."""
        print(self._trainable_line())
        paths = self.steering_paths()
        counts = ", ".join(
            f"{sum(p == path for p in paths.values())} {path}" for path in (PATH_FUSED, PATH_PLAIN)
        )
        print(f"steered layers: {len(paths)} ({counts}); see steering_report()")

    def unload(self) -> nn.Module:
        """Take the steering off: the original layers go back in place and the parameters get
        back the requires_grad they had. Returns the wrapped model; this SteerModel is then
        empty."""
        model = self.base_model
        remove_steering(model)
        trainable = {id(p) for p in self._trainable_before}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in trainable)
        self._trainable_before = []
        del self.base_model
        return model

    # --- state -----------------------------------------------------------------------------

    def _saved_state(self) -> dict[str, Any]:
        state = self.steer_config.to_dict()
        named = [
            [name, config.to_dict()]
            for name, config in self.steer_configs.items()
            if name != DEFAULT_ADAPTER_NAME
        ]
        if named:
            state[NAMED_ADAPTERS_KEY] = named
        return state

    @staticmethod
    def _saved_steer_format(values: dict[str, Any]) -> object:
        return values.get("format_version")

    def _load_saved_state(self, values: dict[str, Any]) -> None:
        """Check a loaded state_dict's configs against the adapters loaded here (each adapter
        it holds must be loaded, with the same structure), then take over their scales. It runs
        before any of the state_dict's tensors is copied (the wrapper's own state comes first),
        so a failed check changes nothing."""
        saved, named = split_named_state(values)
        raise_if_different(structural_differences(saved, self.steer_config), "steering config")
        for name, config in named.items():
            if name not in self.steer_configs:
                raise ValueError(
                    f"state_dict: it holds adapter {name!r}, which this model has not loaded "
                    f"(loaded: {self.list_adapters()}); add_adapter() it with its config first, "
                    "or load the checkpoint with SteerModel.from_pretrained"
                )
            raise_if_different(
                structural_differences(config, self.steer_configs[name]),
                f"steering config of adapter {name!r}",
            )
        for name, config in {DEFAULT_ADAPTER_NAME: saved, **named}.items():
            self.set_scale(config.scale, adapter_name=name)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool | None = None,
        selected_adapters: Sequence[str] | None = None,
    ) -> None:
        """Write steer_config.json and steer_model.safetensors to ``save_directory``: the
        default adapter's at the top, every other adapter's in a subfolder of its name (as
        PEFT does); ``selected_adapters`` (default: all) chooses which. A model card, README.md
        (``steer_fast.model_card``), describes them; an existing README.md there is updated
        (its metadata merged, steer_fast's section rewritten), not replaced.

        The files are written to a new directory beside it, which then takes its place in one
        rename; other files in an existing ``save_directory`` are carried over. A failed save
        leaves an existing directory as it was.

        On several processes only the main one writes: ``is_main_process`` (PEFT's and
        transformers' argument), by default rank 0 of the default process group. Under FSDP2
        every process must call it, since the sharded adapters are gathered first.
        """
        files, written = self._adapter_files(selected_adapters)
        if not (default_is_main_process() if is_main_process is None else is_main_process):
            return
        contents = card_contents(self.base_model, {name: c for name, (c, _) in files.items()})
        save_with_model_card(
            save_directory,
            lambda staging: self._write_adapter_files(staging, files),
            written,
            contents,
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        save_directory: str | os.PathLike,
        is_trainable: bool = False,
        backend: str | None = None,
        **hub_kwargs: Any,
    ) -> SteerModel:
        """Steer ``model`` with the adapters saved in ``save_directory``: a folder, or a Hub repo
        id (``hub_kwargs``: ``revision``, ``subfolder``, ``token``, ``cache_dir``,
        ``local_files_only``; see ``steer_fast.hub``; a local folder that exists wins).

        ``save_directory`` is a ``save_pretrained`` directory, whose top-level (default)
        adapter is loaded (``load_adapter`` adds the others, from their subfolders, as in
        PEFT), or a transformers Trainer checkpoint of a SteerModel, whose adapters are all
        loaded under their names (the training state, as it was). Everything is checked before
        ``model`` is touched. With ``is_trainable=False`` the adapters are frozen and the model
        is put in eval mode.
        ``backend`` overrides the saved config's backend (e.g. "torch" to load on the CPU an
        adapter trained with backend="triton").

        Raises:
            ValueError: if the directory holds no valid adapter, or one saved for another
                hidden size or layer count; naming ``save_directory`` for a Hub repo that
                cannot be had (offline and not cached, not found).
        """
        check_is_trainable(is_trainable)
        directory = resolve_adapter(save_directory, "save_directory", **hub_kwargs)
        adapters = {
            name: (with_backend(config, backend), tensors)
            for name, (config, tensors) in read_all_steering(directory).items()
        }
        config, tensors = adapters.pop(DEFAULT_ADAPTER_NAME)
        if adapters:
            # The other adapters are checked against the model before the first is applied.
            plan_steering(model, config)
            layers_name, _ = find_decoder_layers(model)
            for named_config, _ in adapters.values():
                plan_named_adapter(model, layers_name, named_config)
        steered = cls(model, config)
        steered.load_steering_tensors(tensors)
        for name, (named_config, named_tensors) in adapters.items():
            steered._add_adapter(name, named_config)
            steered.load_steering_tensors(named_tensors, name)
        if not is_trainable:
            steered._freeze_for_inference()
        return steered


def get_steer_model(model: nn.Module, config: SteerConfig | None = None) -> SteerModel:
    """Steer ``model`` (in place) with ``config`` (default ``SteerConfig()``): see SteerModel."""
    return SteerModel(model, SteerConfig() if config is None else config)
