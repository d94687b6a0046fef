"""A dense MLP as an ONNX model that computes what :func:`~propserve.engine.network.forward`
computes (see docs/weights.md#onnx).

The graph: input "input" (batch, input_dim) and output "output" (batch, outputs), of
tensor(float) or tensor(double) per the spec's dtype, with a dynamic "batch" dimension.
Per layer i, with its W (n_in, n_out) and b (n_out,) as initializers ``layers.{i}.weight``
and ``layers.{i}.bias``: MatMul, Add, then the layer's activation. The output layer's
activation is the spec's, which forward applies for every loss: softmax (over the last
axis) for softmax_cross_entropy, sigmoid for binary_cross_entropy, the chosen one for mse.

Opset 17 (onnx 1.12): every op used here is unchanged since opset 16 or earlier, so the
file runs on any runtime of the last years. Gelu would need opset 20 (onnx 1.15), so gelu
is built from Mul, Add and Tanh in the engine's own order of operations.

The onnx package is imported only when a model is built: the engine runs without it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from propserve.engine.activations import _GELU_C, _GELU_K, LEAKY_SLOPE
from propserve.engine.errors import InputError
from propserve.engine.network import Params
from propserve.engine.spec import ModelSpec

ONNX_OPSET = 17
_INSTALL_HINT = "pip install 'propserve[onnx]'"
#: Activations that are one ONNX op of the same name and attributes.
_SINGLE_OPS: dict[str, tuple[str, dict[str, Any]]] = {
    "relu": ("Relu", {}),
    "sigmoid": ("Sigmoid", {}),
    "tanh": ("Tanh", {}),
    "softmax": ("Softmax", {"axis": -1}),
}


def to_onnx(spec: ModelSpec, params: Params, *, name: str = "propserve") -> bytes:
    """The network of ``spec`` with ``params`` as a serialised ONNX ModelProto.

    ``name`` names the graph. The model passes ``onnx.checker.check_model`` (full check)
    before it is returned; its metadata props hold the spec (JSON) and the step.
    Raises ImportError naming the extra to install when onnx is missing.
    """
    try:
        import onnx  # noqa: PLC0415 - optional dependency, imported on use
        from onnx import helper, numpy_helper  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(f"ONNX export needs the onnx package: {_INSTALL_HINT}") from exc
    dtype = np.dtype(spec.dtype)
    if params.flat.shape != (spec.n_params,) or params.flat.dtype != dtype:
        raise InputError(
            f"parameters {params.flat.dtype}{list(params.flat.shape)} do not fit the spec, "
            f"which needs {dtype}[{spec.n_params}]"
        )
    nodes: list[Any] = []
    initializers: list[Any] = []
    constants: dict[float, str] = {}

    def constant(value: float) -> str:
        """A scalar initializer in the spec's dtype, shared by every use of the value."""
        if value not in constants:
            constants[value] = f"const.{len(constants)}"
            array = np.asarray(value, dtype=dtype)
            initializers.append(numpy_helper.from_array(array, constants[value]))
        return constants[value]

    def node(op: str, inputs: list[str], output: str, **attributes: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def activation(kind: str, z: str, out: str) -> None:
        if kind in _SINGLE_OPS:
            op, attributes = _SINGLE_OPS[kind]
            node(op, [z], out, **attributes)
        elif kind == "leaky_relu":
            # NOTE: LeakyRelu's alpha is a 32-bit float attribute, which would change a
            # float64 network's slope in the ninth digit; max(z, slope z) with the slope in
            # the spec's dtype is the engine's own formula.
            scaled = node("Mul", [z, constant(LEAKY_SLOPE)], f"{out}.scaled")
            node("Max", [z, scaled], out)
        elif kind == "gelu":
            # z/2 (1 + tanh(c (z + k z^3))) in the engine's order: t = ((z z k + 1) z) c.
            t = node("Mul", [z, z], f"{out}.z2")
            t = node("Mul", [t, constant(_GELU_K)], f"{out}.kz2")
            t = node("Add", [t, constant(1.0)], f"{out}.1_kz2")
            t = node("Mul", [t, z], f"{out}.z_kz3")
            t = node("Mul", [t, constant(_GELU_C)], f"{out}.inner")
            t = node("Tanh", [t], f"{out}.tanh")
            t = node("Add", [t, constant(1.0)], f"{out}.1_tanh")
            t = node("Mul", [t, constant(0.5)], f"{out}.half")
            node("Mul", [z, t], out)
        else:
            raise InputError(f"activation {kind!r} has no ONNX form")

    a = "input"
    last = len(spec.layers) - 1
    for i, (w, b, layer) in enumerate(zip(params.weights, params.biases, spec.layers, strict=True)):
        stem = f"layers.{i}"
        out = "output" if i == last else f"{stem}.a"
        initializers += [
            numpy_helper.from_array(w, f"{stem}.weight"),
            numpy_helper.from_array(b, f"{stem}.bias"),
        ]
        xw = node("MatMul", [a, f"{stem}.weight"], f"{stem}.xw")
        if layer.activation == "identity":
            node("Add", [xw, f"{stem}.bias"], out)
        else:
            z = node("Add", [xw, f"{stem}.bias"], f"{stem}.z")
            activation(layer.activation, z, out)
        a = out

    element = helper.np_dtype_to_tensor_dtype(dtype)
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", element, ["batch", spec.input_dim])],
        [helper.make_tensor_value_info("output", element, ["batch", spec.n_outputs])],
        initializer=initializers,
    )
    opset = helper.make_opsetid("", ONNX_OPSET)
    # The oldest IR version that can carry the opset, so runtimes as old as the opset read it.
    model = helper.make_model(
        graph,
        opset_imports=[opset],
        ir_version=helper.find_min_ir_version_for([opset]),
        producer_name="propserve",
    )
    helper.set_model_props(
        model, {"propserve.spec": json.dumps(spec.to_dict()), "propserve.step": str(params.step)}
    )
    onnx.checker.check_model(model, full_check=True)
    data: bytes = model.SerializeToString()
    return data
