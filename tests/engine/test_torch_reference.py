"""Optimizer trajectories against committed PyTorch reference values.

``data/torch_reference.json`` was produced by ``reference/make_torch_reference.py`` with
torch's own nn.Linear, activations, losses and torch.optim in float64 (see that script
for how to regenerate it); torch is not needed here. Each case starts the engine from the
same weights, feeds it the same 20 batches and checks, at every step, the loss (computed
on the weights before the update) and every weight and bias after the update; finally
the forward outputs on a probe input.

Tolerance: max relative error <= 1e-11, elementwise |ours - ref| / max(|ref|, 1e-6), so
entries smaller than 1e-6 in magnitude are held to an absolute 1e-17.

The engine and torch agree to ~1e-13 here (2.4e-13 at worst, in sgd_momentum_clip), not to
the bit: the matrix products sum in another order (OpenBLAS against MKL), torch fuses some
multiply-adds, and the engine reorders two updates to take fewer passes over the parameters:

- Adam and AdamW move the bias correction sqrt(1 - beta2^t) from the denominator onto the
  scalars (engine/optimizers.py; test_optimizers.py checks it against torch's own order);
- plain SGD scales dL/d(output) by -lr before backpropagation, so the backward pass writes
  -lr * grad, instead of scaling each layer's dL/dz (engine/network.py, Network.apply).

Each reordering rounds a value differently by an ulp or so per step, which 20 steps keep
far below 1e-11, while any float32 arithmetic or semantic difference would exceed it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from propserve.engine import ModelSpec, Network

DATA_PATH = Path(__file__).resolve().parent / "data" / "torch_reference.json"
REFERENCE: dict[str, Any] = json.loads(DATA_PATH.read_text())
CASES: dict[str, dict[str, Any]] = {case["name"]: case for case in REFERENCE["cases"]}

RTOL = 1e-11
FLOOR = 1e-6

# One line per reference case; together they cover every hidden activation and loss.
TRAJECTORY_CASES = [
    "sgd_plain",  # mse; tanh, relu
    "sgd_momentum",  # bce; sigmoid, leaky_relu
    "sgd_momentum_dampening",  # softmax ce, int labels; gelu, tanh
    "sgd_nesterov",  # softmax ce, one-hot targets; identity, relu
    "sgd_weight_decay_momentum",  # mse; leaky_relu, gelu
    "adam",  # bce; relu, sigmoid
    "adam_weight_decay",  # softmax ce, int labels; tanh, gelu
    "adamw",  # mse; sigmoid, identity
    "sgd_momentum_clip",  # mse, clip_grad_norm_ 0.5; relu, leaky_relu
]


def assert_close(ours: Any, reference: Any, what: str) -> float:
    """Assert max relative error <= RTOL; on failure show the worst entry and both arrays.

    Returns the max relative error so callers may report it.
    """
    got = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape ours {got.shape} vs reference {ref.shape}"
    assert np.all(np.isfinite(got)), f"{what}: ours is not finite:\n{got!r}"
    err = np.abs(got - ref) / np.maximum(np.abs(ref), FLOOR)
    worst = float(err.max()) if err.size else 0.0
    if worst > RTOL:
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(err)), err.shape))
        pytest.fail(
            f"{what}: max relative error {worst:.3e} > {RTOL:.0e} at index {idx}: "
            f"ours {float(got[idx])!r} vs reference {float(ref[idx])!r}\n"
            f"ours:\n{_show(got)}\nreference:\n{_show(ref)}"
        )
    return worst


def _show(a: np.ndarray) -> str:
    return np.array2string(a, precision=17, floatmode="maxprec", max_line_width=100)


def targets(case: dict[str, Any], y: Any) -> np.ndarray:
    """Targets in the engine's format: int64 class labels, float64 otherwise."""
    if case["target_kind"] == "labels":
        return np.asarray(y, dtype=np.int64)
    return np.asarray(y, dtype=np.float64)


def network_from_reference(case: dict[str, Any]) -> Network:
    """The engine network with the reference's spec and initial weights."""
    spec = ModelSpec.from_dict(case["spec"])
    return Network.from_params(
        spec,
        weights=[np.asarray(w, dtype=np.float64) for w in case["initial"]["weights"]],
        biases=[np.asarray(b, dtype=np.float64) for b in case["initial"]["biases"]],
    )


def test_every_reference_case_is_checked() -> None:
    assert set(CASES) == set(TRAJECTORY_CASES)


def test_reference_file_is_float64_and_twenty_steps() -> None:
    assert REFERENCE["dtype"] == "float64"
    for case in CASES.values():
        assert case["spec"]["dtype"] == "float64"
        assert len(case["steps"]) == REFERENCE["steps"] == 20


@pytest.mark.parametrize("name", TRAJECTORY_CASES)
def test_trajectory_matches_torch(name: str) -> None:
    case = CASES[name]
    net = network_from_reference(case)
    assert net.params.weights[0].dtype == np.float64
    assert_close(net.params.weights[0], case["initial"]["weights"][0], f"{name} initial W0")
    for k, step in enumerate(case["steps"], start=1):
        res = net.train_step(np.asarray(step["x"], dtype=np.float64), targets(case, step["y"]))
        assert res.step == k, f"{name}: step counter {res.step}, expected {k}"
        assert_close(res.loss, step["loss"], f"{name} step {k} loss")
        for i, (w, b) in enumerate(zip(net.params.weights, net.params.biases, strict=True)):
            assert_close(w, step["weights"][i], f"{name} step {k} W{i}")
            assert_close(b, step["biases"][i], f"{name} step {k} b{i}")


@pytest.mark.parametrize("name", TRAJECTORY_CASES)
def test_forward_after_training_matches_torch(name: str) -> None:
    case = CASES[name]
    net = network_from_reference(case)
    for step in case["steps"]:
        net.train_step(np.asarray(step["x"], dtype=np.float64), targets(case, step["y"]))
    probe = case["probe"]
    outputs = net.forward(np.asarray(probe["x"], dtype=np.float64))
    assert_close(outputs, probe["outputs"], f"{name} forward on probe")
