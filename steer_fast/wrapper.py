"""What SteerModel and JointModel share: a PEFT-style wrapper around a steered model.

Calls go to the wrapped model (``forward`` with labels and all, ``generate``, and any attribute
the wrapper lacks); the steering adapters are those of the wrapped model's steered blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapter import PostBlockAdapter
from .validation import check_scale

if TYPE_CHECKING:
    from .config import SteerConfig
    from .model import SteeredBlock


class SteeringWrapper(nn.Module):
    """Base of SteerModel and JointModel.

    Subclasses name the attribute that holds the wrapped model (``wrapped_attribute``), keep
    their SteerConfig as ``steer_config`` and list their steered blocks (``_steered_blocks``).
    """

    wrapped_attribute: str = ""
    steer_config: SteerConfig

    def _steered_blocks(self) -> dict[int, SteeredBlock]:
        """Decoder-layer index -> its SteeredBlock, in index order."""
        raise NotImplementedError

    def _wrapped(self) -> nn.Module:
        return getattr(self, self.wrapped_attribute)

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks come from the wrapped model."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self.wrapped_attribute:
                raise AttributeError(
                    f"this {type(self).__name__} has no model (it was unloaded)"
                ) from None
            return getattr(self._wrapped(), name)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The wrapped model's forward. The usual arguments are named (so that the transformers
        Trainer keeps those dataset columns and finds the labels) and passed on when given."""
        named = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "inputs_embeds": inputs_embeds,
            "labels": labels,
        }
        return self._wrapped()(**{k: v for k, v in named.items() if v is not None}, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's generate (the adapters run inside its layers)."""
        return self._wrapped().generate(*args, **kwargs)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters)."""
        trainable = total = 0
        for parameter in self.parameters():
            total += parameter.numel()
            if parameter.requires_grad:
                trainable += parameter.numel()
        return trainable, total

    def get_adapters(self) -> dict[int, PostBlockAdapter]:
        """Decoder-layer index -> its PostBlockAdapter."""
        return {index: block.steer_adapter for index, block in self._steered_blocks().items()}

    def steering_paths(self) -> dict[int, str]:
        """Decoder-layer index -> "fused" or "plain" (see ``steer_fast.model``)."""
        return {index: block.path for index, block in self._steered_blocks().items()}

    def set_scale(self, scale: float) -> None:
        """Set the steering strength s of every post-block adapter (0: no steering)."""
        scale = check_scale(scale)
        for adapter in self.get_adapters().values():
            adapter.scale = scale
        self.steer_config.scale = scale

    @contextlib.contextmanager
    def disable_steering(self) -> Iterator[None]:
        """Run without the post-block adapters inside the block: every steered layer runs its
        own forward, exactly."""
        blocks = list(self._steered_blocks().values())
        previous = [block.steering_enabled for block in blocks]
        try:
            for block in blocks:
                block.steering_enabled = False
            yield
        finally:
            for block, enabled in zip(blocks, previous, strict=True):
                block.steering_enabled = enabled

    def steering_tensors(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor on the CPU, keyed as in steer_model.safetensors
        ("layers.{index}.{down,up}.{weight,bias}")."""
        tensors = {}
        for index, adapter in self.get_adapters().items():
            for name, tensor in adapter.state_dict().items():
                tensors[f"layers.{index}.{name}"] = tensor.detach().to("cpu").contiguous()
        return tensors

    def load_steering_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors keyed as ``steering_tensors`` gives them into the adapters."""
        with torch.no_grad():
            for index, adapter in self.get_adapters().items():
                for name, parameter in adapter.state_dict(keep_vars=True).items():
                    parameter.copy_(tensors[f"layers.{index}.{name}"])
