"""Which parts of a JointModel run (``InferenceMode``, from ``JointModel.set_inference_mode``),
and the SteerModel verbs a JointModel refuses (``refusal``)."""

from __future__ import annotations

from typing import Any

from ..wrapper import AdapterSwitch, SteeringWrapper

INFERENCE_MODES: tuple[str, ...] = ("lora_only", "adapter_only", "all")


ONE_ADAPTER = (
    "{verb}: a JointModel holds one steering adapter and one LoRA adapter; named adapters and "
    "mixed batches are SteerModel's (get_steer_model / from_pretrained)"
)


def refusal(verb: str) -> Any:
    """A JointModel method ``verb`` that raises NotImplementedError saying why."""

    def refuse(self: SteeringWrapper, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(ONE_ADAPTER.format(verb=verb))

    refuse.__name__ = verb
    refuse.__doc__ = f"Not supported here: {verb} is SteerModel's (see ``ONE_ADAPTER``)."
    return refuse


class InferenceMode(AdapterSwitch):
    """The result of ``JointModel.set_inference_mode``: the parts ``mode`` names run from when
    it is returned; used as a context manager, it puts the previous state of both parts back on
    exit."""

    def __init__(self, model: SteeringWrapper, mode: str) -> None:
        if not isinstance(mode, str) or mode not in INFERENCE_MODES:
            raise ValueError(f"mode must be one of {INFERENCE_MODES}, got {mode!r}")
        self.mode = mode
        super().__init__(
            model,
            lambda: model._set_parts(steering=mode != "lora_only", lora=mode != "adapter_only"),
        )

    def __enter__(self) -> InferenceMode:
        return self
