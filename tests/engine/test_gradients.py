"""Backward propagation against central finite differences, in float64.

For every hidden activation x loss (and several output activations for mse) and several layer
shapes, the analytic gradient of the loss with respect to every parameter must match
(L(theta + h e_i) - L(theta - h e_i)) / 2h to a max relative error of 1e-6.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from propserve.engine import ModelSpec, Network
from propserve.engine.spec import HIDDEN_ACTIVATIONS
from tests.numeric import assert_close

SHAPES = [(3, (4,)), (5, (7, 6))]
STEP = 1e-6


def make_targets(loss: str, rng: np.random.Generator, batch: int, outputs: int, kind: str) -> Any:
    if loss == "mse":
        return rng.normal(size=(batch, outputs))
    if loss == "binary_cross_entropy":
        return (
            rng.integers(0, 2, size=(batch, outputs)).astype(float)
            if kind == "hard"
            else (rng.uniform(size=(batch, outputs)))
        )
    if kind == "hard":
        return rng.integers(0, outputs, size=batch)
    return rng.dirichlet(np.ones(outputs), size=batch)


def numerical_gradient(net: Network, x: Any, y: Any) -> np.ndarray:
    """Central differences of the loss over every flat parameter."""
    base = net.params.flat.copy()
    grad = np.empty_like(base)
    for i in range(base.size):
        losses = []
        for sign in (1.0, -1.0):
            shifted = base.copy()
            shifted[i] += sign * STEP
            probe = Network(net.spec, shifted)
            losses.append(probe.evaluate(x, y)[0])
        grad[i] = (losses[0] - losses[1]) / (2 * STEP)
    return grad


def check(spec_dict: dict[str, Any], kind: str = "hard", batch: int = 4) -> None:
    spec = ModelSpec.from_dict(spec_dict)
    rng = np.random.default_rng(7)
    net = Network(spec)
    x = rng.normal(size=(batch, spec.input_dim))
    y = make_targets(spec.loss, rng, batch, spec.n_outputs, kind)
    loss, analytic = net.loss_and_gradient(x, y)
    assert loss == pytest.approx(net.evaluate(x, y)[0], rel=1e-12)
    assert_close(
        analytic,
        numerical_gradient(net, x, y),
        rtol=1e-6,
        label=f"{spec.loss} {[la.activation for la in spec.layers]}",
    )


def spec_for(
    input_dim: int,
    hidden: tuple[int, ...],
    activation: str,
    loss: str,
    outputs: int,
    output_activation: str | None = None,
) -> dict[str, Any]:
    layers: list[dict[str, Any]] = [{"units": n, "activation": activation} for n in hidden]
    last: dict[str, Any] = {"units": outputs}
    if output_activation:
        last["activation"] = output_activation
    return {
        "input_dim": input_dim,
        "layers": [*layers, last],
        "loss": loss,
        "dtype": "float64",
        "init": "xavier_normal",
        "seed": 3,
    }


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (s[0], *s[1]))))
@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy", "softmax_cross_entropy"])
@pytest.mark.parametrize("activation", HIDDEN_ACTIVATIONS)
def test_gradient_matches_finite_differences(
    activation: str, loss: str, shape: tuple[int, tuple[int, ...]]
) -> None:
    check(spec_for(shape[0], shape[1], activation, loss, outputs=3))


@pytest.mark.parametrize("output", ["identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu"])
def test_mse_through_each_output_activation(output: str) -> None:
    check(spec_for(4, (5,), "tanh", "mse", outputs=2, output_activation=output))


@pytest.mark.parametrize("loss", ["binary_cross_entropy", "softmax_cross_entropy"])
def test_soft_targets(loss: str) -> None:
    """Probability targets: soft labels for bce, class distributions for softmax."""
    check(spec_for(4, (6,), "gelu", loss, outputs=3), kind="soft")


@pytest.mark.parametrize("batch", [1, 2, 9])
def test_batch_sizes_including_one(batch: int) -> None:
    """Batch 1 takes the outer-product path for dW."""
    check(spec_for(3, (5, 4), "relu", "softmax_cross_entropy", outputs=3), batch=batch)


def test_single_output_binary_classifier() -> None:
    check(spec_for(3, (4,), "sigmoid", "binary_cross_entropy", outputs=1))


def test_stable_losses_stay_finite_on_extreme_logits() -> None:
    """log-sum-exp and the logit form of bce: huge logits give finite loss and gradients."""
    for loss in ("binary_cross_entropy", "softmax_cross_entropy"):
        spec = ModelSpec.from_dict(
            spec_for(2, (), "relu", loss, outputs=2) | {"layers": [{"units": 2}]}
        )
        net = Network.from_params(spec, [np.array([[1e3, -1e3], [-1e3, 1e3]])], [np.zeros(2)])
        x = np.array([[1.0, 0.0], [0.0, 1.0]])
        y = (
            np.array([[0.0, 1.0], [1.0, 0.0]])
            if loss == "binary_cross_entropy"
            else np.array([1, 0])
        )
        loss_value, grad = net.loss_and_gradient(x, y)
        assert np.isfinite(loss_value) and np.isfinite(grad).all()
        # Every prediction is wrong by a margin of 1e3 (bce) or 2e3 (softmax).
        assert loss_value == pytest.approx(1e3 if loss == "binary_cross_entropy" else 2e3)
