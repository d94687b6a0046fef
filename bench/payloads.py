"""Prediction requests for model A, built once and sent as bytes: the gRPC PredictRequest
serialized, and the REST bodies as JSON."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import orjson
from numpy.typing import NDArray

from bench.common import DIMS_A
from propserve.v1 import model_service_pb2 as pb

PREDICT_METHOD = "/propserve.v1.ModelService/Predict"


def rows_of(rows: int) -> NDArray[np.float32]:
    """``rows`` standard-normal inputs of model A, the same for the same ``rows``."""
    return np.random.default_rng(rows).standard_normal((rows, DIMS_A[0]), dtype=np.float32)


def predict_path(model: str) -> str:
    return f"/v1/models/{model}/predict"


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
