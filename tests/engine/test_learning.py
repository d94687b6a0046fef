"""Learning real data sets shipped with scikit-learn (no download), on fixed 80/20 splits."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits

from propserve.engine import ModelSpec, Network


def split(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, ...]:
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]


def fit(net: Network, x: np.ndarray, y: np.ndarray, epochs: int, batch: int) -> None:
    rng = np.random.default_rng(1)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch):
            rows = order[start : start + batch]
            net.train_step(x[rows], y[rows])


def test_digits_mlp_with_adam_reaches_96_percent() -> None:
    data: Any = load_digits()
    x_train, y_train, x_test, y_test = split(data.data / 16.0, data.target)
    spec = ModelSpec.from_dict(
        {
            "input_dim": 64,
            "layers": [{"units": 64, "activation": "relu"}, {"units": 10}],
            "loss": "softmax_cross_entropy",
            "optimizer": {"name": "adam", "lr": 1e-3},
            "seed": 0,
        }
    )
    net = Network(spec)
    fit(net, x_train, y_train, epochs=30, batch=32)
    accuracy = float((net.forward(x_test).argmax(axis=1) == y_test).mean())
    assert accuracy >= 0.96, accuracy


def test_breast_cancer_with_bce_reaches_95_percent() -> None:
    data: Any = load_breast_cancer()
    x_train, y_train, x_test, y_test = split(data.data, data.target.astype(np.float64))
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    spec = ModelSpec.from_dict(
        {
            "input_dim": 30,
            "layers": [{"units": 16, "activation": "tanh"}, {"units": 1}],
            "loss": "binary_cross_entropy",
            "optimizer": {"name": "adam", "lr": 1e-3},
            "seed": 0,
        }
    )
    net = Network(spec)
    fit(net, x_train, y_train, epochs=40, batch=16)
    accuracy = float(((net.forward(x_test)[:, 0] > 0.5) == (y_test > 0.5)).mean())
    assert accuracy >= 0.95, accuracy
    _, train_accuracy = net.evaluate(x_train, y_train)
    assert train_accuracy is not None and train_accuracy >= 0.95
