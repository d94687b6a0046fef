"""Weight initialisers.

Each draws a dense layer's weight matrix W: (n_in, n_out) from a numpy ``Generator``; biases
start at zero. Draws are made in float64 and then cast, so float32 and float64 networks built
from the same spec and seed start from the same values (up to rounding), and the same spec and
seed give bit-identical weights for a given numpy version.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

Initializer = Callable[[np.random.Generator, int, int], NDArray[np.float64]]


def he_uniform(rng: np.random.Generator, n_in: int, n_out: int) -> NDArray[np.float64]:
    """U(-l, l) with l = sqrt(6 / n_in): keeps the variance of relu activations (He et al.)."""
    limit = math.sqrt(6.0 / n_in)
    return rng.uniform(-limit, limit, size=(n_in, n_out))


def he_normal(rng: np.random.Generator, n_in: int, n_out: int) -> NDArray[np.float64]:
    """N(0, 2 / n_in)."""
    return rng.normal(0.0, math.sqrt(2.0 / n_in), size=(n_in, n_out))


def xavier_uniform(rng: np.random.Generator, n_in: int, n_out: int) -> NDArray[np.float64]:
    """U(-l, l) with l = sqrt(6 / (n_in + n_out)) (Glorot and Bengio), for tanh and sigmoid."""
    limit = math.sqrt(6.0 / (n_in + n_out))
    return rng.uniform(-limit, limit, size=(n_in, n_out))


def xavier_normal(rng: np.random.Generator, n_in: int, n_out: int) -> NDArray[np.float64]:
    """N(0, 2 / (n_in + n_out))."""
    return rng.normal(0.0, math.sqrt(2.0 / (n_in + n_out)), size=(n_in, n_out))


INITIALIZERS: dict[str, Initializer] = {
    "he_uniform": he_uniform,
    "he_normal": he_normal,
    "xavier_uniform": xavier_uniform,
    "xavier_normal": xavier_normal,
}
