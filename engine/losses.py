"""Losses with their gradients, reduced as torch's ``reduction="mean"`` does.

Each loss takes the output layer's pre-activation ``z`` and activation ``a`` (both
(batch, outputs)), the target, and writes the gradient into ``grad``:

- mse writes dL/dA (the network then applies the output activation's backward);
- the two cross-entropies are fused with their output activation and write dL/dZ directly,
  which is both cheaper and numerically stable.

They return the loss as a Python float. ``grad`` must not alias ``z`` or ``a``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from propserve.engine.activations import sigmoid_forward

Array = NDArray[np.floating]
Loss = Callable[[Array, Array, NDArray[Any], Array], float]


def mse(z: Array, a: Array, y: NDArray[Any], grad: Array) -> float:
    """L = sum((a - y)^2) / N over all N = batch * outputs elements; dL/dA = 2 (a - y) / N.

    Note that torch's MSELoss has no factor 1/2: a single step of lr on this loss moves a
    weight by 2 * lr * error * input.
    """
    n = a.size
    np.subtract(a, y, out=grad)
    flat = grad.reshape(-1)
    loss = float(np.dot(flat, flat)) / n
    grad *= 2.0 / n
    return loss


def binary_cross_entropy(z: Array, a: Array, y: NDArray[Any], grad: Array) -> float:
    """Binary cross-entropy on logits z, targets y in [0, 1], mean over all elements.

    L = mean(max(z, 0) - z y + log(1 + exp(-|z|))),  dL/dZ = (sigmoid(z) - y) / N.

    NOTE: the textbook -y log(p) - (1 - y) log(1 - p) takes log(0) once sigmoid saturates
    (z beyond about +-17 in float32); the form above never exponentiates a positive number.
    """
    n = z.size
    # NOTE: float32 sums of many terms lose digits; summing in float64 costs one cast of a
    # (batch, outputs) array, which is small next to the layers.
    terms = np.abs(z)
    np.negative(terms, out=terms)
    np.exp(terms, out=terms)
    np.log1p(terms, out=terms)
    terms += np.maximum(z, 0)
    terms -= np.multiply(z, y)
    loss = float(terms.sum(dtype=np.float64)) / n
    sigmoid_forward(z, out=grad)
    grad -= y
    grad *= 1.0 / n
    return loss


def softmax_cross_entropy(z: Array, a: Array, y: NDArray[Any], grad: Array) -> float:
    """Softmax cross-entropy on logits z: (batch, classes), mean over the batch.

    y is either integer class labels (batch,) or class probabilities (batch, classes), as
    torch.nn.CrossEntropyLoss accepts. With s = z - max(z) per row and lse = log(sum(exp(s))):

    labels:        L = mean(lse - s[label]),              dL/dZ = (softmax(z) - onehot) / B
    probabilities: L = mean(sum_c y_c (lse - s_c)),       dL/dZ = (softmax(z) sum_c y_c - y) / B

    NOTE: subtracting the row maximum (log-sum-exp) keeps exp from overflowing, and taking
    lse - s instead of -log(softmax) keeps log away from 0 for confident wrong answers.
    """
    batch: int = z.shape[0]
    # NOTE: the ufuncs' reduce rather than the methods z.max and grad.sum, which reach the same
    # reduction through a Python wrapper each; every call counts on (batch, classes) arrays.
    np.subtract(z, np.maximum.reduce(z, axis=1, keepdims=True), out=grad)
    if y.ndim == 1:
        rows = _rows(batch)
        picked = float(np.add.reduce(grad[rows, y], dtype=np.float64))
        np.exp(grad, out=grad)
        sums = np.add.reduce(grad, axis=1, keepdims=True)
        loss = (float(np.add.reduce(np.log(sums), axis=None, dtype=np.float64)) - picked) / batch
        # (exp(s) / sums - onehot) / B, with the two divisions as one multiplication
        grad *= np.divide(1.0 / batch, sums)
        grad[rows, y] -= 1.0 / batch
        return loss
    picked = float(np.multiply(y, grad).sum(dtype=np.float64))
    np.exp(grad, out=grad)
    sums = np.add.reduce(grad, axis=1, keepdims=True)
    lse = np.log(sums).reshape(-1)
    weights = y.sum(axis=1)
    loss = (float(np.dot(lse.astype(np.float64), weights)) - picked) / batch
    grad /= sums
    grad *= weights[:, None]
    grad -= y
    grad *= 1.0 / batch
    return loss


@functools.lru_cache(maxsize=8)
def _rows(batch: int) -> NDArray[np.intp]:
    """0, 1, ..., batch - 1, read-only: the row index of each label."""
    rows = np.arange(batch)
    rows.flags.writeable = False
    return rows


LOSSES: dict[str, Loss] = {
    "mse": mse,
    "binary_cross_entropy": binary_cross_entropy,
    "softmax_cross_entropy": softmax_cross_entropy,
}
#: Losses that produce dL/dZ of the output layer themselves (fused with its activation).
FUSED = frozenset({"binary_cross_entropy", "softmax_cross_entropy"})


def accuracy(loss: str, z: Array, y: NDArray[Any]) -> float | None:
    """Fraction of correct predictions for classification losses; None for regression.

    softmax_cross_entropy: argmax of the logits equals the label (or the target's argmax).
    binary_cross_entropy: each output's decision z > 0 equals y > 0.5, over all elements.
    """
    if loss == "softmax_cross_entropy":
        predicted = z.argmax(axis=1)
        truth = y if y.ndim == 1 else y.argmax(axis=1)
        return int(np.count_nonzero(predicted == truth)) / int(z.shape[0])
    if loss == "binary_cross_entropy":
        return int(np.count_nonzero((z > 0) == (y > 0.5))) / z.size
    return None
