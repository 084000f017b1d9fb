"""JointModel: PEFT LoRA and post-block steering on one model, kept apart by a constraint.

``get_joint_model(model, steer_config, lora_config, orthogonality)`` puts two adapters on one
transformers model, in this order:

1. LoRA, by PEFT itself (``peft.get_peft_model``), on the modules ``lora_config`` names: a
   weight update W x -> W x + (alpha / r) B A x;
2. a post-block adapter after each chosen decoder layer, by steer_fast: an activation update
   h -> h + s * (U phi(D h + b_d) + b_u).

Both train; the base model stays frozen. ``orthogonality`` defines the constraint that keeps
them apart. The default is the paper's: at the start of optimizer steps (every step,
every N steps, each epoch or once), each layer's adapter down-projection D_l is projected off
the column space of the LoRA B of the layer's MLP down projection,

    D_l <- D_l (I - V_l V_l^T),      V_l an orthonormal basis of span(B_l),

so that the adapter reads nothing the weight update writes. steer_fast's own alternative
(``constraint="up_projection"``) keeps the adapter's up-projection U_l away from the B of the
layer's residual writers, by a penalty P = sum_l || hat(U_l)^T hat(B_l) ||_F^2 in the loss or by
a projection after each optimizer step.

``trainer.JointTrainer`` is a transformers Trainer that applies the constraint at its frequency
(or adds the penalty), logs both measures, and gives the two parts their own learning rates.
``save_pretrained`` writes PEFT's adapter files, steer_fast's and a joint config into one folder
(``files``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch import nn

from ..config import SteerConfig
from ..constants import (
    JOINT_CONFIG_NAME,
    JOINT_FORMAT_VERSION,
    JOINT_TYPE,
    PEFT_WEIGHTS_NAME,
    is_steering_parameter,
)
from ..distributed import is_main_process as default_is_main_process
from ..hub import resolve_adapter
from ..injection import apply_steering_plan, remove_steering
from ..model_card import save_with_model_card
from ..push import PushToHubMixin
from ..saving.state import (
    check_is_trainable,
    raise_if_different,
    structural_differences,
    with_backend,
    write_tensors,
)
from ..saving.steering_files import write_steering_files
from ..shims import peft_adapter_layers_enabled
from ..wrapper import SteeringWrapper, full_tensor
from .constraint import LORA_ADAPTER_NAME, OrthogonalityConstraint
from .files import (
    JOINT_FILES,
    KeyMap,
    check_joint_values,
    joint_card_contents,
    lora_config_dict,
    lora_differences,
    peft_config_to_save,
    read_saved_joint,
)
from .modes import InferenceMode, refusal
from .orthogonality import OrthogonalityConfig
from .parameter_groups import part_parameter_groups
from .plan import ModelSnapshot, plan_joint


class JointModel(SteeringWrapper, PushToHubMixin):
    """A transformers model with PEFT LoRA and post-block steering, trained together.

    Build it with ``get_joint_model``. ``peft_model`` is the PeftModel holding the LoRA part;
    the transformers model inside it (``get_base_model()``) has the LoRA layers and, in place of
    each steered decoder layer, a SteeredBlock. Calls go to ``peft_model`` (``forward`` with
    labels and all, ``generate``, and any attribute JointModel does not have). The trainable
    parameters are those PEFT makes trainable (the LoRA part) and the steering adapters; the
    base model is frozen. PEFT's switches (``disable_adapter()``, ``disable_adapter_layers()``,
    ...) act on both parts; ``disable_steering()`` on the steering part alone;
    ``set_inference_mode("lora_only" | "adapter_only" | "all")`` picks the parts that run.

    ``state_dict()`` holds both adapters and the configs (under "_extra_state"), not the base
    weights, so that a transformers Trainer checkpoint of a JointModel is an adapter checkpoint
    that ``resume_from_checkpoint`` and ``JointModel.from_pretrained`` restore.

    Args:
        model: a transformers model without adapters; modified in place (``unload()`` gives it
            back as it was).
        steer_config: the steering to apply.
        lora_config: the LoRA to apply (a ``peft.LoraConfig``; not modified).
        orthogonality: the constraint between the two (default ``OrthogonalityConfig()``: the
            down-projection constraint on the MLP down projection's LoRA B, every step).

    Raises:
        ValueError: for bad input (see ``plan_joint``; PEFT's own errors for a LoRA config that
            does not fit the model), with the model left as it was.
    """

    wrapped_attribute = "peft_model"

    def __init__(
        self,
        model: nn.Module,
        steer_config: SteerConfig,
        lora_config: LoraConfig,
        orthogonality: OrthogonalityConfig | None = None,
    ) -> None:
        super().__init__()
        plan = plan_joint(model, steer_config, lora_config, orthogonality)
        snapshot = ModelSnapshot(model)
        try:
            peft_model = get_peft_model(model, plan.lora_config, adapter_name=LORA_ADAPTER_NAME)
            lora_parameters = {id(p) for p in model.parameters() if p.requires_grad}
            apply_steering_plan(model, plan.steering)
            constraint = OrthogonalityConstraint(model, plan)
        except BaseException:
            snapshot.restore()
            raise
        self._requires_grad_before = snapshot.requires_grad
        self.peft_model = peft_model
        self.steer_config = plan.steering.config
        self.orthogonality = plan.orthogonality
        self.layers_name = plan.steering.layers_name
        self.constraint = constraint
        self.key_map = KeyMap(self.layers_name, set(constraint.layers))
        # By name, which stays valid when the parameters are moved or converted.
        self._lora_parameter_names = {
            name for name, parameter in self.named_parameters() if id(parameter) in lora_parameters
        }
        constraint.warn_if_vacuous(self.steer_config.hidden_size)

    def get_base_model(self) -> nn.Module:
        """The transformers model, LoRA layers and steered blocks in place."""
        return self.peft_model.get_base_model()

    @property
    def lora_config(self) -> LoraConfig:
        """The LoRA config as PEFT holds it."""
        return self.peft_model.peft_config[LORA_ADAPTER_NAME]

    # --- the two parts ---------------------------------------------------------------------

    def _steered_blocks(self):
        return {index: layer.block for index, layer in self.constraint.layers.items()}

    def _adapter_parameter_names(self) -> set[str]:
        steering = {name for name, _ in self.named_parameters() if is_steering_parameter(name)}
        return steering | self._lora_parameter_names

    def lora_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The LoRA part: the parameters PEFT made trainable (LoRA A and B, and whatever else
        the LoRA config trains), with their names in this model."""
        return [(n, p) for n, p in self.named_parameters() if n in self._lora_parameter_names]

    def steering_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The steering part: every post-block adapter's D, U and biases."""
        return [(n, p) for n, p in self.named_parameters() if is_steering_parameter(n)]

    def parameter_groups(
        self,
        lora_learning_rate: float,
        steer_learning_rate: float,
        weight_decay: float = 0.0,
        decay_parameter_names: set[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups, one per part, each with its own learning rate::

            torch.optim.AdamW(model.parameter_groups(2e-4, 1e-3))

        Frozen parameters (``from_pretrained(..., is_trainable=False)``) are left out; each
        group has a "name" ("lora", "steering"). With ``decay_parameter_names`` (the Trainer's
        ``get_decay_parameter_names``), each part is split into a group with ``weight_decay``
        (those names) and one without; otherwise every group gets ``weight_decay``.
        """
        return part_parameter_groups(
            {
                "lora": (lora_learning_rate, self.lora_named_parameters()),
                "steering": (steer_learning_rate, self.steering_named_parameters()),
            },
            weight_decay,
            decay_parameter_names,
        )

    def print_trainable_parameters(self) -> None:
        """Print the parameter counts, per part."""
        lora = sum(p.numel() for _, p in self.lora_named_parameters() if p.requires_grad)
        steering = sum(p.numel() for _, p in self.steering_named_parameters() if p.requires_grad)
        print(self._trainable_line(f" (lora: {lora:,d}, steering: {steering:,d})"))

    # --- PEFT's switches act on both parts -------------------------------------------------

    def _adapter_layer_state(self) -> Any:
        return self._steering_state(), peft_adapter_layers_enabled(self.get_base_model())

    def _set_adapter_layers(self, enabled: bool) -> None:
        self._set_parts(steering=enabled, lora=enabled)

    def _set_parts(self, steering: bool, lora: bool) -> None:
        self._set_steering(steering)
        self._set_lora(lora)

    def _set_lora(self, enabled: bool) -> None:
        tuner = self.peft_model.base_model
        tuner.enable_adapter_layers() if enabled else tuner.disable_adapter_layers()

    def _restore_adapter_layer_state(self, state: Any) -> None:
        steering, lora_enabled = state
        self._restore_steering(steering)
        self._set_lora(lora_enabled)

    # --- which parts run ------------------------------------------------------------------

    def set_inference_mode(self, mode: str) -> InferenceMode:
        """Run with "lora_only" (steering off), "adapter_only" (LoRA off) or "all" (both on).

        The switch happens at once; used as a context manager (``with
        model.set_inference_mode("lora_only"): ...``) it puts the previous state back on exit.

        Raises:
            ValueError: for another mode (nothing is switched).
        """
        return InferenceMode(self, mode)

    # --- the constraint --------------------------------------------------------------------

    def constrained_modules(self) -> dict[int, list[str]]:
        """Steered-layer index -> the LoRA-adapted modules whose B matrices enter the active
        constraint (paths in the model without steering): ``modules`` (default the MLP writer)
        for "down_projection", the residual writers for "up_projection", none for "none". An
        empty list under a constraint: it is vacuous in that layer."""
        return self.constraint.modules()

    def orthogonality_report(self) -> str:
        """The active constraint's settings, then one line per steered layer: the shapes that
        enter it, or why none."""
        return self.constraint.report()

    def _device(self) -> torch.device:
        reference = next(self.get_base_model().parameters(), None)
        return reference.device if reference is not None else torch.device("cpu")

    def orthogonality_loss(self) -> torch.Tensor:
        """P = sum_l || hat(U_l)^T hat(B_l) ||_F^2 (``steer_fast.orthogonality``; B_l: the LoRA
        B of layer l's residual writers), unweighted, in fp32, on the model's device;
        differentiable with respect to every U_l and B. Computed whatever the constraint (only
        ``constraint="up_projection"`` in mode "penalty" trains on it)."""
        return self.constraint.penalty(self._device())

    def down_projection_overlap(self) -> torch.Tensor:
        """O = sum_l || D_l V_l ||_F^2 (V_l: an orthonormal basis of the column space of layer
        l's LoRA B for ``modules``), in fp32, on the model's device, without gradient. Zero right
        after ``apply_orthogonality()`` under the down-projection constraint; computed whatever
        the constraint."""
        return self.constraint.down_overlap(self._device())

    def orthogonality_term(self) -> torch.Tensor:
        """What the constraint adds to the training loss: ``weight * orthogonality_loss()`` for
        the up-projection constraint in mode "penalty", a zero scalar (nothing computed)
        otherwise."""
        config = self.orthogonality
        if config.constraint != "up_projection" or config.mode != "penalty" or config.weight == 0:
            return torch.zeros((), dtype=torch.float32, device=self._device())
        return config.weight * self.orthogonality_loss()

    def apply_orthogonality(self) -> None:
        """Apply the constraint's projection now, in place (fp32, cast back), so that optimizer
        state stays valid:

        - "down_projection": D_l <- D_l (I - V_l V_l^T) for every steered layer. A training loop
          of one's own calls it at the start of each optimizer step that the frequency names
          (before the forward pass), as JointTrainer does;
        - "up_projection" in mode "project": U_l <- U_l - Q Q^T U_l, Q an orthonormal basis of
          span(B_l); a loop calls it after each optimizer step;
        - otherwise nothing.
        """
        config = self.orthogonality
        if config.constraint == "down_projection":
            self.constraint.project_down()
        elif config.constraint == "up_projection" and config.mode == "project":
            self.constraint.project_up()

    # --- unload ----------------------------------------------------------------------------

    def unload(self) -> nn.Module:
        """Take both adapters off: the original layers and modules go back in place (no LoRA
        merged) and the parameters get back the requires_grad they had. Returns the model; this
        JointModel is then empty."""
        model = self.get_base_model()
        # Steering first: PEFT's unload takes any module with a ``base_layer`` for one of its own.
        remove_steering(model)
        self.peft_model.unload()
        for parameter, flag in self._requires_grad_before:
            parameter.requires_grad_(flag)
        self._requires_grad_before = []
        self.constraint.layers = {}
        del self.peft_model
        return model

    # --- state -----------------------------------------------------------------------------

    def _joint_values(self) -> dict[str, Any]:
        return {
            "joint_type": JOINT_TYPE,
            "format_version": JOINT_FORMAT_VERSION,
            "orthogonality": self.orthogonality.to_dict(),
        }

    def _saved_state(self) -> dict[str, Any]:
        return {
            **self._joint_values(),
            "steer_config": self.steer_config.to_dict(),
            "lora_config": lora_config_dict(self.lora_config),
        }

    @staticmethod
    def _saved_steer_format(values: dict[str, Any]) -> object:
        steer = values.get("steer_config")
        return steer.get("format_version") if isinstance(steer, dict) else None

    def _load_saved_state(self, values: dict[str, Any]) -> None:
        check_joint_values(values, "the saved JointModel state")
        steer = SteerConfig.from_dict(values["steer_config"])
        differing = structural_differences(steer, self.steer_config, "steer ")
        differing.update(lora_differences(values["lora_config"], self.lora_config))
        raise_if_different(differing, "joint model")
        self.set_scale(steer.scale)

    # SteerModel's verbs, refused here rather than reaching the transformers model's namesakes.

    add_adapter = refusal("add_adapter")
    load_adapter = refusal("load_adapter")
    set_adapter = refusal("set_adapter")
    delete_adapter = refusal("delete_adapter")

    def _lora_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT's adapter state dict, with the keys of the model without steering."""
        state = get_peft_model_state_dict(self.peft_model, adapter_name=LORA_ADAPTER_NAME)
        return {
            self.key_map.to_saved(key): full_tensor(tensor.detach()).to("cpu").clone().contiguous()
            for key, tensor in state.items()
        }

    def save_pretrained(
        self, save_directory: str | os.PathLike, is_main_process: bool | None = None
    ) -> None:
        """Write both parts to ``save_directory`` (see ``steer_fast.joint.files``): PEFT's
        adapter_config.json and adapter_model.safetensors (``peft.PeftModel.from_pretrained``
        loads the LoRA part alone), steer_fast's steer_config.json and steer_model.safetensors,
        and joint_config.json with the orthogonality settings; and a model card, README.md
        (``steer_fast.model_card``: an existing one is updated, not replaced).

        The files are written to a new directory beside it, which then takes its place in one
        rename; other files in an existing ``save_directory`` are carried over. A failed save
        leaves an existing directory as it was. On several processes only the main one writes
        (``is_main_process``, by default rank 0); under FSDP2 every process must call it, since
        the sharded tensors are gathered first.
        """
        lora_tensors = self._lora_tensors()
        steering_tensors = self.steering_tensors()
        if not (default_is_main_process() if is_main_process is None else is_main_process):
            return
        peft_config, auto_mapping = peft_config_to_save(
            self.lora_config, self.get_base_model(), self.steer_config
        )
        joint_text = json.dumps(self._joint_values(), indent=2, sort_keys=True) + "\n"

        def write(staging: Path) -> None:
            write_tensors(lora_tensors, staging / PEFT_WEIGHTS_NAME)
            peft_config.save_pretrained(str(staging), auto_mapping_dict=auto_mapping)
            write_steering_files(staging, self.steer_config, steering_tensors)
            (staging / JOINT_CONFIG_NAME).write_text(joint_text, encoding="utf-8")

        save_with_model_card(save_directory, write, JOINT_FILES, joint_card_contents(self))

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        save_directory: str | os.PathLike,
        is_trainable: bool = False,
        backend: str | None = None,
        **hub_kwargs: Any,
    ) -> JointModel:
        """Put the LoRA and steering saved in ``save_directory`` on ``model``.

        ``save_directory`` is a ``save_pretrained`` directory, a Hub repo id of one
        (``hub_kwargs``: ``steer_fast.hub.HubKwargs``) or a transformers Trainer checkpoint of
        a JointModel. Everything that can be checked before ``model`` is touched
        is; if loading the weights fails afterwards, ``model`` is put back as it was. With
        ``is_trainable=False`` (PEFT's default) both parts are frozen and the model is put in
        eval mode. ``backend`` overrides the saved steering backend.

        Raises:
            ValueError: if the directory holds no valid joint adapter, or one that does not fit
                ``model``.
        """
        check_is_trainable(is_trainable)
        saved = read_saved_joint(resolve_adapter(save_directory, "save_directory", **hub_kwargs))
        snapshot = ModelSnapshot(model) if isinstance(model, nn.Module) else None
        steer_config = with_backend(saved.steer_config, backend)
        joint = cls(model, steer_config, saved.lora_config, saved.orthogonality)
        try:
            saved.load_into(joint)
        except BaseException:
            snapshot.restore()
            raise
        if not is_trainable:
            joint._freeze_for_inference()
        return joint


def get_joint_model(
    model: nn.Module,
    steer_config: SteerConfig,
    lora_config: LoraConfig,
    orthogonality: OrthogonalityConfig | None = None,
) -> JointModel:
    """Put PEFT LoRA (``lora_config``) and post-block steering (``steer_config``) on ``model``,
    in place, kept apart by ``orthogonality`` (default ``OrthogonalityConfig()``): see
    JointModel. Only the two adapters are trainable."""
    return JointModel(model, steer_config, lora_config, orthogonality)
