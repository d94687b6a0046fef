"""Weights in propserve's and torch's layouts: torch's own files, exact round trips, and a
clear refusal, naming the tensor, of anything that does not fit the spec.

``data/torch_sequential.safetensors`` and ``.json`` were written by
``reference/make_torch_layout_fixture.py`` with torch (see that script); torch is not
needed here. Test inputs are written with the safetensors package, independently of the
engine's own writer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
from numpy.typing import NDArray

from propserve.engine import (
    LAYOUTS,
    InputError,
    ModelSpec,
    Network,
    Params,
    dump_network,
    export_weights,
    import_weights,
)
from propserve.engine.activations import FORWARD, gelu_backward, gelu_forward
from propserve.engine.serialization import decode
from propserve.engine.weights import torch_indices

HERE = Path(__file__).resolve().parent
FIXTURE = json.loads((HERE / "data" / "torch_sequential.json").read_text())
FIXTURE_BYTES = (HERE / "data" / "torch_sequential.safetensors").read_bytes()
DOCS = (HERE.parent.parent / "docs" / "weights.md").read_text()

# -- the tolerance of two implementations of one network --------------------------------
#
# Two implementations of the same network in the same precision (unit roundoff
# u = eps / 2) each differ from the exact result by at most an a-priori bound E, so from
# each other by at most 2 E. E is accumulated layer by layer, elementwise:
#
# - z = a W + b, a sum of n + 1 products in any order (with or without FMA), is within
#   gamma(n + 1) (|a| |W| + |b|) of exact, gamma(m) = m u / (1 - m u) (Higham, Accuracy and
#   Stability of Numerical Algorithms, 2nd ed., section 3.1); an error E_a of the input adds
#   E_a |W|.
# - an activation with Lipschitz constant L passes on L E_z, and its own evaluation (at
#   most ACTIVATION_ROUNDINGS roundings of a flop or libm call, whose errors are relative to
#   |z| or |a|: gelu's 1 + tanh cancels for negative z, sigmoid via tanh for large |z|)
#   adds ACTIVATION_ROUNDINGS u (|z| + |a|).
# - softmax: the Jacobian diag(p) - p p^T has infinity norm max 2 p (1 - p) <= 1/2, so it
#   passes on max_row(E_z) / 2; its exp, sum and division add (ACTIVATION_ROUNDINGS + 2 n) u
#   (|p| + 1) over n classes (exp's argument z - max(z) is rounded relative to itself, and
#   p |z - max(z)| <= 1/e).
#
# gelu (9 flops and a tanh, the longest) sets ACTIVATION_ROUNDINGS: 16 covers a tanh or exp
# of up to 7 ulps. The magnitudes are taken from the float64 forward pass of our weights.

ACTIVATION_ROUNDINGS = 16


def _gelu_lipschitz() -> float:
    """max |gelu'(z)| (about 1.13, near z = 2.4), from the engine's derivative on a grid."""
    z = np.linspace(-10.0, 10.0, 200_001)
    grad = gelu_backward(np.ones_like(z), z, gelu_forward(z, np.empty_like(z)), np.empty_like(z))
    return float(np.abs(grad).max())


LIPSCHITZ = {
    "identity": 1.0,
    "relu": 1.0,
    "leaky_relu": 1.0,
    "sigmoid": 0.25,
    "tanh": 1.0,
    "gelu": _gelu_lipschitz(),
}


def rounding_bound(spec: ModelSpec, params: Params, x: NDArray[Any]) -> NDArray[np.float64]:
    """2 E: how far two implementations of forward(spec, params, x) may differ, elementwise."""
    u = float(np.finfo(spec.dtype).eps) / 2
    a: NDArray[Any] = np.asarray(x, dtype=np.float64)
    error = np.zeros_like(a)
    for w, b, layer in zip(params.weights, params.biases, spec.layers, strict=True):
        w64, b64 = w.astype(np.float64), b.astype(np.float64)
        n = w.shape[0] + 1
        gamma = n * u / (1 - n * u)
        error_z = error @ np.abs(w64) + gamma * (np.abs(a) @ np.abs(w64) + np.abs(b64))
        z = a @ w64 + b64
        a = FORWARD[layer.activation](z, np.empty_like(z))
        if layer.activation == "softmax":
            error = error_z.max(axis=1, keepdims=True) / 2
            error = error + (ACTIVATION_ROUNDINGS + 2 * layer.units) * u * (np.abs(a) + 1)
        else:
            own = ACTIVATION_ROUNDINGS * u * (np.abs(z) + np.abs(a))
            error = LIPSCHITZ[layer.activation] * error_z + own
    return 2 * error


def assert_within_rounding(
    ours: NDArray[Any], reference: Any, bound: NDArray[np.float64], label: str
) -> None:
    """|ours - reference| <= bound everywhere; on failure print both and the worst entry."""
    got = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    assert got.shape == ref.shape, f"{label}: shape {got.shape} vs reference {ref.shape}"
    excess = np.abs(got - ref) - bound
    if not (excess <= 0).all():
        worst = np.unravel_index(int(np.argmax(excess)), got.shape)
        pytest.fail(
            f"{label}: |ours - reference| exceeds the rounding bound at {worst}: ours "
            f"{got[worst]!r}, reference {ref[worst]!r}, bound {bound[worst]:.3g}\n"
            f"  ours      {got.ravel()[:6]}\n  reference {ref.ravel()[:6]}"
        )


# -- helpers ------------------------------------------------------------------------------

SPEC: dict[str, Any] = {
    "input_dim": 4,
    "layers": [
        {"units": 6, "activation": "relu"},
        {"units": 5, "activation": "tanh"},
        {"units": 3},
    ],
    "loss": "softmax_cross_entropy",
}
OPTIMIZERS = [
    {"name": "sgd", "lr": 0.1},
    {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    {"name": "adam", "lr": 0.01},
    {"name": "adamw", "lr": 0.01},
]
OPTIMIZER_IDS = ["sgd", "sgd-momentum", "adam", "adamw"]
ADAM = OPTIMIZERS[2]
#: A change to a file's tensors, made in place.
Change = Callable[[dict[str, NDArray[Any]]], None]


def batches(seed: int, count: int) -> list[tuple[NDArray[Any], NDArray[Any]]]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(8, 4)), rng.integers(0, 3, size=8)) for _ in range(count)]


def trained(optimizer: dict[str, Any], dtype: str = "float32", steps: int = 4) -> Network:
    net = Network(ModelSpec.from_dict(SPEC | {"optimizer": optimizer, "dtype": dtype}))
    for x, y in batches(1, steps):
        net.train_step(x, y)
    return net


def rewrite(
    data: bytes, change: Change | None = None, metadata: dict[str, str] | None = None
) -> bytes:
    """``data`` written afresh by the safetensors package, after ``change(tensors)`` (of
    writable copies) and with ``metadata`` in place of its own if given."""
    tensors, meta = decode(data)
    arrays = {name: np.array(array) for name, array in tensors.items()}
    if change is not None:
        change(arrays)
    return bytes(safetensors.numpy.save(arrays, metadata if metadata is not None else meta))


def torch_fixture_spec() -> ModelSpec:
    return ModelSpec.from_dict(FIXTURE["spec"])


# -- torch's own files --------------------------------------------------------------------


def test_torch_state_dict_gives_torchs_outputs() -> None:
    spec = torch_fixture_spec()
    net = import_weights(spec, FIXTURE_BYTES, layout="torch")
    x = np.array(FIXTURE["inputs"], dtype=np.float32)
    bound = rounding_bound(spec, net.params, x)
    assert_within_rounding(net.forward(x), FIXTURE["outputs"], bound, "fixture outputs")
    assert net.step == 0


def test_torch_export_is_the_state_dict_bit_for_bit() -> None:
    net = import_weights(torch_fixture_spec(), FIXTURE_BYTES, layout="torch")
    ours, metadata = decode(export_weights(net, layout="torch"))
    theirs = safetensors.numpy.load(FIXTURE_BYTES)
    assert list(ours) == FIXTURE["tensors"]
    assert set(theirs) == set(ours)
    for name, array in theirs.items():
        assert ours[name].dtype == array.dtype and ours[name].shape == array.shape, name
        assert ours[name].tobytes() == array.tobytes(), name
    assert metadata["layout"] == "torch"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("x", "expected"), [([2, 3, 5], 3.2), ([-2, -3, -5], 0.0)])
def test_seed_example(layout: str, x: list[float], expected: float) -> None:
    spec = ModelSpec.from_dict(
        {"input_dim": 3, "layers": [{"units": 1, "activation": "relu"}], "loss": "mse"}
    )
    w = np.array([[0.4], [0.3], [0.2]], dtype=np.float32)
    weight = w.T if layout == "torch" else w
    prefix = "0" if layout == "torch" else "layers.0"
    data = safetensors.numpy.save(
        {f"{prefix}.weight": weight, f"{prefix}.bias": np.array([0.5], dtype=np.float32)}
    )
    net = import_weights(spec, data, layout=layout)
    rows = np.array([x], dtype=np.float32)
    bound = rounding_bound(spec, net.params, rows)
    assert_within_rounding(net.forward(rows), [[expected]], bound, f"seed example {x}")


# -- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=OPTIMIZER_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_is_exact_and_trains_on_identically(
    layout: str, optimizer: dict[str, Any], dtype: str
) -> None:
    original = trained(optimizer, dtype)
    copy = import_weights(original.spec, export_weights(original, layout=layout), layout=layout)
    assert export_weights(copy) == dump_network(original)
    for x, y in batches(2, 3):
        assert copy.train_step(x, y) == original.train_step(x, y)
        assert copy.params.flat.tobytes() == original.params.flat.tobytes()
    assert dump_network(copy) == dump_network(original)


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_propserve_export_is_dump_network(optimizer: dict[str, Any]) -> None:
    net = trained(optimizer)
    assert export_weights(net) == dump_network(net) == net.to_bytes()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parameters_only_start_at_step_0_with_fresh_optimizer_state(layout: str) -> None:
    original = trained(ADAM)
    data = export_weights(original, layout=layout, optimizer=False)
    tensors, metadata = decode(data)
    assert not any(name.startswith("optimizer.") for name in tensors)
    assert metadata["step"] == "4"
    copy = import_weights(original.spec, data, layout=layout)
    fresh = Network(original.spec, original.params.flat)
    assert copy.step == 0
    for x, y in batches(2, 3):
        assert copy.train_step(x, y) == fresh.train_step(x, y)
    assert dump_network(copy) == dump_network(fresh)


def test_an_optimizer_without_slots_keeps_the_step() -> None:
    net = trained({"name": "sgd", "lr": 0.1})
    data = export_weights(net, layout="torch", optimizer=False)
    assert import_weights(net.spec, data, layout="torch").step == 4
    without_step = rewrite(data, metadata={})
    assert import_weights(net.spec, without_step, layout="torch").step == 0


def test_torch_metadata_and_names() -> None:
    net = trained({"name": "sgd", "lr": 0.1, "momentum": 0.9})
    tensors, metadata = decode(export_weights(net, layout="torch"))
    assert list(tensors) == [
        f"{prefix}{k}.{kind}"
        for prefix in ("", "optimizer.momentum_buffer.")
        for k in (0, 2, 4)
        for kind in ("weight", "bias")
    ]
    assert tensors["0.weight"].shape == (6, 4)
    assert tensors["optimizer.momentum_buffer.2.weight"].shape == (5, 6)
    assert metadata == {
        "format": "propserve.mlp",
        "layout": "torch",
        "spec": json.dumps(net.spec.to_dict()),
        "step": "4",
    }


def _docs_index_table() -> list[tuple[list[str], list[int]]]:
    """The rows of docs/weights.md's module index table: activations and indices."""
    rows = re.findall(r"^\| ((?:[a-z_]+, )*[a-z_]+) \| ((?:\d+, )*\d+) \|$", DOCS, re.MULTILINE)
    return [(acts.split(", "), [int(k) for k in ks.split(", ")]) for acts, ks in rows]


