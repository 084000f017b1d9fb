"""JointTrainer: training a JointModel with the transformers Trainer.

``JointTrainer`` adds the orthogonality penalty to the loss (mode "penalty"), projects after
every optimizer step (mode "project"), logs the task loss and the penalty, and gives the LoRA
part and the steering part their own learning rates. A training loop of one's own does the same
with ``JointModel.orthogonality_term()``, ``apply_orthogonality()`` and ``parameter_groups()``.
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
from ..validation import check_learning_rate
from .model import JointModel


class _OrthogonalityCallback(TrainerCallback):
    """Projects after every optimizer step (and once when training starts, so that a model
    loaded from a run in another mode starts feasible); a no-op outside mode "project"."""

    def __init__(self, model: JointModel) -> None:
        self.model = model

    def on_train_begin(self, args, state, control, **kwargs):
        self.model.apply_orthogonality()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.apply_orthogonality()


class JointTrainer(Trainer):
    """A transformers Trainer for a JointModel.

    - Mode "penalty": the training loss is task loss + ``weight * P``, P counted once per
      optimizer step whatever the gradient accumulation. Evaluation losses are task losses.
    - Mode "project": ``model.apply_orthogonality()`` runs after every optimizer step.
    - Every mode: each training log has ``task_loss`` and ``orthogonality_penalty`` (P,
      unweighted), averaged over the optimizer steps since the last log like ``loss``, and
      ``steer_learning_rate`` beside ``learning_rate`` (the LoRA part's).
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
        self.add_callback(_OrthogonalityCallback(model))

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
        if (
            not takes_groups
            or "params" in optimizer_kwargs
            or "model" in optimizer_kwargs
        ):
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
        """The task loss, plus ``weight * P`` in mode "penalty" while training."""
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
            adding = joint.orthogonality.mode == "penalty" and joint.orthogonality.weight > 0
            with contextlib.nullcontext() if adding else torch.no_grad():
                penalty = joint.orthogonality_loss().to(loss.device)
            task = loss.detach().mean() * (1.0 if scaled else share)
            self._logged_task_loss = self._logged_task_loss.to(task.device) + task
            self._logged_penalty = self._logged_penalty.to(task.device) + penalty.detach() * share
            self._logged_steps += share
            if adding:
                # Scaled like the task loss, so that the Trainer's division (if any) leaves
                # weight * P once per optimizer step.
                loss = loss + joint.orthogonality.weight * (share if scaled else 1.0) * penalty
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with the task loss, the penalty and the steering learning rate
        added to training logs."""
        if "loss" in logs and self._logged_steps > 0:
            mode = self.args.parallel_mode
            task = nested_gather(self._logged_task_loss, mode).mean().item()
            penalty = nested_gather(self._logged_penalty, mode).mean().item()
            logs["task_loss"] = task / self._logged_steps
            logs["orthogonality_penalty"] = penalty / self._logged_steps
            self._logged_task_loss = torch.zeros(())
            self._logged_penalty = torch.zeros(())
            self._logged_steps = 0.0
            if self.optimizer is not None:
                for group in self.optimizer.param_groups:
                    if group.get("name") == "steering":
                        logs["steer_learning_rate"] = group["lr"]
                        break
        super().log(logs, start_time)
