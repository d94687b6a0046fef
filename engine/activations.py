"""Activation functions as explicit forward/backward pairs.

Shapes: every array is (batch, units). ``forward(z, out)`` writes a = f(z) into ``out`` (which
may be ``z`` itself, for in-place use). ``backward(d_a, z, a, out)`` writes dZ = dA * f'(z)
into ``out``, given the forward pass's z and a. Two properties let a training pass keep fewer
buffers (each one fewer to stream through the caches):

- the activations in ``FROM_OUTPUT`` take f'(z) from a alone and never read z, so they may
  run in place, with the same buffer handed as z and a;
- those in ``BACKWARD_IN_PLACE`` read d_a once, elementwise, in their last operation, so
  ``out`` may be ``d_a`` itself; for the others ``out`` must not alias ``d_a``.

Softmax appears only as the fused output of softmax cross-entropy: its forward is here (for
predictions), its backward is folded into the loss (see losses.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.floating]
Forward = Callable[[Array, Array], Array]
Backward = Callable[[Array, Array, Array, Array], Array]

LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU's default negative_slope
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715


def identity_forward(z: Array, out: Array) -> Array:
    if out is not z:
        np.copyto(out, z)
    return out


def identity_backward(d_a: Array, z: Array, a: Array, out: Array) -> Array:
    if out is not d_a:
        np.copyto(out, d_a)
    return out


def relu_forward(z: Array, out: Array, zeros: Array | None = None) -> Array:
    """a = max(z, 0). ``zeros``: optionally, an array of zeros with z's shape and layout.

    NOTE: numpy's maximum against the scalar 0 runs a much slower loop than against an array
    of zeros laid out as z (docs/performance.md, "Engine", has the figures), so the training
    workspace keeps one. Both give the same values.
    """
    return np.maximum(z, 0 if zeros is None else zeros, out=out)


def relu_backward(d_a: Array, z: Array, a: Array, out: Array) -> Array:
    # NOTE: the derivative at z == 0 is taken as 0, as torch does; a > 0 exactly where z > 0
    # (NaN in neither), so the mask is taken from a.
    return np.multiply(d_a, a > 0, out=out)


def leaky_relu_forward(z: Array, out: Array) -> Array:
    # max(z, slope * z) equals leaky_relu for 0 < slope < 1.
    scaled = np.multiply(z, LEAKY_SLOPE)
    return np.maximum(z, scaled, out=out)


def leaky_relu_backward(d_a: Array, z: Array, a: Array, out: Array) -> Array:
    # NOTE: at z == 0 the slope branch is used (torch: z > 0 ? 1 : slope). With 0 < slope,
    # a > 0 exactly where z > 0, so the mask is taken from a.
    np.multiply(d_a, LEAKY_SLOPE, out=out)
    np.copyto(out, d_a, where=a > 0)
    return out


def sigmoid_forward(z: Array, out: Array) -> Array:
    # NOTE: 1 / (1 + exp(-z)) overflows exp for z < -88 in float32. The identity
    # sigmoid(z) = (1 + tanh(z / 2)) / 2 has no overflow for any z; its cost is an absolute
    # error of one ulp of 1 for tiny outputs, which gradients do not notice.
    np.multiply(z, 0.5, out=out)
    np.tanh(out, out=out)
    out *= 0.5
    out += 0.5
    return out


def sigmoid_backward(d_a: Array, z: Array, a: Array, out: Array) -> Array:
    # d/dz sigmoid(z) = a (1 - a)
    grad = np.subtract(1.0, a)
    grad *= a
    return np.multiply(d_a, grad, out=out)


def tanh_forward(z: Array, out: Array) -> Array:
    return np.tanh(z, out=out)


def tanh_backward(d_a: Array, z: Array, a: Array, out: Array) -> Array:
    # d/dz tanh(z) = 1 - a^2
    grad = np.multiply(a, a)
    np.subtract(1.0, grad, out=grad)
    return np.multiply(d_a, grad, out=out)


def _gelu_tanh(z: Array) -> Array:
    """t = tanh(c (z + k z^3)), the inner term of the tanh-approximated gelu."""
    t = np.multiply(z, z)
    t *= _GELU_K
    t += 1.0
    t *= z
    t *= _GELU_C
    return np.tanh(t, out=t)


def gelu_forward(z: Array, out: Array) -> Array:
    """gelu(z) = z/2 (1 + tanh(c (z + k z^3))), c = sqrt(2/pi), k = 0.044715.

    This is torch.nn.GELU(approximate="tanh"); the exact erf form needs an erf that numpy
    does not have.
    """
    t = _gelu_tanh(z)
    t += 1.0
    t *= 0.5
    return np.multiply(z, t, out=out)


def gelu_backward(d_a: Array, z: Array, a: Array, out: Array) -> Array:
    # d/dz = (1 + t)/2 + z/2 (1 - t^2) c (1 + 3k z^2)
    t = _gelu_tanh(z)
    inner = np.multiply(z, z)
    inner *= 3.0 * _GELU_K
    inner += 1.0
    inner *= _GELU_C
    inner *= z
    sech2 = np.multiply(t, t)
    np.subtract(1.0, sech2, out=sech2)
    inner *= sech2
    t += 1.0
    t += inner
    t *= 0.5
    return np.multiply(d_a, t, out=out)


def softmax_forward(z: Array, out: Array) -> Array:
    """Row-wise softmax. NOTE: subtracting the row maximum keeps exp from overflowing."""
    # NOTE: the ufuncs' reduce, not the methods z.max and out.sum, which reach the same
    # reduce through a Python wrapper each (as much time as a single row's work).
    if z.shape[0] == 1:
        # One row: reductions of the 1-d row, cheaper than along axis 1 with keepdims, and
        # the same values (max is exact; the sum runs over the same contiguous row).
        row = z[0]
        np.subtract(z, np.maximum.reduce(row), out=out)
        np.exp(out, out=out)
        out /= np.add.reduce(out[0])
        return out
    row_max = np.maximum.reduce(z, axis=1, keepdims=True)
    np.subtract(z, row_max, out=out)
    np.exp(out, out=out)
    out /= np.add.reduce(out, axis=1, keepdims=True)
    return out


FORWARD: dict[str, Forward] = {
    "identity": identity_forward,
    "relu": relu_forward,
    "leaky_relu": leaky_relu_forward,
    "sigmoid": sigmoid_forward,
    "tanh": tanh_forward,
    "gelu": gelu_forward,
    "softmax": softmax_forward,
}

#: Activations whose backward reads only a (see the module docstring).
FROM_OUTPUT = frozenset({"identity", "relu", "leaky_relu", "sigmoid", "tanh"})
#: Activations whose backward may write into d_a (see the module docstring).
BACKWARD_IN_PLACE = frozenset({"identity", "relu", "sigmoid", "tanh", "gelu"})

BACKWARD: dict[str, Backward] = {
    "identity": identity_backward,
    "relu": relu_backward,
    "leaky_relu": leaky_relu_backward,
    "sigmoid": sigmoid_backward,
    "tanh": tanh_backward,
    "gelu": gelu_backward,
}