def test_module_index_rule_and_its_table_in_the_docs() -> None:
    table = _docs_index_table()
    assert len(table) >= 3
    for activations, indices in table:
        loss = {"softmax": "softmax_cross_entropy", "sigmoid": "binary_cross_entropy"}
        spec = ModelSpec.from_dict(
            {
                "input_dim": 2,
                "layers": [{"units": 2, "activation": a} for a in activations],
                "loss": loss.get(activations[-1], "mse"),
            }
        )
        assert torch_indices(spec) == indices, activations


def test_torch_import_takes_any_indices_in_integer_order() -> None:
    net = trained(ADAM)
    renamed = {"0": "2", "2": "10", "4": "11"}  # as text, "10" < "11" < "2"

    def rename(arrays: dict[str, NDArray[Any]]) -> None:
        old = dict(arrays)
        arrays.clear()
        for name, array in old.items():
            stem, _, kind = name.rpartition(".")
            prefix, _, k = stem.rpartition(".")
            arrays[f"{prefix}.{renamed[k]}.{kind}".lstrip(".")] = array

    data = rewrite(export_weights(net, layout="torch"), rename)
    assert "optimizer.exp_avg.10.weight" in decode(data)[0]
    assert dump_network(import_weights(net.spec, data, layout="torch")) == dump_network(net)


