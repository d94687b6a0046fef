"""ONNX export: onnxruntime, an independent implementation, computes what the engine's
forward pass computes, for every activation, loss and dtype, at any batch size.

The tolerance is the rounding bound of two implementations of one network, derived in
test_weights.py (:func:`rounding_bound`): a gamma(n) bound per dot product, Lipschitz
constants per activation, and a few roundings per activation evaluation.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from propserve.engine import ONNX_OPSET, InputError, ModelSpec, Network, forward, to_onnx
from propserve.engine.spec import HIDDEN_ACTIVATIONS
from tests.engine.test_weights import assert_within_rounding, rounding_bound

ort = pytest.importorskip("onnxruntime")

DOCS = (Path(__file__).resolve().parents[2] / "docs" / "weights.md").read_text()
INPUT_DIM = 5
OUTPUTS = 3
#: (loss, output activation): every output the spec allows.
OUTPUT_CASES = [("mse", activation) for activation in HIDDEN_ACTIVATIONS] + [
    ("binary_cross_entropy", "sigmoid"),
    ("softmax_cross_entropy", "softmax"),
]
BATCHES = (1, 9)


def make_spec(hidden: str, loss: str, output: str, dtype: str) -> ModelSpec:
    return ModelSpec.from_dict(
        {
            "input_dim": INPUT_DIM,
            "layers": [
                {"units": 7, "activation": hidden},
                {"units": 6, "activation": hidden},
                {"units": OUTPUTS, "activation": output},
            ],
            "loss": loss,
            "optimizer": {"name": "adam", "lr": 0.05},
            "dtype": dtype,
            "init": "xavier_uniform",
            "seed": 3,
        }
    )


def targets(loss: str, rng: np.random.Generator, rows: int) -> NDArray[Any]:
    if loss == "softmax_cross_entropy":
        return rng.integers(0, OUTPUTS, size=rows)
    if loss == "binary_cross_entropy":
        return (rng.random((rows, OUTPUTS)) > 0.5).astype(np.float64)
    return rng.normal(size=(rows, OUTPUTS))


def trained(spec: ModelSpec, steps: int = 8) -> Network:
    """A network some steps away from its initialisation, so biases are not zero."""
    net = Network(spec)
    rng = np.random.default_rng(7)
    for _ in range(steps):
        net.train_step(rng.normal(size=(16, INPUT_DIM)), targets(spec.loss, rng, 16))
    return net


def session(model: bytes) -> Any:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("loss", "output"), OUTPUT_CASES, ids=[o for _, o in OUTPUT_CASES])
@pytest.mark.parametrize("hidden", HIDDEN_ACTIVATIONS)
def test_onnxruntime_computes_the_engines_forward(
    hidden: str, loss: str, output: str, dtype: str
) -> None:
    spec = make_spec(hidden, loss, output, dtype)
    params = trained(spec).params
    run = session(to_onnx(spec, params))
    rng = np.random.default_rng(11)
    for rows in BATCHES:
        # Rows of scale 1 and of scale 4, where sigmoid, tanh and gelu saturate.
        x = (rng.normal(size=(rows, INPUT_DIM)) * rng.choice([1.0, 4.0], size=(rows, 1))).astype(
            dtype
        )
        (theirs,) = run.run(["output"], {"input": x})
        assert theirs.dtype == np.dtype(dtype)
        ours = forward(spec, params, x)
        bound = rounding_bound(spec, params, x)
        assert_within_rounding(theirs, ours, bound, f"{hidden}/{output} {dtype} batch {rows}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_graph_interface_opset_and_checker(dtype: str) -> None:
    import onnx  # noqa: PLC0415 - a dev dependency, needed only here

    spec = make_spec("gelu", "softmax_cross_entropy", "softmax", dtype)
    net = trained(spec, steps=2)
    model = onnx.load_from_string(to_onnx(spec, net.params, name="digits"))
    onnx.checker.check_model(model, full_check=True)
    element = onnx.TensorProto.FLOAT if dtype == "float32" else onnx.TensorProto.DOUBLE
    for value, width in ((model.graph.input[0], INPUT_DIM), (model.graph.output[0], OUTPUTS)):
        tensor = value.type.tensor_type
        assert tensor.elem_type == element
        assert [d.dim_param or d.dim_value for d in tensor.shape.dim] == ["batch", width]
    assert (model.graph.input[0].name, model.graph.output[0].name) == ("input", "output")
    assert model.graph.name == "digits"
    assert [(o.domain, o.version) for o in model.opset_import] == [("", ONNX_OPSET)]
    initializers = {t.name for t in model.graph.initializer}
    assert {f"layers.{i}.{kind}" for i in range(3) for kind in ("weight", "bias")} <= initializers
    props = {p.key: p.value for p in model.metadata_props}
    assert ModelSpec.from_dict(__import__("json").loads(props["propserve.spec"])) == spec
    assert props["propserve.step"] == "2"


def test_gelu_is_built_from_ops_of_the_opset() -> None:
    import onnx  # noqa: PLC0415

    spec = make_spec("gelu", "mse", "leaky_relu", "float64")
    model = onnx.load_from_string(to_onnx(spec, trained(spec, steps=1).params))
    ops = {node.op_type for node in model.graph.node}
    assert ops == {"MatMul", "Add", "Mul", "Tanh", "Max"}


def test_parameters_of_another_spec_are_refused() -> None:
    spec = make_spec("relu", "mse", "identity", "float32")
    other = make_spec("relu", "mse", "identity", "float64")
    with pytest.raises(InputError, match=r"do not fit the spec, which needs float32\["):
        to_onnx(spec, Network(other).params)


def test_without_onnx_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    spec = make_spec("relu", "mse", "identity", "float32")
    with pytest.raises(ImportError, match=r"pip install 'propserve\[onnx\]'"):
        to_onnx(spec, Network(spec).params)


def test_the_engine_imports_without_onnx() -> None:
    code = "import sys, propserve.engine; sys.exit('onnx' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_docs_name_the_opset() -> None:
    assert f"opset {ONNX_OPSET}" in DOCS
    assert f"ONNX_OPSET = {ONNX_OPSET}" in DOCS
