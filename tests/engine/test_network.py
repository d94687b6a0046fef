"""The network's behaviour: the seed's examples, determinism, refusal, bad input, snapshots."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from propserve.engine import DivergedError, InputError, ModelSpec, Network, all_finite, forward

CLASSIFIER: dict[str, Any] = {
    "input_dim": 4,
    "layers": [{"units": 8, "activation": "relu"}, {"units": 3}],
    "loss": "softmax_cross_entropy",
    "optimizer": {"name": "adam", "lr": 0.01},
    "seed": 5,
}


def classifier(**overrides: Any) -> Network:
    return Network(ModelSpec.from_dict(CLASSIFIER | overrides))


def batch(rng: np.random.Generator, rows: int = 6) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(rows, 4)).astype(np.float32), rng.integers(0, 3, size=rows)


def test_one_neuron_relu_gives_3_2() -> None:
    """Inputs [2, 3, 5], weights [0.4, 0.3, 0.2], bias 0.5, relu: 0.8 + 0.9 + 1.0 + 0.5."""
    spec = ModelSpec.from_dict(
        {
            "input_dim": 3,
            "layers": [{"units": 1, "activation": "relu"}],
            "loss": "mse",
            "dtype": "float64",
        }
    )
    net = Network.from_params(spec, [np.array([[0.4], [0.3], [0.2]])], [np.array([0.5])])
    assert net.forward(np.array([[2.0, 3.0, 5.0]]))[0, 0] == pytest.approx(3.2, abs=1e-12)


#: Each activation in float64, written out independently of engine.activations.
_REFERENCE_ACTIVATIONS: dict[str, Any] = {
    "identity": lambda z: z,
    "relu": lambda z: np.where(z > 0, z, 0.0),
    "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "tanh": np.tanh,
    "gelu": lambda z: 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3))),
    "softmax": lambda z: (
        np.exp(z - z.max(axis=1, keepdims=True))
        / np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True)
    ),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("hidden", "output", "loss"),
    [
        ("relu", "softmax", "softmax_cross_entropy"),
        ("leaky_relu", "sigmoid", "binary_cross_entropy"),
        ("sigmoid", "identity", "mse"),
        ("tanh", "tanh", "mse"),
        ("gelu", "relu", "mse"),
        ("identity", "gelu", "mse"),
    ],
)
def test_one_row_and_a_batch_match_a_float64_reference(
    dtype: str, hidden: str, output: str, loss: str
) -> None:
    """A single row (predictions' own path through the engine) and the same rows as a batch
    both give the float64 reference's outputs."""
    spec = ModelSpec.from_dict(
        {
            "input_dim": 20,
            "layers": [
                {"units": 16, "activation": hidden},
                {"units": 12, "activation": hidden},
                {"units": 4, "activation": output},
            ],
            "loss": loss,
            "dtype": dtype,
            "seed": 7,
        }
    )
    params = Network(spec).params
    x = np.random.default_rng(3).normal(scale=2.0, size=(5, 20)).astype(dtype)
    expected = x.astype(np.float64)
    for w, b, layer in zip(params.weights, params.biases, spec.layers, strict=True):
        z = expected @ w.astype(np.float64) + b
        expected = _REFERENCE_ACTIVATIONS[layer.activation](z)
    tolerance = 1e-5 if dtype == "float32" else 1e-12
    rows = np.concatenate([forward(spec, params, x[i : i + 1]) for i in range(len(x))])
    assert rows.dtype == np.dtype(dtype)
    np.testing.assert_allclose(rows, expected, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(forward(spec, params, x), expected, rtol=tolerance, atol=tolerance)


def test_weight_nudge_is_one_sgd_step() -> None:
    """The seed's rule w += lr * (actual - predicted) * x with lr 0.1 moves 0.5 to 0.53.

    That rule is gradient descent on the half squared error (y - p)^2 / 2. Our mse is torch's
    mean squared error without the 1/2, whose gradient is twice as large, so the same move is
    one SGD step with lr 0.05: w = 0.5 - 0.05 * 2 * (0.7 - 1.0) * 1 = 0.53.
    """
    spec = ModelSpec.from_dict(
        {
            "input_dim": 1,
            "layers": [{"units": 1}],
            "loss": "mse",
            "optimizer": {"name": "sgd", "lr": 0.05},
            "dtype": "float64",
        }
    )
    net = Network.from_params(spec, [np.array([[0.5]])], [np.array([0.2])])
    x, y = np.array([[1.0]]), np.array([[1.0]])
    assert net.forward(x)[0, 0] == pytest.approx(0.7)
    result = net.train_step(x, y)
    assert result.loss == pytest.approx(0.09)  # (0.7 - 1.0)^2
    assert net.params.weights[0][0, 0] == pytest.approx(0.53, abs=1e-12)
    assert net.params.biases[0][0] == pytest.approx(0.23, abs=1e-12)
    assert result.step == net.step == 1


def test_multi_layer_network_repeats_the_layer_step() -> None:
    net = classifier()
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    (w0, w1), (b0, b1) = net.params.weights, net.params.biases
    logits = np.maximum(x @ w0 + b0, 0) @ w1 + b1
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(net.forward(x), expected, rtol=1e-5)
    np.testing.assert_allclose(net.forward(x).sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_spec_and_seed_give_identical_weights_and_training(dtype: str) -> None:
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    a, b = classifier(dtype=dtype), classifier(dtype=dtype)
    assert a.params.flat.dtype == np.dtype(dtype)
    assert a.params.flat.tobytes() == b.params.flat.tobytes()
    for _ in range(10):
        a.train_step(*batch(rng_a))
        b.train_step(*batch(rng_b))
    assert a.params.flat.tobytes() == b.params.flat.tobytes()
    assert not np.array_equal(a.params.flat, classifier(dtype=dtype).params.flat)


def test_different_seed_gives_different_weights() -> None:
    assert not np.array_equal(classifier(seed=1).params.flat, classifier(seed=2).params.flat)


@pytest.mark.parametrize(
    ("init", "std"),
    [
        ("he_normal", np.sqrt(2 / 400)),
        ("he_uniform", np.sqrt(2 / 400)),
        ("xavier_normal", np.sqrt(2 / 700)),
        ("xavier_uniform", np.sqrt(2 / 700)),
    ],
)
def test_initializer_scale(init: str, std: float) -> None:
    net = Network(
        ModelSpec.from_dict(
            {"input_dim": 400, "layers": [{"units": 300}], "loss": "mse", "init": init}
        )
    )
    w = net.params.weights[0]
    assert abs(w.mean()) < 0.01 * std * 10
    assert w.std() == pytest.approx(std, rel=0.02)
    assert not net.params.biases[0].any()


def test_training_lowers_the_loss_over_epochs() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    net = classifier()
    first = net.evaluate(x, y)[0]
    for _ in range(100):
        net.train_step(x, y)
    loss, acc = net.evaluate(x, y)
    assert loss < 0.3 * first
    assert acc is not None and acc > 0.9


def test_train_step_reports_loss_before_update_and_accuracy() -> None:
    net = classifier()
    x, y = batch(np.random.default_rng(3))
    loss, acc = net.evaluate(x, y)
    result = net.train_step(x, y)
    assert result.loss == pytest.approx(loss, rel=1e-6)
    assert result.accuracy == acc
    assert net.evaluate(x, y)[0] < loss


def test_learning_rate_override_applies_to_one_step() -> None:
    spec = ModelSpec.from_dict(
        {
            "input_dim": 1,
            "layers": [{"units": 1}],
            "loss": "mse",
            "optimizer": {"name": "sgd", "lr": 0.05},
            "dtype": "float64",
        }
    )
    net = Network.from_params(spec, [np.array([[0.5]])], [np.array([0.2])])
    x, y = np.array([[1.0]]), np.array([[1.0]])
    net.train_step(x, y, lr=0.1)
    assert net.params.weights[0][0, 0] == pytest.approx(0.56)


def test_gradient_clipping_bounds_the_update() -> None:
    """Plain sgd with clipping at c moves the parameters by exactly lr * c when the gradient
    norm exceeds c (torch's clip_grad_norm_ scales by c / (norm + 1e-6))."""
    spec = CLASSIFIER | {
        "optimizer": {"name": "sgd", "lr": 1.0},
        "grad_clip_norm": 0.01,
        "dtype": "float64",
    }
    net = Network(ModelSpec.from_dict(spec))
    x, y = batch(np.random.default_rng(4))
    before = net.params.flat.copy()
    norm = np.linalg.norm(net.loss_and_gradient(x, y)[1])
    assert norm > 0.01
    net.train_step(x, y)
    assert np.linalg.norm(net.params.flat - before) == pytest.approx(0.01 * norm / (norm + 1e-6))


BAD_INPUTS: list[tuple[str, Any, Any, str]] = [
    ("list, not array", [[0.0] * 4], np.array([0]), "numpy array"),
    ("rank 1", np.zeros(4), np.array([0]), "rank 2"),
    ("rank 3", np.zeros((1, 1, 4)), np.array([0]), "rank 2"),
    ("wrong width", np.zeros((2, 5)), np.array([0, 1]), "expects 4"),
    ("empty batch", np.zeros((0, 4)), np.zeros(0, dtype=int), "empty"),
    ("integer inputs", np.zeros((2, 4), dtype=np.int64), np.array([0, 1]), "floating"),
    ("string inputs", np.array([["a"] * 4]), np.array([0]), "floating"),
    ("nan input", np.array([[0.0, np.nan, 0.0, 0.0]]), np.array([0]), "non-finite"),
    ("inf input", np.array([[0.0, 0.0, np.inf, 0.0]]), np.array([0]), "non-finite"),
    ("label too large", np.zeros((2, 4)), np.array([0, 3]), "out of range"),
    ("negative label", np.zeros((2, 4)), np.array([-1, 0]), "out of range"),
    ("float labels", np.zeros((2, 4)), np.array([0.0, 1.0]), "integers"),
    ("batch mismatch", np.zeros((2, 4)), np.array([0, 1, 2]), "rows"),
    ("scalar target", np.zeros((1, 4)), np.array(1), "rows"),
    ("wrong one-hot width", np.zeros((2, 4)), np.zeros((2, 2)), "probabilities"),
    ("negative probabilities", np.zeros((1, 4)), np.array([[1.5, -0.5, 0.0]]), "non-negative"),
    ("nan target", np.zeros((1, 4)), np.array([[np.nan, 1.0, 0.0]]), "targets contain"),
]


INPUT_SIDE = ("numpy array", "rank 2", "expects 4", "empty", "floating", "non-finite")


@pytest.mark.parametrize(
    ("x", "y", "message"), [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_raises_and_changes_nothing(x: Any, y: Any, message: str) -> None:
    net = classifier()
    net.train_step(*batch(np.random.default_rng(0)))  # optimizer slots are non-trivial
    before = net.to_bytes()
    with pytest.raises(InputError, match=message):
        net.train_step(x, y)
    assert net.to_bytes() == before
    if message in INPUT_SIDE:
        with pytest.raises(InputError, match=message):
            net.forward(x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (7,), (1, 784), (3, 17), (2, 3, 5)])
def test_all_finite_finds_every_non_finite_entry(dtype: Any, shape: tuple[int, ...]) -> None:
    """NaN, inf and -inf at every position (a BLAS dot's vector body and remainder alike)."""
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    assert all_finite(x)
    flat = x.reshape(-1)
    for at in range(flat.size):
        for bad in (np.nan, np.inf, -np.inf):
            flat[at], keep = bad, flat[at]
            assert not all_finite(x), (at, bad)
            assert not all_finite(x.T), (at, bad)  # not contiguous
            flat[at] = keep
    assert all_finite(np.zeros((0, 4), dtype=dtype))


def test_all_finite_with_squares_beyond_the_range() -> None:
    """Finite entries whose squares overflow are finite; no floating-point warning either."""
    big = np.full((2, 5), np.finfo(np.float32).max, dtype=np.float32)
    with np.errstate(all="raise"):
        assert all_finite(big)
    big[1, 4] = np.inf
    with np.errstate(all="raise"):
        assert not all_finite(big)


@pytest.mark.parametrize(
    ("loss", "y", "message"),
    [
        ("mse", np.zeros((2, 2)), "shape"),
        ("mse", np.array([["a", "b", "c"]] * 2), "numeric"),
        ("binary_cross_entropy", np.full((2, 3), 2.0), r"\[0, 1\]"),
        ("binary_cross_entropy", np.full((2, 3), np.inf), "non-finite"),
    ],
)
def test_bad_regression_and_binary_targets(loss: str, y: Any, message: str) -> None:
    net = Network(ModelSpec.from_dict({"input_dim": 4, "layers": [{"units": 3}], "loss": loss}))
    with pytest.raises(InputError, match=message):
        net.train_step(np.zeros((2, 4)), y)
    assert net.step == 0


@pytest.mark.parametrize("lr", [-1.0, float("nan"), float("inf"), "0.1", True])
def test_bad_learning_rate_override(lr: Any) -> None:
    net = classifier()
    with pytest.raises(InputError, match="learning rate"):
        net.train_step(*batch(np.random.default_rng(0)), lr=lr)
    assert net.step == 0


@pytest.mark.parametrize("lr", [1e30, 1e38])
def test_diverging_step_is_refused_and_state_kept(lr: float) -> None:
    spec = {
        "input_dim": 2,
        "layers": [{"units": 4, "activation": "relu"}, {"units": 1}],
        "loss": "mse",
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
    }
    net = Network(ModelSpec.from_dict(spec))
    x = np.ones((3, 2), dtype=np.float32)
    y = np.full((3, 1), 1e3, dtype=np.float32)
    net.train_step(x, y)
    before = net.to_bytes()
    with pytest.raises(DivergedError, match="refused"):
        for _ in range(5):
            net.train_step(x, y, lr=lr)
    refused_at = net.to_bytes()
    # The refused step changed nothing: the same state continues as if it never happened.
    assert net.step >= 1
    again = Network.from_bytes(refused_at)
    assert again.to_bytes() == refused_at
    if net.step == 1:
        assert refused_at == before


def test_non_finite_loss_is_refused() -> None:
    """float32 overflow in the forward pass: the loss is inf, the step is refused."""
    spec = {"input_dim": 1, "layers": [{"units": 1}], "loss": "mse"}
    net = Network.from_params(ModelSpec.from_dict(spec), [np.array([[1e30]])], [np.zeros(1)])
    before = net.to_bytes()
    with pytest.raises(DivergedError, match="loss is inf"):
        net.train_step(np.array([[1e10]], dtype=np.float32), np.zeros((1, 1)))
    assert net.to_bytes() == before


def test_published_snapshots_are_immutable() -> None:
    net = classifier()
    snapshot = net.params
    copy = snapshot.flat.copy()
    rng = np.random.default_rng(2)
    for _ in range(5):
        net.train_step(*batch(rng))
    assert np.array_equal(snapshot.flat, copy)
    assert net.params.step == 5 and snapshot.step == 0
    with pytest.raises(ValueError, match="read-only"):
        snapshot.weights[0][0, 0] = 1.0


@pytest.mark.parametrize(
    "optimizer", [{"name": "sgd", "lr": 0.5}, {"name": "adam", "lr": 0.05}], ids=["sgd", "adam"]
)
def test_concurrent_readers_never_see_a_mix_of_two_steps(optimizer: dict[str, Any]) -> None:
    """Readers predict while a writer trains; every prediction must equal the forward pass of
    exactly one published step. A torn read (some layers from step k, others from k+1) gives
    outputs that match no step's forward. Plain sgd writes the update from the backward pass
    into the new array, adam from its own passes: both publish only finished arrays."""
    net = classifier(optimizer=optimizer)
    probe = np.random.default_rng(9).normal(size=(3, 4)).astype(np.float32)
    published = {0: net.params}
    seen: list[tuple[int, np.ndarray]] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            params = net.params
            seen.append((params.step, forward(net.spec, params, probe)))
            time.sleep(0.0001)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for thread in readers:
        thread.start()
    rng = np.random.default_rng(10)
    try:
        for _ in range(300):
            net.train_step(*batch(rng, rows=32))
            published[net.step] = net.params
            time.sleep(0.0002)  # let readers run between steps, whatever the GIL does
    finally:
        stop.set()
        for thread in readers:
            thread.join(timeout=10)
    assert len(seen) > 100
    steps = {step for step, _ in seen}
    assert len(steps) > 10
    for step, output in seen:
        assert np.array_equal(output, forward(net.spec, published[step], probe)), step


@pytest.mark.parametrize("where", ["inputs", "targets"])
def test_values_beyond_float32_are_refused_without_a_warning(where: str) -> None:
    spec = ModelSpec.from_dict(
        {"input_dim": 3, "layers": [{"units": 2}], "loss": "mse", "dtype": "float32"}
    )
    net = Network(spec)
    x = np.ones((2, 3))
    y = np.ones((2, 2))
    (x if where == "inputs" else y)[1, 1] = 1e300
    before = net.to_bytes()
    # pytest's warnings-as-errors setting turns numpy's overflow warning into a failure here.
    with pytest.raises(InputError, match=f"{where} hold values beyond the range of float32"):
        net.train_step(x, y)
    assert net.to_bytes() == before
    if where == "inputs":
        with pytest.raises(InputError, match="beyond the range of float32"):
            net.forward(x)