@pytest.mark.parametrize(
    ("saved", "spec_dtype"),
    [("float16", "float32"), ("float64", "float32"), ("float32", "float64")],
)
def test_floating_tensors_are_converted_to_the_specs_dtype(saved: str, spec_dtype: str) -> None:
    net = trained(ADAM, "float64")
    data = rewrite(
        export_weights(net, layout="torch"),
        lambda arrays: arrays.update({k: v.astype(saved) for k, v in arrays.items()}),
    )
    spec = ModelSpec.from_dict(SPEC | {"optimizer": ADAM, "dtype": spec_dtype})
    copy = import_weights(spec, data, layout="torch")
    expected = net.params.flat.astype(saved).astype(spec_dtype)
    assert copy.params.flat.dtype == np.dtype(spec_dtype)
    assert copy.params.flat.tobytes() == expected.tobytes()
    assert copy.step == 4


# -- refusals -----------------------------------------------------------------------------


def _drop(*names: str) -> Change:
    def change(arrays: dict[str, NDArray[Any]]) -> None:
        for name in names:
            del arrays[name]

    return change


def _set(name: str, value: NDArray[Any]) -> Change:
    def change(arrays: dict[str, NDArray[Any]]) -> None:
        arrays[name] = value

    return change


def _nan(name: str) -> Change:
    def change(arrays: dict[str, NDArray[Any]]) -> None:
        arrays[name].flat[0] = np.nan

    return change


