"""Prediction requests for model A, built once and sent as bytes: propserve's own (the gRPC
PredictRequest serialized, the /v1 REST bodies as JSON) and the Open Inference Protocol's (a
ModelInferRequest serialized by propserve's generated messages, which have the protocol's
wire format; the /v2 infer bodies as JSON and as binary tensor data), all carrying the same
rows."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import orjson
from numpy.typing import NDArray

from bench.common import DIMS_A
from propserve.oip import open_inference_pb2 as oip_pb
from propserve.v1 import model_service_pb2 as pb

PREDICT_METHOD = "/propserve.v1.ModelService/Predict"
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
#: The input tensor's name in an OIP request: propserve's models take "inputs" (MLServer's
#: runtime in bench/peers reads its first input, whatever its name).
OIP_INPUT = "inputs"
#: The binary tensor data extension's header: the length of the body's JSON part.
HEADER_LENGTH = "Inference-Header-Content-Length"


def rows_of(rows: int) -> NDArray[np.float32]:
    """``rows`` standard-normal inputs of model A, the same for the same ``rows``."""
    return np.random.default_rng(rows).standard_normal((rows, DIMS_A[0]), dtype=np.float32)


def predict_path(model: str) -> str:
    return f"/v1/models/{model}/predict"


def infer_path(model: str) -> str:
    return f"/v2/models/{model}/infer"


@dataclass(frozen=True)
class Payloads:
    rows: int
    grpc: bytes  # a serialized PredictRequest (float32 raw bytes)
    rest: bytes  # {"inputs": nested lists}, as JSON
    rest_b64: bytes  # {"inputs": {b64, shape, dtype}}, as JSON (the REST clients' default)


def make_payloads(model: str, rows: int) -> Payloads:
    x = rows_of(rows)
    tensor = pb.Tensor(shape=list(x.shape), dtype=pb.DTYPE_FLOAT32, data=x.tobytes())
    grpc_bytes = pb.PredictRequest(model=model, inputs=tensor).SerializeToString()
    rest_bytes = orjson.dumps({"inputs": x.tolist()})
    b64 = {
        "b64": base64.b64encode(x.tobytes()).decode(),
        "shape": list(x.shape),
        "dtype": "float32",
    }
    return Payloads(rows, grpc_bytes, rest_bytes, orjson.dumps({"inputs": b64}))


@dataclass(frozen=True)
class OipPayloads:
    """The Open Inference Protocol's requests of ``rows`` rows (FP32, input "inputs"), beside
    /v1's flat JSON form of the same numbers."""

    rows: int
    grpc: bytes  # a serialized ModelInferRequest, the values in raw_input_contents
    rest: bytes  # {"inputs": [{name, shape, datatype, data: flat numbers}]}, as JSON
    rest_nested: bytes  # the same with ``data`` nested by rows
    binary: bytes  # a JSON header, then the rows' raw little-endian bytes
    binary_header: dict[str, str]  # the headers a binary body goes with
    v1_flat: bytes  # /v1's {"inputs": {"data": flat numbers, "shape", "dtype"}}, as JSON


def make_oip_payloads(model: str, rows: int) -> OipPayloads:
    x = rows_of(rows)
    shape = list(x.shape)
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    request = oip_pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=OIP_INPUT, datatype="FP32", shape=shape)
    request.raw_input_contents.append(raw)

    def rest(data: list[float] | list[list[float]]) -> bytes:
        tensor = {"name": OIP_INPUT, "shape": shape, "datatype": "FP32", "data": data}
        return orjson.dumps({"inputs": [tensor]})

    # NOTE: binary outputs too, as the extension's clients ask (tritonclient's binary_data).
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": OIP_INPUT,
                    "shape": shape,
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    flat = {"data": x.ravel().tolist(), "shape": shape, "dtype": "float32"}
    return OipPayloads(
        rows,
        request.SerializeToString(),
        rest(x.ravel().tolist()),
        rest(x.tolist()),
        head + raw,
        {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"},
        orjson.dumps({"inputs": flat}),
    )


def binary_outputs(body: bytes, header_length: int) -> tuple[dict[str, object], bytes]:
    """A binary infer answer's JSON header and the bytes after it."""
    head = orjson.loads(body[:header_length])
    if not isinstance(head, dict):
        raise ValueError("the answer's header is not a JSON object")
    return head, body[header_length:]
