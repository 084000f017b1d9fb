"""Saving and loading adapters: what SteerModel and JointModel write and read.

- ``state``: the extra-state tensor a state_dict carries the configs in, JSON and safetensors
  files, Trainer checkpoints, and the checks a loaded state must pass;
- ``steering_files``: the steering part (steer_config.json, steer_model.safetensors) and the
  steering tensors of a Trainer checkpoint;
- ``legacy``: the state-dict keys of formats before 3, read at the file boundary;
- ``atomic``: writing a directory so that a failed save never leaves a half-written one.

PEFT's files for a JointModel's LoRA part are ``steer_fast.joint.files``.
"""