def refusal(
    name: str,
    written: str,
    change: Change | None,
    message: str,
    *,
    asked: str | None = None,
    metadata: dict[str, str] | None = None,
) -> Any:
    """A case: data exported from an adam network in layout ``written``, changed by
    ``change``, with ``metadata`` if given, imported in layout ``asked`` (default: the
    same), refused with a message matching ``message``."""
    return pytest.param(written, change, asked or written, metadata, message, id=name)


SLOTS_4 = [
    f"optimizer.{slot}.4.{kind}"
    for slot in ("exp_avg", "exp_avg_sq")
    for kind in ("weight", "bias")
]
EXP_AVG_SQ = [f"optimizer.exp_avg_sq.{k}.{kind}" for k in (0, 2, 4) for kind in ("weight", "bias")]
REFUSALS = [
    refusal(
        "missing",
        "propserve",
        _drop("layers.1.weight", "layers.1.bias"),
        r"lack tensor\(s\) 'layers\.1\.weight', 'layers\.1\.bias'",
    ),
    refusal(
        "missing-slot-tensor",
        "torch",
        _drop("optimizer.exp_avg.2.weight", "optimizer.exp_avg.2.bias"),
        r"lack tensor\(s\) 'optimizer\.exp_avg\.2\.weight'",
    ),
    refusal(
        "unexpected",
        "propserve",
        _set("extra", np.zeros(2, np.float32)),
        r"unexpected tensor\(s\) 'extra'",
    ),
    refusal(
        "unexpected-slot",
        "torch",
        _set("optimizer.momentum_buffer.0.bias", np.zeros(6, np.float32)),
        r"unexpected tensor\(s\) 'optimizer\.momentum_buffer\.0\.bias'.*"
        r"keeps: exp_avg, exp_avg_sq",
    ),
    refusal(
        "leading-zero-index",
        "torch",
        _set("04.bias", np.zeros(3, np.float32)),
        r"unexpected tensor\(s\) '04\.bias'",
    ),
    refusal(
        "torch-count",
        "torch",
        _drop("4.weight", "4.bias", *SLOTS_4),
        r"2 Linear module\(s\).*k in \[0, 2\].*spec has 3 layer\(s\)",
    ),
    refusal(
        "propserve-as-torch",
        "propserve",
        None,
        r"0 Linear module\(s\).*names look like layout 'propserve'",
        asked="torch",
    ),
    refusal(
        "torch-as-propserve",
        "torch",
        None,
        r"unexpected tensor\(s\) '0\.bias', '0\.weight'.*names look like layout 'torch'",
        asked="propserve",
        metadata={},
    ),
    refusal(
        "metadata-layout",
        "torch",
        None,
        r"metadata says layout 'torch', not 'propserve'; import them with layout='torch'",
        asked="propserve",
    ),
    refusal(
        "shape",
        "propserve",
        _set("layers.2.bias", np.zeros(4, np.float32)),
        r"'layers\.2\.bias' has shape \[4\], layer 2 of the spec needs \[3\]",
    ),
    refusal(
        "transposed",
        "torch",
        _set("2.weight", np.zeros((6, 5), np.float32)),
        r"'2\.weight' has shape \[6, 5\], layer 1 .* needs \[5, 6\] "
        r"\(out_features, in_features\).*transpose.*layout 'propserve'",
    ),
    refusal(
        "transposed-propserve",
        "propserve",
        _set("layers.0.weight", np.zeros((6, 4), np.float32)),
        r"needs \[4, 6\] \(n_in, n_out\) in layout 'propserve'.*layout 'torch'",
    ),
    refusal(
        "dtype",
        "torch",
        _set("0.bias", np.zeros(6, np.int64)),
        r"'0\.bias' has dtype int64; weights must be floating point",
    ),
    refusal("nan", "torch", _nan("2.weight"), r"'2\.weight' holds 1 non-finite"),
    refusal(
        "nan-slot",
        "torch",
        _nan("optimizer.exp_avg_sq.0.bias"),
        r"'optimizer\.exp_avg_sq\.0\.bias' holds 1 non-finite",
    ),
    refusal(
        "float32-range",
        "torch",
        _set("4.bias", np.array([1e39, 0, 0])),
        r"'4\.bias' holds values beyond the range of float32",
    ),
    refusal("weight-without-bias", "torch", _drop("2.bias"), r"'2\.weight' has no bias '2\.bias'"),
    refusal(
        "bias-without-weight",
        "propserve",
        _drop("layers.0.weight"),
        r"'layers\.0\.bias' has no weight 'layers\.0\.weight'",
    ),
    refusal(
        "partial-optimizer",
        "torch",
        _drop(*EXP_AVG_SQ),
        r"partial optimizer state: optimizer 'adam' keeps slots exp_avg, exp_avg_sq, the "
        r"weights have only exp_avg",
    ),
    refusal(
        "slots-without-step",
        "torch",
        None,
        r"optimizer slots are given without a 'step' metadata entry",
        metadata={},
    ),
    refusal(
        "negative-step",
        "torch",
        None,
        r"metadata 'step' must be a non-negative integer, got '-1'",
        metadata={"step": "-1"},
    ),
    refusal(
        "fractional-step",
        "propserve",
        None,
        r"metadata 'step' must be a non-negative integer, got '1\.5'",
        metadata={"step": "1.5"},
    ),
]


