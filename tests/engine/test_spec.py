"""Spec parsing and validation: every bad field is named in the error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from propserve.engine import ModelSpec, SpecError

VALID: dict[str, Any] = {
    "input_dim": 4,
    "layers": [{"units": 8, "activation": "relu"}, {"units": 3, "activation": "softmax"}],
    "loss": "softmax_cross_entropy",
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
    "dtype": "float64",
    "init": "xavier_uniform",
    "seed": 11,
    "grad_clip_norm": 1.0,
}


def with_(**changes: Any) -> dict[str, Any]:
    return VALID | changes


def test_round_trip_through_json() -> None:
    spec = ModelSpec.from_dict(VALID)
    again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert spec.n_params == (4 * 8 + 8) + (8 * 3 + 3)
    assert spec.sizes == (4, 8, 3)


def test_defaults_follow_torch() -> None:
    minimal = {"input_dim": 2, "layers": [{"units": 1}], "loss": "mse"}
    spec = ModelSpec.from_dict(minimal)
    assert (spec.dtype, spec.init, spec.seed, spec.grad_clip_norm) == (
        "float32",
        "he_uniform",
        0,
        None,
    )
    assert spec.output_activation == "identity"
    assert spec.optimizer.name == "sgd" and spec.optimizer.lr == 1e-3
    adam = ModelSpec.from_dict(minimal | {"optimizer": "adam"}).optimizer
    assert (adam.lr, adam.betas, adam.eps, adam.weight_decay) == (1e-3, (0.9, 0.999), 1e-8, 0.0)
    adamw = ModelSpec.from_dict(minimal | {"optimizer": {"name": "adamw"}}).optimizer
    assert adamw.weight_decay == 1e-2


@pytest.mark.parametrize(
    ("loss", "activation"),
    [
        ("softmax_cross_entropy", "softmax"),
        ("binary_cross_entropy", "sigmoid"),
        ("mse", "identity"),
    ],
)
def test_output_activation_defaults_to_the_loss_pairing(loss: str, activation: str) -> None:
    spec = ModelSpec.from_dict({"input_dim": 2, "layers": [{"units": 2}], "loss": loss})
    assert spec.output_activation == activation


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("not an object", [], "expected an object"),  # type: ignore[list-item]
    ("unknown field", with_(dropout=0.5), "unknown field.*dropout"),
    ("missing loss", {"input_dim": 2, "layers": [{"units": 1}]}, "missing.*loss"),
    ("zero input", with_(input_dim=0), r"input_dim: must be in \[1"),
    ("float input", with_(input_dim=2.5), "input_dim: expected an integer"),
    ("bool input", with_(input_dim=True), "input_dim: expected an integer"),
    ("no layers", with_(layers=[]), "non-empty list"),
    (
        "zero units",
        with_(layers=[{"units": 0, "activation": "relu"}, {"units": 3}]),
        r"layers\[0\].units",
    ),
    (
        "negative units",
        with_(layers=[{"units": -3, "activation": "relu"}, {"units": 3}]),
        r"layers\[0\].units",
    ),
    (
        "unknown activation",
        with_(layers=[{"units": 3, "activation": "swish"}, {"units": 3}]),
        r"layers\[0\].activation: unknown value 'swish'",
    ),
    (
        "hidden without activation",
        with_(layers=[{"units": 3}, {"units": 3}]),
        r"layers\[0\].*missing.*activation",
    ),
    (
        "softmax hidden",
        with_(layers=[{"units": 3, "activation": "softmax"}, {"units": 3}]),
        r"layers\[0\].activation",
    ),
    ("softmax with mse", with_(loss="mse"), "only available as the output"),
    (
        "wrong output for ce",
        with_(layers=[{"units": 3, "activation": "relu"}]),
        "needs the output activation 'softmax'",
    ),
    ("one class", with_(layers=[{"units": 1}]), "at least 2 classes"),
    ("unknown loss", with_(loss="hinge"), "loss: unknown value 'hinge'"),
    ("unknown optimizer", with_(optimizer={"name": "lbfgs"}), "optimizer.name"),
    ("optimizer without name", with_(optimizer={"lr": 0.1}), "'name'"),
    ("negative lr", with_(optimizer={"name": "sgd", "lr": -0.1}), "optimizer.lr"),
    ("nan lr", with_(optimizer={"name": "adam", "lr": float("nan")}), "optimizer.lr"),
    ("negative momentum", with_(optimizer={"name": "sgd", "momentum": -0.5}), "momentum"),
    (
        "nesterov without momentum",
        with_(optimizer={"name": "sgd", "nesterov": True}),
        "nesterov momentum requires",
    ),
    (
        "nesterov with dampening",
        with_(optimizer={"name": "sgd", "momentum": 0.9, "dampening": 0.1, "nesterov": True}),
        "nesterov momentum requires",
    ),
    ("beta of 1", with_(optimizer={"name": "adam", "betas": [1.0, 0.999]}), r"betas\[0\]"),
    ("one beta", with_(optimizer={"name": "adam", "betas": [0.9]}), "two numbers"),
    ("negative eps", with_(optimizer={"name": "adam", "eps": -1e-8}), "eps"),
    ("betas on sgd", with_(optimizer={"name": "sgd", "betas": [0.9, 0.99]}), "unknown field"),
    ("momentum on adam", with_(optimizer={"name": "adam", "momentum": 0.9}), "unknown field"),
    (
        "negative weight decay",
        with_(optimizer={"name": "adamw", "weight_decay": -1}),
        "weight_decay",
    ),
    ("unknown dtype", with_(dtype="float16"), "dtype: unknown value"),
    ("unknown init", with_(init="orthogonal"), "init: unknown value"),
    ("negative seed", with_(seed=-1), "seed"),
    ("zero clip", with_(grad_clip_norm=0), "grad_clip_norm"),
    (
        "too many parameters",
        with_(layers=[{"units": 4096, "activation": "relu"}] * 4 + [{"units": 3}]),
        "exceed the limit",
    ),
]


@pytest.mark.parametrize(
    ("data", "message"), [case[1:] for case in BAD], ids=[case[0] for case in BAD]
)
def test_bad_specs_name_the_problem(data: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        ModelSpec.from_dict(data, max_params=10_000_000)


def test_parameter_limit_is_configurable() -> None:
    data = with_(layers=[{"units": 100, "activation": "relu"}, {"units": 3}])
    assert ModelSpec.from_dict(data, max_params=803).n_params == 803
    with pytest.raises(SpecError, match="803 parameters exceed the limit of 802"):
        ModelSpec.from_dict(data, max_params=802)
