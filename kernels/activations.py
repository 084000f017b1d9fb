"""Triton versions of the bottleneck nonlinearities phi and their derivatives.

``ACTIVATION`` is phi's integer id, the one every launcher takes:
0 identity, 1 relu, 2 silu, 3 gelu (erf), 4 gelu_tanh, 5 tanh (the order of the op layer's
``ACTIVATIONS`` names, which maps names to these ids). All maths is fp32.

Constants are written inline (a module-level constexpr multiplied by a tensor stays a constexpr
under the interpreter): sqrt(2/pi) = 0.79788..., 1/sqrt(2) = 0.70710..., 1/sqrt(2 pi) = 0.39894...,
and the tanh-GELU cubic coefficient 0.044715.
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # Neither libdevice nor a core tl.tanh is available under the interpreter, so tanh is built
    # from exp. (1 - e) / (1 + e) with e = exp(-2|x|) cancels badly near 0; there the odd Taylor
    # series to x^9 is used (truncation error < 1e-8 relative for |x| < 0.25).
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    t_large = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    t_small = ax * (
        1.0
        + x2
        * (
            -0.3333333333333333
            + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397 + x2 * 0.021869488536155203))
        )
    )
    t = tl.where(ax < 0.25, t_small, t_large)
    return tl.where(x < 0, -t, t)


@triton.jit
def apply_activation(z, ACTIVATION: tl.constexpr):
    """phi(z) for an fp32 block."""
    if ACTIVATION == 0:
        a = z
    elif ACTIVATION == 1:
        a = tl.maximum(z, 0.0)
    elif ACTIVATION == 2:
        a = z * tl.sigmoid(z)
    elif ACTIVATION == 3:
        a = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == 4:
        a = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    else:
        a = _tanh(z)
    return a


@triton.jit
def activation_derivative(z, ACTIVATION: tl.constexpr):
    """phi'(z) for an fp32 block (the closed forms of the op layer's PyTorch phi')."""
    if ACTIVATION == 0:
        da = tl.full(z.shape, 1.0, tl.float32)
    elif ACTIVATION == 1:
        da = tl.where(z > 0, 1.0, 0.0)
    elif ACTIVATION == 2:
        sig = tl.sigmoid(z)
        da = sig * (1.0 + z * (1.0 - sig))
    elif ACTIVATION == 3:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        da = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACTIVATION == 4:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        da = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (
            1.0 + 3.0 * 0.044715 * z * z
        )
    else:
        t = _tanh(z)
        da = 1.0 - t * t
    return da
