"""propserve train checks a file against the model's spec before the first step
(propserve.clients.cli.datafiles.fit_to_model); those checks must agree with the engine's,
which the server applies (propserve.engine.inputs): the CLI refuses exactly what the
engine would refuse, and what it accepts the engine takes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from propserve.clients.cli.datafiles import UsageError, fit_to_model
from propserve.engine import InputError, ModelSpec, check_inputs, check_targets


def spec(loss: str, outputs: int, dtype: str = "float32") -> dict[str, Any]:
    return ModelSpec.from_dict(
        {"input_dim": 3, "layers": [{"units": outputs}], "loss": loss, "dtype": dtype}
    ).to_dict()


SOFTMAX, MSE, MSE1, BCE = (
    spec("softmax_cross_entropy", 4),
    spec("mse", 2, "float64"),
    spec("mse", 1),
    spec("binary_cross_entropy", 1),
)
X = np.arange(12.0).reshape(4, 3) / 10


def with_(array: NDArray[Any], at: tuple[int, ...], value: Any) -> NDArray[Any]:
    changed = array.astype(np.result_type(array, np.asarray(value)))
    changed[at] = value
    return changed


CASES: list[tuple[str, dict[str, Any], NDArray[Any], NDArray[Any]]] = [
    ("labels", SOFTMAX, X, np.array([0, 1, 2, 3])),
    ("labels as whole floats (a CSV)", SOFTMAX, X, np.array([0.0, 1, 2, 3])),
    ("unsigned labels", SOFTMAX, X, np.array([0, 1, 2, 3], np.uint8)),
    ("a label too big", SOFTMAX, X, np.array([0, 1, 2, 4])),
    ("a negative label", SOFTMAX, X, np.array([0, -1, 2, 3])),
    ("a fractional label", SOFTMAX, X, np.array([0, 1.5, 2, 3])),
    ("a NaN label", SOFTMAX, X, np.array([0, np.nan, 2, 3])),
    ("probabilities", SOFTMAX, X, np.full((4, 4), 0.25)),
    ("negative probabilities", SOFTMAX, X, with_(np.full((4, 4), 0.25), (1, 1), -0.1)),
    ("probabilities, too few classes", SOFTMAX, X, np.full((4, 3), 1 / 3)),
    ("inputs too narrow", SOFTMAX, X[:, :2], np.array([0, 1, 2, 3])),
    ("integer inputs", SOFTMAX, np.arange(12).reshape(4, 3), np.array([0, 1, 2, 3])),
    ("a NaN input", SOFTMAX, with_(X, (2, 1), np.nan), np.array([0, 1, 2, 3])),
    ("an input over float32", SOFTMAX, with_(X, (0, 0), 1e39), np.array([0, 1, 2, 3])),
    ("an input over float32, float64 model", MSE, with_(X, (0, 0), 1e39), np.zeros((4, 2))),
    ("mse targets", MSE, X, np.ones((4, 2))),
    ("mse targets too narrow", MSE, X, np.ones((4, 1))),
    ("mse targets as a column", MSE, X, np.ones(4)),
    ("mse, one output, a column", MSE1, X, np.ones(4)),
    ("mse, integer targets", MSE1, X, np.arange(4)),
    ("mse, an infinite target", MSE, X, with_(np.ones((4, 2)), (3, 0), np.inf)),
    ("bce targets", BCE, X, np.array([0.0, 1, 1, 0])),
    ("bce, boolean targets", BCE, X, np.array([True, False, True, True])),
    ("bce, a target over 1", BCE, X, np.array([0.0, 1, 2, 0])),
]


@pytest.mark.parametrize(("what", "model", "x", "y"), CASES, ids=[c[0] for c in CASES])
def test_the_cli_refuses_exactly_what_the_engine_refuses(
    what: str, model: dict[str, Any], x: NDArray[Any], y: NDArray[Any]
) -> None:
    engine_spec = ModelSpec.from_dict(model)
    try:
        fx, fy = fit_to_model(x, y, model, "data.npz", "m")
    except UsageError as refused:
        # What the CLI would have sent without its checks (the same conversions) is refused
        # by the engine too.
        with pytest.raises(InputError), np.errstate(over="ignore"):
            naive_x = x.astype(engine_spec.dtype)
            naive_y = y.astype(np.int64) if _labels(model, y) else y.astype(engine_spec.dtype)
            check_inputs(engine_spec, naive_x)
            check_targets(engine_spec, naive_y, len(naive_x))
        assert str(refused).endswith("; nothing was trained")
        return
    check_inputs(engine_spec, fx)
    check_targets(engine_spec, fy, len(fx))
    assert fx.dtype == np.dtype(engine_spec.dtype)


def _labels(model: dict[str, Any], y: NDArray[Any]) -> bool:
    """Class labels (which the CLI sends as integers), rather than numbers."""
    whole = y.dtype.kind in "iu" or bool(np.all(np.isfinite(y)) and np.all(y == np.round(y)))
    return model["loss"] == "softmax_cross_entropy" and y.ndim == 1 and whole
