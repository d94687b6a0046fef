"""Validation of inputs and targets against a spec.

One place decides what a network accepts, so that every caller (the service's two transports
included) gets the same answer and the same message. The checks run on numpy arrays, once per
call, and return arrays in the network's dtype.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from propserve.engine.errors import InputError
from propserve.engine.spec import ModelSpec


def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"an array of shape {x.shape} and dtype {x.dtype}"
    return f"a {type(x).__name__}"


def all_finite(x: NDArray[np.floating]) -> bool:
    """Whether every entry of a floating-point array is finite."""
    # NOTE: x.x (one BLAS dot over the flattened array) is finite when every entry is, and NaN
    # or inf when one is not; finite entries whose squares overflow give inf too, and only then
    # is the elementwise check needed. A dot is not a ufunc, so it raises no floating-point
    # warnings, and it beats both np.isfinite(x).all() and a sum under np.errstate.
    if math.isfinite(np.vdot(x, x)):
        return True
    return bool(np.isfinite(x).all())


def _require_finite(x: NDArray[Any], what: str) -> None:
    if all_finite(x):
        return
    at = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
    raise InputError(f"{what} contain a non-finite value ({x[at]}) at index {at}")


def _cast(x: NDArray[Any], name: str, what: str) -> NDArray[Any]:
    """``x`` as dtype ``name``; a finite value beyond a narrower dtype's range is refused
    (rather than becoming inf, with numpy's overflow warning)."""
    dtype = np.dtype(name)
    if x.dtype == dtype:
        return x
    if x.dtype.kind != "f" or x.dtype.itemsize <= dtype.itemsize:
        return x.astype(dtype)
    with np.errstate(over="ignore"):
        cast = x.astype(dtype)
    if not all_finite(cast) and all_finite(x):
        largest = float(np.finfo(dtype).max)
        raise InputError(f"{what} hold values beyond the range of {dtype} (±{largest:.4g})")
    return cast


def check_inputs(spec: ModelSpec, x: Any) -> NDArray[np.floating]:
    """x: (batch, input_dim), floating point, finite, batch >= 1. Returns x in spec.dtype."""
    if not isinstance(x, np.ndarray):
        raise InputError(
            f"inputs must be a numpy array of shape (batch, {spec.input_dim}), got {_describe(x)}"
        )
    if x.ndim != 2:
        raise InputError(f"inputs must have rank 2 (batch, {spec.input_dim}), got shape {x.shape}")
    if x.shape[1] != spec.input_dim:
        raise InputError(
            f"inputs have {x.shape[1]} features per row, the model expects {spec.input_dim}"
        )
    if x.shape[0] == 0:
        raise InputError("inputs are an empty batch (0 rows)")
    if x.dtype.kind != "f":
        raise InputError(f"inputs must be floating point (float32 or float64), got {x.dtype}")
    checked: NDArray[np.floating] = _cast(x, spec.dtype, "inputs")
    _require_finite(checked, "inputs")
    return checked


def check_targets(spec: ModelSpec, y: Any, batch: int) -> NDArray[Any]:
    """Targets for ``spec.loss`` and a batch of ``batch`` rows.

    mse: floats (batch, outputs), or (batch,) when there is one output.
    binary_cross_entropy: values in [0, 1] (floats, ints or bools), shaped as for mse.
    softmax_cross_entropy: integer labels (batch,) in [0, classes), or class probabilities
    (batch, classes): non-negative floats.
    """
    outputs = spec.n_outputs
    if not isinstance(y, np.ndarray):
        raise InputError(f"targets must be a numpy array, got {_describe(y)}")
    if y.ndim == 0 or y.shape[0] != batch:
        raise InputError(
            f"targets have {y.shape[0] if y.ndim else 0} rows but the inputs have {batch}"
        )
    if spec.loss == "softmax_cross_entropy":
        if y.ndim == 1:
            if y.dtype.kind not in "iu":
                raise InputError(
                    f"class labels must be integers, got {y.dtype}; send "
                    f"(batch, {outputs}) floats for class probabilities"
                )
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= outputs:
                bad = low if low < 0 else high
                raise InputError(f"class label {bad} is out of range [0, {outputs})")
            labels: NDArray[Any] = y.astype(np.intp, copy=False)
            return labels
        if y.ndim != 2 or y.shape[1] != outputs or y.dtype.kind != "f":
            raise InputError(
                f"targets must be integer labels (batch,) or float class "
                f"probabilities (batch, {outputs}), got {_describe(y)}"
            )
        probabilities: NDArray[Any] = _cast(y, spec.dtype, "targets")
        _require_finite(probabilities, "targets")
        if (probabilities < 0).any():
            raise InputError("class probabilities must be non-negative")
        return probabilities
    if y.ndim == 1 and outputs == 1:
        y = y.reshape(batch, 1)
    if y.ndim != 2 or y.shape[1] != outputs:
        raise InputError(f"targets must have shape ({batch}, {outputs}), got {y.shape}")
    if y.dtype.kind not in "fiub":
        raise InputError(f"targets must be numeric, got {y.dtype}")
    values: NDArray[Any] = _cast(y, spec.dtype, "targets")
    _require_finite(values, "targets")
    if spec.loss == "binary_cross_entropy" and ((values < 0).any() or (values > 1).any()):
        raise InputError("binary cross-entropy targets must lie in [0, 1]")
    return values
