"""Numerical comparison for tests: one helper that says what differed, by how much, where."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike


def max_relative_error(ours: ArrayLike, reference: ArrayLike) -> float:
    """max |ours - reference| / max |reference|: the error relative to the reference's scale.

    Elementwise relative errors blow up where a gradient is ~0 (dead relu units) and finite
    differences leave ~1e-10 of noise; scaling by the largest reference entry does not.
    """
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    diff = float(np.max(np.abs(a - b))) if b.size else 0.0
    return diff / scale if scale > 0 else diff


def assert_close(ours: Any, reference: Any, *, rtol: float, label: str = "") -> None:
    """Fail with ours vs reference (and the worst element) when the max relative error > rtol."""
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    assert a.shape == b.shape, f"{label}: shape {a.shape} vs reference {b.shape}"
    error = max_relative_error(a, b)
    if not error <= rtol:
        worst = np.unravel_index(int(np.argmax(np.abs(a - b))), a.shape) if a.ndim else ()
        raise AssertionError(
            f"{label}: max relative error {error:.3g} > {rtol:.3g}\n"
            f"  worst at {worst}: ours {a[worst]!r} vs reference {b[worst]!r}\n"
            f"  ours      {np.array2string(a.ravel()[:8], precision=10)}\n"
            f"  reference {np.array2string(b.ravel()[:8], precision=10)}"
        )
