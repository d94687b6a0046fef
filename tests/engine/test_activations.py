"""The activations' in-place contracts, which the training workspace relies on to share buffers
(engine/activations.py's docstring): the same bits whichever buffers are shared."""

from __future__ import annotations

import numpy as np
import pytest

from propserve.engine.activations import (
    BACKWARD,
    BACKWARD_IN_PLACE,
    FORWARD,
    FROM_OUTPUT,
    relu_forward,
)

BACKWARD_NAMES = sorted(BACKWARD)


def _batch(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """z with exact zeros, signed zeros, tiny and large entries; d_a random; (8, 16) F-order."""
    rng = np.random.default_rng(11)
    z = rng.normal(scale=3.0, size=(8, 16))
    z.flat[::7] = 0.0
    z.flat[3::11] = -0.0
    z.flat[5::13] = 1e-40
    z.flat[6::17] = -50.0
    d_a = rng.normal(size=(8, 16))
    return np.asfortranarray(z, dtype=dtype), np.asfortranarray(d_a, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", BACKWARD_NAMES)
def test_backward_in_place_and_from_output_give_the_same_bits(name: str, dtype: str) -> None:
    z, d_a = _batch(dtype)
    a = FORWARD[name](z, np.empty_like(z))
    expected = BACKWARD[name](d_a, z, a, np.empty_like(z))
    if name in FROM_OUTPUT:  # z is not read: the workspace hands a as z
        in_place_a = FORWARD[name](z.copy(order="F"), np.empty_like(z))
        assert BACKWARD[name](d_a, in_place_a, in_place_a, np.empty_like(z)).tobytes() == (
            expected.tobytes()
        )
    if name in BACKWARD_IN_PLACE:  # out may be d_a itself
        d_a_copy = d_a.copy(order="F")
        BACKWARD[name](d_a_copy, z, a, d_a_copy)
        assert d_a_copy.tobytes() == expected.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_relu_against_an_array_of_zeros_is_relu(dtype: str) -> None:
    z, _ = _batch(dtype)
    z.flat[9] = np.nan
    zeros = np.zeros_like(z)
    plain = relu_forward(z, np.empty_like(z))
    assert relu_forward(z, np.empty_like(z), zeros).tobytes() == plain.tobytes()
    in_place = z.copy(order="F")
    relu_forward(in_place, in_place, zeros)
    assert in_place.tobytes() == plain.tobytes()
