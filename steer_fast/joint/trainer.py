"""JointTrainer: training a JointModel with the transformers Trainer.

``JointTrainer`` applies the orthogonality constraint (the down-projection projection at the
start of the optimizer steps its frequency names; for the up-projection constraint, the penalty
in the loss or the projection after every optimizer step), logs the task loss and both measures
of overlap, and gives the LoRA part and the steering part their own learning rates. A training
loop of one's own does the same with ``JointModel.apply_orthogonality()``,
``orthogonality_term()`` and ``parameter_groups()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import nested_gather

from ..shims import trainer_accumulation_steps, trainer_loss_is_scaled
from .model import JointModel
from .plan import check_learning_rate


class _OrthogonalityCallback(TrainerCallback):
    """Applies the constraint when its config says, and measures the overlap O at the start of
    every optimizer step (after any projection) for the trainer's logs.

    - "down_projection": ``apply_orthogonality()`` at the start of an optimizer step, on every
      step ("step"), on global steps 0, N, 2N, ... (an int N), at each epoch's start ("epoch"),
      or once when training starts ("init");
    - "up_projection" in mode "project": after every optimizer step, and once when training
      starts (so that a model loaded from a run in another mode starts feasible).
    """

    def __init__(self, trainer: JointTrainer) -> None:
        self.trainer = trainer

    @property
    def _model(self) -> JointModel:
        return self.trainer.model

    def _config(self):
        return self._model.orthogonality

    def _projects_up(self) -> bool:
        config = self._config()
        return config.constraint == "up_projection" and config.mode == "project"

    def _projects_down(self, event: str, global_step: int = 0) -> bool:
        """Whether the down-projection constraint projects at ``event`` ("init", "epoch" or
        "step", the start of global step ``global_step``)."""
        config = self._config()
        if config.constraint != "down_projection":
            return False
        if isinstance(config.frequency, int):
            return event == "step" and global_step % config.frequency == 0
        return config.frequency == event

    def on_train_begin(self, args, state, control, **kwargs):
        if self._projects_down("init") or self._projects_up():
            self._model.apply_orthogonality()

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self._projects_down("epoch"):
            self._model.apply_orthogonality()

    def on_step_begin(self, args, state, control, **kwargs):
        if self._projects_down("step", state.global_step):
            self._model.apply_orthogonality()
        if "down_projection_overlap" in logged_measures(self._config()):
            self.trainer._record_overlap(self._model.down_projection_overlap())

    def on_optimizer_step(self, args, state, control, **kwargs):
        # After optimizer.step(), before the scheduler moves the rates: the rate this step
        # used, as the Trainer's own learning_rate log is.
        self.trainer._record_steer_learning_rate()
        if self._projects_up():
            self._model.apply_orthogonality()


def logged_measures(config: Any) -> tuple[str, ...]:
    """The overlap measures JointTrainer logs under ``config``: the active constraint's own
    (O for "down_projection", P for "up_projection"), both for "none" (the comparison run)."""
    return {
        "down_projection": ("down_projection_overlap",),
        "up_projection": ("orthogonality_penalty",),
    }.get(config.constraint, ("down_projection_overlap", "orthogonality_penalty"))


class JointTrainer(Trainer):
    """A transformers Trainer for a JointModel.

    - Constraint "down_projection" (the default): ``model.apply_orthogonality()`` runs at the
      start of the optimizer steps the config's ``frequency`` names (every step; global steps
      0, N, 2N, ...; each epoch's start; or once when training starts).
    - Constraint "up_projection", mode "penalty": the training loss is task loss +
      ``weight * P``, P counted once per optimizer step whatever the gradient accumulation
      (evaluation losses are task losses); mode "project": ``model.apply_orthogonality()`` runs
      after every optimizer step.
    - Each training log has ``task_loss``, the active constraint's measure, averaged over the
      optimizer steps since the last log like ``loss``: ``down_projection_overlap`` (O, at the
      start of each optimizer step, after any projection) under "down_projection",
      ``orthogonality_penalty`` (P, unweighted) under "up_projection", both under "none"; and
      ``steer_learning_rate`` beside ``learning_rate`` (the LoRA part's), both the rates the
      logged optimizer step used.
    - The optimizer (``args.optim``, AdamW by default) gets one parameter group per part and
      weight-decay class: ``lora_learning_rate`` for the LoRA part and
      ``steer_learning_rate`` for the steering part (each ``args.learning_rate`` when None),
      both following the learning-rate schedule.

    The other arguments are the Trainer's.

    Raises:
        ValueError: if ``model`` is not a JointModel, a learning rate is negative or not a
            number, or a learning rate is given together with a ready-made optimizer.
    """

    def __init__(
        self,
        model: JointModel,
        args: TrainingArguments | None = None,
        data_collator: Callable[..., Any] | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_loss_func: Callable[..., Any] | None = None,
        compute_metrics: Callable[..., dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[..., torch.Tensor] | None = None,
        lora_learning_rate: float | None = None,
        steer_learning_rate: float | None = None,
    ) -> None:
        if not isinstance(model, JointModel):
            raise ValueError(f"model must be a steer_fast.JointModel, got {type(model).__name__}")
        for name, value in (
            ("lora_learning_rate", lora_learning_rate),
            ("steer_learning_rate", steer_learning_rate),
        ):
            if value is not None:
                check_learning_rate(name, value)
        given = lora_learning_rate is not None or steer_learning_rate is not None
        if given and optimizers[0] is not None:
            raise ValueError(
                "lora_learning_rate / steer_learning_rate set the parameter groups JointTrainer "
                "builds; with a ready-made optimizer (optimizers=...), set them in it instead"
            )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self.lora_learning_rate = lora_learning_rate
        self.steer_learning_rate = steer_learning_rate
        self._logged_task_loss = torch.zeros(())
        self._logged_penalty = torch.zeros(())
        self._logged_steps = 0.0
        self._logged_overlap = torch.zeros(())
        self._overlap_steps = 0
        self._steer_learning_rate: float | None = None
        self.add_callback(_OrthogonalityCallback(self))

    def _record_steer_learning_rate(self) -> None:
        """Keep the steering group's rate of the optimizer step that just ran."""
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                if group.get("name") == "steering":
                    self._steer_learning_rate = group["lr"]
                    return

    def _record_overlap(self, overlap: torch.Tensor) -> None:
        """Add one optimizer step's O to the sum logged next (on its device: no sync)."""
        self._logged_overlap = self._logged_overlap.to(overlap.device) + overlap
        self._overlap_steps += 1

    # --- optimizer -------------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The optimizer ``args.optim`` names, with the two parts' parameter groups."""
        if self.optimizer is not None:
            return self.optimizer
        joint: JointModel = self.model
        default = self.args.learning_rate
        groups = joint.parameter_groups(
            default if self.lora_learning_rate is None else self.lora_learning_rate,
            default if self.steer_learning_rate is None else self.steer_learning_rate,
            weight_decay=self.args.weight_decay,
            decay_parameter_names=set(self.get_decay_parameter_names(joint)),
        )
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, joint)
        takes_groups = isinstance(optimizer_cls, type) and issubclass(
            optimizer_cls, torch.optim.Optimizer
        )
        if not takes_groups or "params" in optimizer_kwargs or "model" in optimizer_kwargs:
            raise ValueError(
                f"args.optim={self.args.optim!r} builds its own parameter groups; JointTrainer "
                "needs an optimizer that takes parameter groups (such as adamw_torch)"
            )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # --- loss ------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The task loss, plus ``weight * P`` while training under the up-projection
        constraint in mode "penalty"."""
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if model.training:
            joint: JointModel = self.model
            steps = trainer_accumulation_steps(self)
            scaled = trainer_loss_is_scaled(self, num_items_in_batch)
            # This micro-batch's share of one optimizer step: the micro-batch losses of a step
            # add up to the step's loss once the Trainer has divided the unscaled ones.
            share = 1.0 / steps
            config = joint.orthogonality
            adding = (
                config.constraint == "up_projection"
                and config.mode == "penalty"
                and config.weight > 0
            )
            task = loss.detach().mean() * (1.0 if scaled else share)
            self._logged_task_loss = self._logged_task_loss.to(task.device) + task
            self._logged_steps += share
            if adding or "orthogonality_penalty" in logged_measures(config):
                with contextlib.nullcontext() if adding else torch.no_grad():
                    penalty = joint.orthogonality_loss().to(loss.device)
                logged = self._logged_penalty.to(task.device) + penalty.detach() * share
                self._logged_penalty = logged
            if adding:
                # Scaled like the task loss, so that the Trainer's division (if any) leaves
                # weight * P once per optimizer step.
                loss = loss + config.weight * (share if scaled else 1.0) * penalty
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with the task loss, both measures and the steering learning rate
        added to training logs."""
        mode = self.args.parallel_mode
        if "loss" in logs and self._overlap_steps > 0:
            overlap = nested_gather(self._logged_overlap, mode).mean().item()
            logs["down_projection_overlap"] = overlap / self._overlap_steps
            self._logged_overlap = torch.zeros(())
            self._overlap_steps = 0
        if "loss" in logs and self._logged_steps > 0:
            task = nested_gather(self._logged_task_loss, mode).mean().item()
            logs["task_loss"] = task / self._logged_steps
            if "orthogonality_penalty" in logged_measures(self.model.orthogonality):
                penalty = nested_gather(self._logged_penalty, mode).mean().item()
                logs["orthogonality_penalty"] = penalty / self._logged_steps
            self._logged_task_loss = torch.zeros(())
            self._logged_penalty = torch.zeros(())
            self._logged_steps = 0.0
            if self._steer_learning_rate is not None:
                logs["steer_learning_rate"] = self._steer_learning_rate
        super().log(logs, start_time)