@pytest.mark.parametrize(("written", "change", "asked", "metadata", "message"), REFUSALS)
def test_weights_that_do_not_fit_are_refused_naming_the_problem(
    written: str, change: Change | None, asked: str, metadata: dict[str, str] | None, message: str
) -> None:
    net = trained(ADAM)
    data = rewrite(export_weights(net, layout=written), change, metadata)
    with pytest.raises(InputError, match=message):
        import_weights(net.spec, data, layout=asked)


@pytest.mark.parametrize("data", [b"", b"not safetensors at all", b"\xff" * 16])
def test_bytes_that_are_not_safetensors_are_refused(data: bytes) -> None:
    with pytest.raises(InputError, match="weights are not safetensors data"):
        import_weights(trained(ADAM).spec, data)


def test_an_unknown_layout_is_refused() -> None:
    net = trained(ADAM)
    with pytest.raises(
        InputError, match="unknown weights layout 'keras'; expected one of propserve, torch"
    ):
        import_weights(net.spec, net.to_bytes(), layout="keras")
    with pytest.raises(InputError, match="unknown weights layout 'keras'"):
        export_weights(net, layout="keras")


def test_the_docs_name_the_layouts_and_rules() -> None:
    for phrase in ("`propserve`", "`torch`", "load_state_dict", "`step`", "InputError"):
        assert phrase in DOCS, phrase
