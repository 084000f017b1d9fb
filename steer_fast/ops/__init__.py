"""The op layer: the three steering ops, each with its torch path beside it.

One file per op, named like its kernel in ``steer_fast.kernels``, its torch path and its test:

    post_block_steer      out = h + s (U phi(D h + b_d) + b_u)             (rank >= 1)
    steering_vector       out = h + s b                                     (rank 0)
    multi_adapter_steer   every token row with its own adapter and strength (mixed batches)

``<op>.py`` checks the arguments (``checks``), resolves the backend (``backend``) and registers
the op with torch.library (forward and backward custom ops, so that torch.compile traces it and
autograd saves what the kernels need); ``<op>_torch.py`` is its plain PyTorch path. ``phi``
holds the nonlinearities, ``reference`` the unfused eager references the tests and benchmarks
compare against. The ops themselves are exported by ``steer_fast`` (``steer_fast.post_block_steer``,
...); what is exported here serves code that builds on them.
"""

from .backend import BACKENDS, TORCH_DTYPES, TRITON_DTYPES, resolve_backend, triton_available
from .phi import ACTIVATIONS, activate, activation_derivative, activation_id
from .reference import reference_post_block_steer, reference_steering_vector

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "TORCH_DTYPES",
    "TRITON_DTYPES",
    "activate",
    "activation_derivative",
    "activation_id",
    "reference_post_block_steer",
    "reference_steering_vector",
    "resolve_backend",
    "triton_available",
]
