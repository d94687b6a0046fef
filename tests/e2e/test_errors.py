"""Every row of DESIGN.md's error table, on both transports, against the real server.

Requests go over the raw wire (generated gRPC stubs, plain httpx), not through the project's
clients, which never send a malformed message. The shared cases live in
tests/data/requests/errors.json; cases that only one transport can express (wrong byte
counts, NaN bytes, malformed JSON, streams) are written out below. After every bad request
the models are checked unchanged: head step, versions, labels, settings and a prediction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import re
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from propserve.v1 import model_service_pb2 as pb
from propserve.v1 import model_service_pb2_grpc as pb_grpc
from tests.support.server import ServerProcess, start_server

CASES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parents[1] / "data" / "requests" / "errors.json").read_text()
)["cases"]

#: DESIGN.md's error table, gRPC status -> HTTP status (written out here, not imported, so
#: that a change to the server's own table is caught).
HTTP_FOR = {
    "NOT_FOUND": 404,
    "INVALID_ARGUMENT": 400,
    "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 409,
    "RESOURCE_EXHAUSTED": 413,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "UNAVAILABLE": 503,
    "INTERNAL": 500,
}
WIRE_DTYPES = {
    "float32": (pb.DTYPE_FLOAT32, "<f4"),
    "float64": (pb.DTYPE_FLOAT64, "<f8"),
    "int32": (pb.DTYPE_INT32, "<i4"),
    "int64": (pb.DTYPE_INT64, "<i8"),
}
TIMEOUT = 10.0
INTERNAL_MESSAGE = re.compile(r"internal error \(request id [0-9a-f]+\)")

MSE_SPEC: dict[str, Any] = {
    "input_dim": 3,
    "layers": [{"units": 4, "activation": "tanh"}, {"units": 2}],
    "loss": "mse",
    "optimizer": {"name": "sgd", "lr": 0.05},
    "seed": 1,
}
CLASSIFIER_SPEC: dict[str, Any] = {
    "input_dim": 4,
    "layers": [{"units": 3}],
    "loss": "softmax_cross_entropy",
    "seed": 2,
}
PROBES = {
    "m": np.random.default_rng(0).standard_normal((3, 3)),
    "c": np.random.default_rng(1).standard_normal((3, 4)),
}


# --- the raw wire -----------------------------------------------------------------------


def tensor(array: Any, dtype: str = "float32") -> pb.Tensor:
    enum, np_dtype = WIRE_DTYPES[dtype]
    data = np.asarray(array, dtype=np_dtype)
    return pb.Tensor(shape=list(data.shape), dtype=enum, data=data.tobytes())


def case_tensor(spec: dict[str, Any]) -> pb.Tensor:
    enum, np_dtype = WIRE_DTYPES[spec["dtype"]]
    data = np.asarray(spec["data"], dtype=np_dtype).tobytes()
    return pb.Tensor(shape=spec["shape"], dtype=enum, data=data)


def decode(message: pb.Tensor) -> np.ndarray[Any, Any]:
    np_dtype = {enum: np_dtype for enum, np_dtype in WIRE_DTYPES.values()}[message.dtype]
    return np.frombuffer(message.data, dtype=np_dtype).reshape(list(message.shape))


@dataclass(frozen=True)
class Failure:
    """A refused request as its gRPC status name (or HTTP error code) and message."""

    code: str
    message: str


def grpc_failure(call: Callable[[], object]) -> Failure:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return Failure(caught.value.code().name, caught.value.details() or "")


def rest_failure(response: httpx.Response, status: int) -> Failure:
    """The error of ``response``, which must have ``status`` and the error envelope."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    return Failure(body["error"]["code"].upper(), body["error"]["message"])


@dataclass
class Wire:
    """One server's raw gRPC stub and HTTP client."""

    server: ServerProcess
    channel: grpc.Channel
    stub: pb_grpc.ModelServiceStub
    http: httpx.Client

    def grpc_case(self, case: dict[str, Any], metadata: Any = None) -> Callable[[], object]:
        """A call that sends ``case`` over gRPC."""
        op, model = case["op"], case.get("model", "")
        kw: dict[str, Any] = {"timeout": TIMEOUT, "metadata": metadata}
        settings = pb.ModelSettings(**case.get("settings", {}))
        if op == "Predict":
            predict = pb.PredictRequest(model=model, inputs=case_tensor(case["inputs"]))
            if "version" in case:
                predict.version = case["version"]
            if "label" in case:
                predict.label = case["label"]
            return lambda: self.stub.Predict(predict, **kw)
        if op == "TrainStep":
            step = train_request(case, model)
            return lambda: self.stub.TrainStep(step, **kw)
        if op == "CreateModel":
            create = pb.CreateModelRequest(
                name=case["name"], spec_json=json.dumps(case["spec"]), settings=settings
            )
            return lambda: self.stub.CreateModel(create, **kw)
        if op == "UpdateModel":
            update = pb.UpdateModelRequest(name=model, settings=settings)
            return lambda: self.stub.UpdateModel(update, **kw)
        if op == "SetLabel":
            label = pb.SetLabelRequest(model=model, label=case["label"], version=case["version"])
            return lambda: self.stub.SetLabel(label, **kw)
        if op == "RemoveLabel":
            remove = pb.RemoveLabelRequest(model=model, label=case["label"])
            return lambda: self.stub.RemoveLabel(remove, **kw)
        if op == "Rollback":
            rollback = pb.RollbackRequest(model=model)
            if "version" in case:
                rollback.version = case["version"]
            if "label" in case:
                rollback.label = case["label"]
            return lambda: self.stub.Rollback(rollback, **kw)
        simple: dict[str, tuple[Any, Any]] = {
            "GetModel": (self.stub.GetModel, pb.GetModelRequest(name=model)),
            "DeleteModel": (self.stub.DeleteModel, pb.DeleteModelRequest(name=model)),
            "SaveVersion": (self.stub.SaveVersion, pb.SaveVersionRequest(model=model)),
            "ListVersions": (self.stub.ListVersions, pb.ListVersionsRequest(model=model)),
        }
        method, request = simple[op]
        return lambda: method(request, **kw)

    def rest_case(self, case: dict[str, Any], headers: Any = None) -> httpx.Response:
        """Send ``case`` over REST."""
        op, model = case["op"], case.get("model", "")
        path = f"/v1/models/{model}"
        body: dict[str, Any] | None = None
        pick: dict[str, Any] = {
            k: case[k] for k in ("version", "label", "learning_rate") if k in case
        }
        if op == "Predict":
            method, path = "POST", f"{path}/predict"
            body = {"inputs": case["inputs"], **pick}
        elif op == "TrainStep":
            method, path = "POST", f"{path}/train_step"
            body = {"inputs": case["inputs"], "targets": case["targets"], **pick}
        elif op == "CreateModel":
            method, path = "POST", "/v1/models"
            body = {"name": case["name"], "spec": case["spec"]}
            if "settings" in case:
                body["settings"] = case["settings"]
        elif op == "UpdateModel":
            method, body = "PATCH", {"settings": case["settings"]}
        elif op == "SetLabel":
            method, path = "PUT", f"{path}/labels/{case['label']}"
            body = {"version": case["version"]}
        elif op == "RemoveLabel":
            method, path = "DELETE", f"{path}/labels/{case['label']}"
        elif op == "Rollback":
            method, path = "POST", f"{path}/rollback"
            body = {k: v for k, v in pick.items() if k in ("version", "label")}
        else:
            method, path = {
                "GetModel": ("GET", path),
                "DeleteModel": ("DELETE", path),
                "SaveVersion": ("POST", f"{path}/versions"),
                "ListVersions": ("GET", f"{path}/versions"),
            }[op]
        return self.http.request(method, path, json=body, headers=headers)

    # -- state of a model --------------------------------------------------------------

    def names(self) -> set[str]:
        listed = self.stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT)
        return {m.name for m in listed.models}

    def state(self, name: str) -> tuple[Any, ...]:
        """Everything a bad request must not change about model ``name``."""
        info = self.stub.GetModel(pb.GetModelRequest(name=name), timeout=TIMEOUT)
        versions = self.stub.ListVersions(pb.ListVersionsRequest(model=name), timeout=TIMEOUT)
        prediction = self.predict(name, PROBES[name])
        return (
            info.head_step,
            info.unsaved_steps,
            info.latest_version,
            dict(info.labels),
            info.settings.retain,
            info.settings.autosave_every,
            [(v.version, v.step, v.sha256) for v in versions.versions],
            prediction.step,
            prediction.outputs.data,
        )

    def predict(self, name: str, x: Any, metadata: Any = None) -> pb.PredictResponse:
        request = pb.PredictRequest(model=name, inputs=tensor(x))
        response: pb.PredictResponse = self.stub.Predict(
            request, timeout=TIMEOUT, metadata=metadata
        )
        return response

    def head_step(self, name: str) -> int:
        return self.stub.GetModel(pb.GetModelRequest(name=name), timeout=TIMEOUT).head_step

    def create(self, name: str, spec: dict[str, Any], metadata: Any = None) -> None:
        request = pb.CreateModelRequest(name=name, spec_json=json.dumps(spec))
        self.stub.CreateModel(request, timeout=TIMEOUT, metadata=metadata)

    def train(self, name: str, x: Any, y: Any, metadata: Any = None) -> pb.TrainStepResponse:
        request = pb.TrainStepRequest(model=name, inputs=tensor(x), targets=tensor(y))
        response: pb.TrainStepResponse = self.stub.TrainStep(
            request, timeout=TIMEOUT, metadata=metadata
        )
        return response


def train_request(case: dict[str, Any], model: str) -> pb.TrainStepRequest:
    request = pb.TrainStepRequest(
        model=model, inputs=case_tensor(case["inputs"]), targets=case_tensor(case["targets"])
    )
    if "learning_rate" in case:
        request.learning_rate = case["learning_rate"]
    return request


@contextmanager
def connect(server: ServerProcess) -> Iterator[Wire]:
    channel = grpc.insecure_channel(server.grpc_target)
    http = httpx.Client(base_url=server.rest_url, timeout=TIMEOUT)
    try:
        yield Wire(server, channel, pb_grpc.ModelServiceStub(channel), http)
    finally:
        http.close()
        channel.close()


@contextmanager
def running(tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[Wire]:
    """A server of its own (settings that differ from the shared one), stopped at the end."""
    process = start_server(tmp_path / "store", env=env, log_dir=tmp_path)
    try:
        with connect(process) as wire:
            yield wire
    finally:
        process.stop()


def batch(seed: int, rows: int = 4, width: int = 3, outputs: int = 2) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, width)), rng.standard_normal((rows, outputs))


# --- the shared server and its models ---------------------------------------------------


@pytest.fixture(scope="module")
def wire(server: ServerProcess) -> Iterator[Wire]:
    """Models m (trained 3 steps, version 1 labelled 'stable', 1 unsaved step) and c (fresh)."""
    with connect(server) as opened:
        opened.create("m", MSE_SPEC)
        opened.create("c", CLASSIFIER_SPEC)
        for seed in (1, 2):
            opened.train("m", *batch(seed))
        opened.stub.SaveVersion(pb.SaveVersionRequest(model="m"), timeout=TIMEOUT)
        opened.stub.SetLabel(pb.SetLabelRequest(model="m", label="stable", version=1))
        opened.train("m", *batch(3))
        yield opened


@pytest.fixture(scope="module")
def baseline(wire: Wire) -> dict[str, tuple[Any, ...]]:
    state = {name: wire.state(name) for name in ("m", "c")}
    assert state["m"][:4] == (3, 1, 1, {"stable": 1})
    return state


@pytest.fixture
def intact(wire: Wire, baseline: dict[str, tuple[Any, ...]]) -> Iterator[None]:
    """Checks, after the test, that models m and c are as they were."""
    names = wire.names()
    yield
    assert wire.names() == names
    for name, state in baseline.items():
        assert wire.state(name) == state, f"model {name!r} changed"


# --- the table, case by case --------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
@pytest.mark.usefixtures("intact")
def test_grpc(wire: Wire, case: dict[str, Any]) -> None:
    failure = grpc_failure(wire.grpc_case(case))
    assert failure.code == case["code"], failure.message
    assert case["message"] in failure.message


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
@pytest.mark.usefixtures("intact")
def test_rest(wire: Wire, case: dict[str, Any]) -> None:
    status = case.get("http", HTTP_FOR[case["code"]])
    failure = rest_failure(wire.rest_case(case), status)
    assert failure.code == case["code"]
    assert case["message"] in failure.message


def test_every_core_error_has_a_case() -> None:
    codes = {case["code"] for case in CASES}
    assert codes == {"NOT_FOUND", "INVALID_ARGUMENT", "ALREADY_EXISTS", "FAILED_PRECONDITION"}
    ops = {case["op"] for case in CASES}
    assert ops == {
        "CreateModel",
        "GetModel",
        "DeleteModel",
        "UpdateModel",
        "Predict",
        "TrainStep",
        "SaveVersion",
        "ListVersions",
        "SetLabel",
        "RemoveLabel",
        "Rollback",
    }


# --- what only gRPC can send ------------------------------------------------------------


def _predict_raw(wire: Wire, inputs: pb.Tensor) -> Failure:
    request = pb.PredictRequest(model="m", inputs=inputs)
    return grpc_failure(lambda: wire.stub.Predict(request, timeout=TIMEOUT))


@pytest.mark.usefixtures("intact")
@pytest.mark.parametrize("size", [0, 23, 25, 48])
def test_grpc_bytes_must_match_the_shape(wire: Wire, size: int) -> None:
    failure = _predict_raw(wire, pb.Tensor(shape=[2, 3], dtype=pb.DTYPE_FLOAT32, data=b"\0" * size))
    assert failure.code == "INVALID_ARGUMENT"
    assert f"inputs: tensor data has {size} bytes; shape [2, 3] of float32 needs 24" in (
        failure.message
    )


@pytest.mark.usefixtures("intact")
def test_grpc_targets_bytes_must_match_the_shape(wire: Wire) -> None:
    x, _ = batch(4, rows=2)
    targets = pb.Tensor(shape=[2, 2], dtype=pb.DTYPE_FLOAT64, data=b"\0" * 16)
    request = pb.TrainStepRequest(model="m", inputs=tensor(x), targets=targets)
    failure = grpc_failure(lambda: wire.stub.TrainStep(request, timeout=TIMEOUT))
    assert failure.code == "INVALID_ARGUMENT"
    assert "targets: tensor data has 16 bytes" in failure.message


@pytest.mark.usefixtures("intact")
def test_grpc_dtype_must_be_set(wire: Wire) -> None:
    inputs = pb.Tensor(shape=[1, 3], data=np.zeros(3, "<f4").tobytes())
    failure = _predict_raw(wire, inputs)
    assert failure.code == "INVALID_ARGUMENT"
    assert "dtype must be set" in failure.message
    unknown = pb.Tensor(shape=[1, 3], data=b"\0" * 12)
    unknown.dtype = 17  # type: ignore[assignment]  # an enum value this API does not define
    failure = _predict_raw(wire, unknown)
    assert failure.code == "INVALID_ARGUMENT"


@pytest.mark.usefixtures("intact")
def test_grpc_negative_dimension(wire: Wire) -> None:
    failure = _predict_raw(wire, pb.Tensor(shape=[-1, 3], dtype=pb.DTYPE_FLOAT32, data=b""))
    assert failure.code == "INVALID_ARGUMENT"
    assert "invalid dimension -1" in failure.message


@pytest.mark.usefixtures("intact")
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_grpc_non_finite_inputs(wire: Wire, value: float, dtype: str) -> None:
    x = np.ones((2, 3))
    x[1, 2] = value
    failure = _predict_raw(wire, tensor(x, dtype))
    assert failure.code == "INVALID_ARGUMENT"
    assert "non-finite value" in failure.message
    assert "(1, 2)" in failure.message
    y = np.zeros((2, 2))
    request = pb.TrainStepRequest(model="m", inputs=tensor(x, dtype), targets=tensor(y))
    failure = grpc_failure(lambda: wire.stub.TrainStep(request, timeout=TIMEOUT))
    assert failure.code == "INVALID_ARGUMENT"
    x[1, 2] = 0.0
    y[0, 1] = value
    request = pb.TrainStepRequest(model="m", inputs=tensor(x, dtype), targets=tensor(y, dtype))
    failure = grpc_failure(lambda: wire.stub.TrainStep(request, timeout=TIMEOUT))
    assert failure.code == "INVALID_ARGUMENT"
    assert "targets contain a non-finite value" in failure.message


@pytest.mark.usefixtures("intact")
@pytest.mark.parametrize("spec_json", ["", "{", "not json", '{"input_dim": 3,}'])
def test_grpc_malformed_spec_json(wire: Wire, spec_json: str) -> None:
    request = pb.CreateModelRequest(name="new", spec_json=spec_json)
    failure = grpc_failure(lambda: wire.stub.CreateModel(request, timeout=TIMEOUT))
    assert failure.code == "INVALID_ARGUMENT"
    assert "spec_json is not valid JSON" in failure.message


@pytest.mark.usefixtures("intact")
def test_grpc_deeply_nested_spec_json_is_invalid(wire: Wire) -> None:
    request = pb.CreateModelRequest(name="new", spec_json="[" * 100_000)
    failure = grpc_failure(lambda: wire.stub.CreateModel(request, timeout=TIMEOUT))
    assert failure.code == "INVALID_ARGUMENT"


# --- what only REST can send ------------------------------------------------------------


MALFORMED = [
    ("/v1/models/m/predict", b'{"inputs": [[1, 2, 3]]'),
    ("/v1/models/m/train_step", b"{"),
    ("/v1/models", b'{"name": "new", "spec": }'),
    ("/v1/models/m", b"{settings"),
    # The tensor routes parse with orjson, which (rightly) knows no NaN or Infinity.
    ("/v1/models/m/predict", b'{"inputs": [[NaN, 1, 2]]}'),
    ("/v1/models/m/predict", b'{"inputs": [[1, 2, Infinity]]}'),
    ("/v1/models/m/train_step", b'{"inputs": [[1, 2, 3]], "targets": [[1e999, 0]]}'),
]


@pytest.mark.usefixtures("intact")
@pytest.mark.parametrize(("path", "body"), MALFORMED)
def test_rest_malformed_json(wire: Wire, path: str, body: bytes) -> None:
    method = "PATCH" if path == "/v1/models/m" else "POST"
    response = wire.http.request(
        method, path, content=body, headers={"content-type": "application/json"}
    )
    failure = rest_failure(response, 400)
    assert failure.code == "INVALID_ARGUMENT"
    assert "not valid JSON" in failure.message


@pytest.mark.usefixtures("intact")
@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"1e999"])
def test_rest_non_finite_spec_values(wire: Wire, value: bytes) -> None:
    body = b'{"name": "new", "spec": {"input_dim": 3, "layers": [{"units": 2}], "loss": "mse", '
    body += b'"optimizer": {"name": "sgd", "lr": ' + value + b"}}}"
    response = wire.http.post(
        "/v1/models", content=body, headers={"content-type": "application/json"}
    )
    failure = rest_failure(response, 400)
    assert "optimizer.lr" in failure.message


@pytest.mark.usefixtures("intact")
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1, 2, 3], "must be a JSON object"),
        ({}, "missing field(s) ['inputs']"),
        ({"inputs": [[1.0, 2.0, 3.0]], "extra": 1}, "unknown field"),
        ({"inputs": [[1.0, 2.0, 3.0], [4.0, 5.0]]}, "rectangular"),
        ({"inputs": [["a", "b", "c"]]}, "numbers"),
        ({"inputs": [[1.0, {"x": 2}, 3.0]]}, "numbers"),
        ({"inputs": [[1.0, None, 3.0]]}, ""),
        ({"inputs": "1,2,3"}, "JSON array"),
        ({"inputs": {"data": [1, 2, 3], "shape": [1, 3], "dtype": "int32"}}, "floating point"),
        ({"inputs": []}, "rank 2"),
        ({"inputs": [[[1.0, 2.0, 3.0]]]}, "rank 2"),
        ({"inputs": {"data": [1, 2], "shape": [1, 3]}}, "flat data has 2 values"),
        ({"inputs": {"data": [1, 2, 3], "shape": [1, 3], "dtype": "float16"}}, "unsupported"),
        ({"inputs": {"data": [1, 2, 3], "shape": "1x3"}}, "shape"),
        ({"inputs": {"data": [1, 2, 3]}}, "{data, shape"),
        ({"inputs": {"data": [1, 2, 3], "shape": [1, 3], "order": "C"}}, "{data, shape"),
        ({"inputs": [[1.0, 2.0, 3.0]], "version": "1"}, "invalid version '1'"),
        ({"inputs": [[1.0, 2.0, 3.0]], "version": True}, "invalid version True"),
        ({"inputs": [[1.0, 2.0, 3.0]], "version": 4.0}, "invalid version 4.0"),
        ({"inputs": [[1.0, 2.0, 3.0]], "version": None}, "version must not be null"),
        ({"inputs": [[1.0, 2.0, 3.0]], "label": None}, "label must not be null"),
        ({"inputs": [[1.0, 2.0, 3.0]], "label": 5}, "invalid label name 5"),
        ({"inputs": {"b64": "AAAA", "shape": [1, 3], "dtype": "float32"}}, "has 3 bytes"),
        ({"inputs": {"b64": "AA!A", "shape": [1, 1], "dtype": "float32"}}, "not valid base64"),
        ({"inputs": {"b64": "AAAA", "shape": [1, 1]}}, "{b64, shape, dtype}"),
        ({"inputs": {"b64": "AAAA", "shape": [1, 1], "dtype": None}}, "needs its dtype"),
        ({"inputs": {"b64": 5, "shape": [1, 1], "dtype": "float32"}}, "b64 must be a string"),
        ({"inputs": {"b64": "AAAA", "data": [], "shape": [1], "dtype": "int32"}}, "{b64, shape"),
        (
            {"inputs": {"b64": "AAAAAAAAAAAAAAAA", "shape": [1, 3], "dtype": "int32"}},
            "floating point",
        ),
        (
            {"inputs": {"b64": "AADAfwAAgD8AAIA/", "shape": [1, 3], "dtype": "float32"}},
            "non-finite value (nan) at index (0, 0)",
        ),
    ],
)
def test_rest_bad_predict_bodies(wire: Wire, body: Any, message: str) -> None:
    failure = rest_failure(wire.http.post("/v1/models/m/predict", json=body), 400)
    assert failure.code == "INVALID_ARGUMENT"
    assert message in failure.message


@pytest.mark.usefixtures("intact")
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": [[1.0, 2.0, 3.0]]}, "missing field(s) ['targets']"),
        ({"inputs": [[1.0, 2.0, 3.0]], "targets": [[1.0, 2.0]], "learning_rate": None}, "null"),
        ({"inputs": [[1.0, 2.0, 3.0]], "targets": [[1.0, 2.0]], "lr": 0.1}, "unknown field"),
        ({"inputs": [[1.0, 2.0, 3.0]], "targets": [[1.0, 2.0]], "learning_rate": "fast"}, "number"),
        ({"inputs": [[1.0, 2.0, 3.0]], "targets": [[1.0, 2.0]], "learning_rate": True}, "number"),
        ({"inputs": [[1.0, 2.0, 3.0]], "targets": [[1.0], [2.0, 3.0]]}, "rectangular"),
        ({"inputs": [[1.0, 2.0, 3.0]], "targets": [["a", "b"]]}, "numbers"),
    ],
)
def test_rest_bad_train_step_bodies(wire: Wire, body: Any, message: str) -> None:
    failure = rest_failure(wire.http.post("/v1/models/m/train_step", json=body), 400)
    assert failure.code == "INVALID_ARGUMENT"
    assert message in failure.message


@pytest.mark.usefixtures("intact")
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/models", [1, 2]),
        ("POST", "/v1/models", {"name": "new"}),
        ("POST", "/v1/models", {"name": "new", "spec": "mse"}),
        ("POST", "/v1/models", {"name": "new", "spec": MSE_SPEC, "owner": "me"}),
        ("POST", "/v1/models", {"name": "new", "spec": MSE_SPEC, "settings": {"keep": 1}}),
        ("PATCH", "/v1/models/m", {"settings": {"retain": "many"}}),
        ("PATCH", "/v1/models/m", {}),
        ("PUT", "/v1/models/m/labels/x", {"version": 0}),
        ("PUT", "/v1/models/m/labels/x", {}),
        ("POST", "/v1/models/m/rollback", {"version": 0}),
        ("POST", "/v1/models/m/rollback", {"version": 1, "step": 2}),
    ],
)
def test_rest_body_validation_answers_422(wire: Wire, method: str, path: str, body: Any) -> None:
    failure = rest_failure(wire.http.request(method, path, json=body), 422)
    assert failure.code == "INVALID_ARGUMENT"
    assert failure.message


@pytest.mark.usefixtures("intact")
def test_rest_strings_in_tensors_are_refused(wire: Wire) -> None:
    response = wire.http.post("/v1/models/m/predict", json={"inputs": [[1.0, "2", 3.0]]})
    rest_failure(response, 400)


@pytest.mark.usefixtures("intact")
@pytest.mark.parametrize("path", ["/v1/models/..%2Fx/predict", "/v1/models/%2E%2E/predict"])
def test_rest_path_traversal_is_refused(wire: Wire, path: str) -> None:
    response = wire.http.post(path, json={"inputs": [[1.0, 2.0, 3.0]]})
    assert response.status_code in (400, 404), response.text
    assert not (wire.server.store.parent / "x").exists()


@pytest.mark.usefixtures("intact")
@pytest.mark.parametrize(
    "inputs",
    [
        {"data": [1, 2, 2**40], "shape": [1, 3], "dtype": "int32"},
        {"data": [1, 2, 2**63], "shape": [1, 3], "dtype": "int64"},
    ],
)
def test_rest_integers_out_of_range_are_invalid(server: ServerProcess, inputs: Any) -> None:
    # NOTE: a fresh client: after a 500 the server drops the connection.
    with httpx.Client(base_url=server.rest_url, timeout=TIMEOUT) as http:
        response = http.post("/v1/models/m/predict", json={"inputs": inputs})
    assert response.status_code == 400, response.text


# --- Train streams ----------------------------------------------------------------------


def stream(
    wire: Wire, requests: list[pb.TrainStepRequest], metadata: Any = None
) -> tuple[list[pb.TrainStepResponse], Failure | None]:
    """Send ``requests`` on one Train stream; the responses, and how the stream ended."""
    responses: list[pb.TrainStepResponse] = []
    try:
        for response in wire.stub.Train(iter(requests), timeout=TIMEOUT, metadata=metadata):
            responses.append(response)
    except grpc.RpcError as exc:
        return responses, Failure(exc.code().name, exc.details() or "")
    return responses, None


def step_request(model: str, seed: int, width: int = 3) -> pb.TrainStepRequest:
    x, y = batch(seed, width=width)
    return pb.TrainStepRequest(model=model, inputs=tensor(x), targets=tensor(y))


@pytest.mark.parametrize(
    ("bad", "code", "message"),
    [
        (step_request("", 12, width=5), "INVALID_ARGUMENT", "batch 2: inputs have 5 features"),
        (
            pb.TrainStepRequest(inputs=tensor(np.ones((4, 3))), targets=tensor(np.ones((4, 5)))),
            "INVALID_ARGUMENT",
            "batch 2: targets must have shape (4, 2)",
        ),
        (
            pb.TrainStepRequest(
                inputs=pb.Tensor(shape=[2, 3], dtype=pb.DTYPE_FLOAT32, data=b"\0" * 7),
                targets=tensor(np.ones((2, 2))),
            ),
            "INVALID_ARGUMENT",
            "batch 2: inputs: tensor data has 7 bytes",
        ),
        (
            pb.TrainStepRequest(
                inputs=tensor(np.full((2, 3), 1e20)), targets=tensor(np.full((2, 2), -1e20))
            ),
            "FAILED_PRECONDITION",
            "batch 2: step 3 refused",
        ),
    ],
    ids=["width", "targets", "bytes", "diverging"],
)
def test_a_bad_batch_ends_the_stream_and_earlier_steps_stay(
    wire: Wire, bad: pb.TrainStepRequest, code: str, message: str
) -> None:
    name = f"stream-{code.lower()}-{len(message)}"
    wire.create(name, MSE_SPEC)
    requests = [step_request(name, 10), step_request("", 11), bad, step_request("", 13)]
    responses, failure = stream(wire, requests)
    assert [r.step for r in responses] == [1, 2]
    assert failure is not None
    assert failure.code == code
    assert message in failure.message
    assert wire.head_step(name) == 2
    # The head is exactly the two good steps, and it trains on.
    assert wire.train(name, *batch(14)).step == 3


def test_a_stream_on_an_unknown_model(wire: Wire) -> None:
    responses, failure = stream(wire, [step_request("ghost", 1)])
    assert responses == []
    assert failure == Failure("NOT_FOUND", "batch 0: model 'ghost' not found")


def test_a_stream_must_name_its_model(wire: Wire) -> None:
    responses, failure = stream(wire, [step_request("", 1)])
    assert responses == []
    assert failure is not None
    assert failure.code == "INVALID_ARGUMENT"
    assert "must name the model" in failure.message


def test_a_stream_may_not_switch_models(wire: Wire) -> None:
    wire.create("switch-a", MSE_SPEC)
    wire.create("switch-b", MSE_SPEC)
    responses, failure = stream(wire, [step_request("switch-a", 1), step_request("switch-b", 2)])
    assert len(responses) == 1
    assert failure is not None
    assert failure.code == "INVALID_ARGUMENT"
    assert "differs from the stream's model" in failure.message
    assert (wire.head_step("switch-a"), wire.head_step("switch-b")) == (1, 0)


def test_a_stream_switching_models_names_the_batch(wire: Wire) -> None:
    wire.create("switch-c", MSE_SPEC)
    _, failure = stream(wire, [step_request("switch-c", 1), step_request("m", 2)])
    assert failure is not None
    assert "batch 1" in failure.message


# --- bytes that are not the method's message -------------------------------------------

#: Not a valid encoding of any message: a length-delimited field 1 that runs past the end.
UNDECODABLE = b"\x0a\x05ab"


@pytest.mark.usefixtures("intact")
@pytest.mark.parametrize(
    "method", [m.name for m in pb.DESCRIPTOR.services_by_name["ModelService"].methods]
)
def test_undecodable_messages_are_invalid_argument(wire: Wire, method: str) -> None:
    descriptor = pb.DESCRIPTOR.services_by_name["ModelService"].methods_by_name[method]
    path = f"/propserve.v1.ModelService/{method}"
    if descriptor.client_streaming:
        call: Any = wire.channel.stream_stream(path)
        failure = grpc_failure(lambda: list(call(iter([UNDECODABLE]), timeout=TIMEOUT)))
    else:
        call = wire.channel.unary_unary(path)
        failure = grpc_failure(lambda: call(UNDECODABLE, timeout=TIMEOUT))
    assert failure.code == "INVALID_ARGUMENT"
    assert f"the request is not a valid {descriptor.input_type.full_name}" in failure.message
    assert "Error" not in failure.message and "class" not in failure.message


def test_an_undecodable_batch_ends_the_stream_and_earlier_steps_stay(wire: Wire) -> None:
    wire.create("stream-undecodable", MSE_SPEC)
    good = step_request("stream-undecodable", 21).SerializeToString()
    call: Any = wire.channel.stream_stream("/propserve.v1.ModelService/Train")
    answered: list[bytes] = []

    def run() -> None:
        answered.extend(call(iter([good, UNDECODABLE, good]), timeout=TIMEOUT))

    failure = grpc_failure(run)
    assert len(answered) == 1
    assert failure.code == "INVALID_ARGUMENT"
    assert failure.message.startswith("batch 1: the request is not a valid")
    assert wire.head_step("stream-undecodable") == 1


# --- limits: message bytes, rows, elements, parameters ----------------------------------

LIMITS = {
    "PROPSERVE_MAX_MESSAGE_BYTES": "4096",
    "PROPSERVE_MAX_ROWS": "4",
    "PROPSERVE_MAX_PARAMS": "100",
}
SMALL_SPEC: dict[str, Any] = {
    "input_dim": 3,
    "layers": [{"units": 4, "activation": "relu"}, {"units": 2}],
    "loss": "mse",
}
BIG_SPEC: dict[str, Any] = {"input_dim": 30, "layers": [{"units": 4}], "loss": "mse"}  # 124


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wire]:
    """A server with small limits and a model 'small' (26 parameters) trained one step."""
    with running(tmp_path_factory.mktemp("limited"), LIMITS) as opened:
        opened.create("small", SMALL_SPEC)
        opened.train("small", *batch(1))
        yield opened


@pytest.fixture
def small_intact(limited: Wire) -> Iterator[None]:
    x = np.ones((1, 3))
    step, outputs = limited.head_step("small"), limited.predict("small", x).outputs.data
    names = limited.names()
    yield
    assert limited.head_step("small") == step
    assert limited.predict("small", x).outputs.data == outputs
    assert limited.names() <= names | {"rows"}


@pytest.mark.usefixtures("small_intact")
def test_grpc_oversized_message(limited: Wire) -> None:
    x = np.zeros((4, 300))  # 9,600 bytes of float64
    request = pb.PredictRequest(model="small", inputs=tensor(x, "float64"))
    failure = grpc_failure(lambda: limited.stub.Predict(request, timeout=TIMEOUT))
    assert failure.code == "RESOURCE_EXHAUSTED"


@pytest.mark.usefixtures("small_intact")
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/v1/models/small/predict", "/v1/models/small/train_step"])
def test_rest_oversized_body(limited: Wire, path: str, chunked: bool) -> None:
    body = json.dumps({"inputs": [[0.5, 0.5, 0.5]] * 400, "targets": [[0.0, 0.0]] * 400})
    assert len(body) > 4096
    content: Any = body.encode()
    if chunked:
        data = content
        content = (data[i : i + 1000] for i in range(0, len(data), 1000))
    response = limited.http.post(
        path, content=content, headers={"content-type": "application/json"}
    )
    failure = rest_failure(response, 413)
    assert failure.code == "RESOURCE_EXHAUSTED"
    assert "4,096" in failure.message


@pytest.mark.usefixtures("small_intact")
def test_rest_oversized_chunked_create_body(limited: Wire) -> None:
    body = json.dumps({"name": "huge", "spec": {**SMALL_SPEC, "pad": "x" * 5000}}).encode()
    chunks = (body[i : i + 1000] for i in range(0, len(body), 1000))
    response = limited.http.post(
        "/v1/models", content=chunks, headers={"content-type": "application/json"}
    )
    rest_failure(response, 413)


@pytest.mark.usefixtures("small_intact")
def test_rows_limit(limited: Wire) -> None:
    x, y = batch(2, rows=5)
    predict = pb.PredictRequest(model="small", inputs=tensor(x))
    step = pb.TrainStepRequest(model="small", inputs=tensor(x), targets=tensor(y))
    for call in (
        lambda: limited.stub.Predict(predict, timeout=TIMEOUT),
        lambda: limited.stub.TrainStep(step, timeout=TIMEOUT),
    ):
        failure = grpc_failure(call)
        assert failure.code == "RESOURCE_EXHAUSTED"
        assert "5 rows in one request; the limit is 4" in failure.message
    for path, body in (
        ("/v1/models/small/predict", {"inputs": x.tolist()}),
        ("/v1/models/small/train_step", {"inputs": x.tolist(), "targets": y.tolist()}),
    ):
        failure = rest_failure(limited.http.post(path, json=body), 413)
        assert failure.code == "RESOURCE_EXHAUSTED"
        assert "limit is 4" in failure.message
    limited.create("rows", SMALL_SPEC)
    too_many = pb.TrainStepRequest(inputs=tensor(x), targets=tensor(y))
    responses, ended = stream(limited, [step_request("rows", 3), too_many])
    assert ended is not None
    assert ended.code == "RESOURCE_EXHAUSTED"
    assert "batch 1: 5 rows" in ended.message
    assert len(responses) == 1
    assert limited.head_step("rows") == 1


@pytest.mark.usefixtures("small_intact")
def test_elements_limit(limited: Wire) -> None:
    """A shape that claims more elements than any message could carry is refused before
    its data is looked at."""
    inputs = pb.Tensor(shape=[100_000, 3], dtype=pb.DTYPE_FLOAT32, data=b"")
    failure = _predict_raw_on(limited, "small", inputs)
    assert failure.code == "RESOURCE_EXHAUSTED"
    assert "elements; the limit is 1,024" in failure.message
    body = {"inputs": {"data": [0.5, 0.5, 0.5], "shape": [100_000, 3]}}
    failure = rest_failure(limited.http.post("/v1/models/small/predict", json=body), 413)
    assert "elements; the limit is 1,024" in failure.message


def _predict_raw_on(wire: Wire, model: str, inputs: pb.Tensor) -> Failure:
    request = pb.PredictRequest(model=model, inputs=inputs)
    return grpc_failure(lambda: wire.stub.Predict(request, timeout=TIMEOUT))


@pytest.mark.usefixtures("small_intact")
def test_parameter_limit_refuses_the_model(limited: Wire) -> None:
    request = pb.CreateModelRequest(name="big", spec_json=json.dumps(BIG_SPEC))
    failure = grpc_failure(lambda: limited.stub.CreateModel(request, timeout=TIMEOUT))
    assert failure.code in ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT")
    assert "124 parameters exceed the limit of 100" in failure.message
    response = limited.http.post("/v1/models", json={"name": "big", "spec": BIG_SPEC})
    assert response.status_code in (400, 413)
    assert "big" not in limited.names()


@pytest.mark.usefixtures("small_intact")
@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_parameter_limit_is_resource_exhausted(limited: Wire, transport: str) -> None:
    if transport == "grpc":
        request = pb.CreateModelRequest(name="big", spec_json=json.dumps(BIG_SPEC))
        failure = grpc_failure(lambda: limited.stub.CreateModel(request, timeout=TIMEOUT))
    else:
        response = limited.http.post("/v1/models", json={"name": "big", "spec": BIG_SPEC})
        failure = rest_failure(response, 413)
    assert failure.code == "RESOURCE_EXHAUSTED"


# --- authentication and roles -----------------------------------------------------------

PREDICT_TOKEN = "predict-token-0123456789"
TRAIN_TOKEN = "train-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789"
TOKENS = f"{PREDICT_TOKEN}=predict;{TRAIN_TOKEN}=train;{ADMIN_TOKEN}=admin"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wire]:
    """A server with tokens and a model 'm' (one step trained, version 1 labelled 'stable')."""
    with running(tmp_path_factory.mktemp("secured"), {"PROPSERVE_TOKENS": TOKENS}) as opened:
        opened.create("m", MSE_SPEC, metadata=bearer(ADMIN_TOKEN))
        opened.train("m", *batch(1), metadata=bearer(TRAIN_TOKEN))
        opened.stub.SaveVersion(
            pb.SaveVersionRequest(model="m"), timeout=TIMEOUT, metadata=bearer(TRAIN_TOKEN)
        )
        opened.stub.SetLabel(
            pb.SetLabelRequest(model="m", label="stable", version=1),
            timeout=TIMEOUT,
            metadata=bearer(ADMIN_TOKEN),
        )
        yield opened


@pytest.fixture
def secured_intact(secured: Wire) -> Iterator[None]:
    auth = bearer(ADMIN_TOKEN)
    x = np.ones((1, 3))

    def state() -> tuple[Any, ...]:
        info = secured.stub.GetModel(pb.GetModelRequest(name="m"), timeout=TIMEOUT, metadata=auth)
        outputs = secured.predict("m", x, metadata=auth).outputs.data
        listed = secured.stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT, metadata=auth)
        return (info.head_step, info.latest_version, dict(info.labels), outputs, len(listed.models))

    before = state()
    yield
    assert state() == before


#: One request per operation, each valid for model 'm' (so only authorisation can refuse it),
#: and the least role it needs.
AUTH_CASES: list[tuple[dict[str, Any], str]] = [
    ({"op": "GetModel", "model": "m"}, "predict"),
    ({"op": "ListVersions", "model": "m"}, "predict"),
    (
        {
            "op": "Predict",
            "model": "m",
            "inputs": {"data": [1, 2, 3], "shape": [1, 3], "dtype": "float32"},
        },
        "predict",
    ),
    (
        {
            "op": "TrainStep",
            "model": "m",
            "inputs": {"data": [1, 2, 3], "shape": [1, 3], "dtype": "float32"},
            "targets": {"data": [0, 0], "shape": [1, 2], "dtype": "float32"},
        },
        "train",
    ),
    ({"op": "SaveVersion", "model": "m"}, "train"),
    ({"op": "CreateModel", "name": "new", "spec": MSE_SPEC}, "admin"),
    ({"op": "DeleteModel", "model": "m"}, "admin"),
    ({"op": "UpdateModel", "model": "m", "settings": {"retain": 5}}, "admin"),
    ({"op": "SetLabel", "model": "m", "label": "canary", "version": 1}, "admin"),
    ({"op": "RemoveLabel", "model": "m", "label": "stable"}, "admin"),
    ({"op": "Rollback", "model": "m", "version": 1}, "admin"),
]
AUTH_IDS = [case["op"] for case, _ in AUTH_CASES]
BAD_CREDENTIALS = {
    "missing": None,
    "unknown": "Bearer not-a-token-anyone-knows",
    "malformed": f"Basic {ADMIN_TOKEN}",
    "empty": "Bearer",
}


@pytest.mark.usefixtures("secured_intact")
@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS))
@pytest.mark.parametrize(("case", "role"), AUTH_CASES, ids=AUTH_IDS)
def test_unauthenticated(secured: Wire, case: dict[str, Any], role: str, credentials: str) -> None:
    value = BAD_CREDENTIALS[credentials]
    metadata = None if value is None else (("authorization", value),)
    failure = grpc_failure(secured.grpc_case(case, metadata))
    assert failure.code == "UNAUTHENTICATED"
    headers = None if value is None else {"authorization": value}
    failure = rest_failure(secured.rest_case(case, headers), 401)
    assert failure.code == "UNAUTHENTICATED"


@pytest.mark.usefixtures("secured_intact")
@pytest.mark.parametrize(("case", "role"), AUTH_CASES, ids=AUTH_IDS)
def test_permission_denied(secured: Wire, case: dict[str, Any], role: str) -> None:
    weaker = {"predict": [], "train": [PREDICT_TOKEN], "admin": [PREDICT_TOKEN, TRAIN_TOKEN]}
    for token in weaker[role]:
        failure = grpc_failure(secured.grpc_case(case, bearer(token)))
        assert failure.code == "PERMISSION_DENIED"
        assert f"needs the role '{role}'" in failure.message
        failure = rest_failure(secured.rest_case(case, {"authorization": f"Bearer {token}"}), 403)
        assert failure.code == "PERMISSION_DENIED"


def test_sufficient_roles_are_let_through(secured: Wire) -> None:
    x, y = batch(5, rows=2)
    secured.predict("m", x, metadata=bearer(PREDICT_TOKEN))
    step = secured.train("m", x, y, metadata=bearer(TRAIN_TOKEN)).step
    response = secured.http.post(
        "/v1/models/m/train_step",
        json={"inputs": x.tolist(), "targets": y.tolist()},
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["step"] == step + 1
    rollback = pb.RollbackRequest(model="m", label="stable")
    info = secured.stub.Rollback(rollback, timeout=TIMEOUT, metadata=bearer(ADMIN_TOKEN))
    assert info.head_step == 1


@pytest.mark.usefixtures("secured_intact")
def test_train_streams_need_the_train_role(secured: Wire) -> None:
    requests = [step_request("m", 1)]
    _, failure = stream(secured, requests)
    assert failure is not None
    assert failure.code == "UNAUTHENTICATED"
    _, failure = stream(secured, requests, metadata=bearer(PREDICT_TOKEN))
    assert failure is not None
    assert failure.code == "PERMISSION_DENIED"


@pytest.mark.usefixtures("secured_intact")
def test_credentials_are_checked_before_the_request(secured: Wire) -> None:
    """Without a token, a bad request is refused for the token, not for its content."""
    case = {
        "op": "Predict",
        "model": "nope",
        "inputs": {"data": [1], "shape": [1], "dtype": "int32"},
    }
    assert grpc_failure(secured.grpc_case(case)).code == "UNAUTHENTICATED"
    assert rest_failure(secured.rest_case(case), 401).code == "UNAUTHENTICATED"
    response = secured.http.post("/v1/models/m/predict", content=b"{")
    assert rest_failure(response, 401).code == "UNAUTHENTICATED"


@pytest.mark.usefixtures("secured_intact")
def test_malformed_create_body_without_a_token_is_unauthenticated(secured: Wire) -> None:
    response = secured.http.post(
        "/v1/models", content=b"{", headers={"content-type": "application/json"}
    )
    assert rest_failure(response, 401).code == "UNAUTHENTICATED"


def test_health_stays_open(secured: Wire) -> None:
    assert secured.http.get("/healthz").json() == {"status": "ok"}
    assert secured.http.get("/readyz").json() == {"status": "ready"}
    health = health_pb2_grpc.HealthStub(secured.channel)
    for service in ("", "propserve.v1.ModelService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


# --- shutting down ----------------------------------------------------------------------


def test_draining_server_answers_unavailable(tmp_path: Path) -> None:
    """While a Train stream is in flight after SIGTERM, new calls are refused UNAVAILABLE;
    the stream itself finishes, and the server exits 0 having saved the head."""
    process = start_server(tmp_path / "store", log_dir=tmp_path)
    feed: queue.Queue[pb.TrainStepRequest | None] = queue.Queue()

    def requests() -> Iterator[pb.TrainStepRequest]:
        for _ in range(10):
            item = feed.get(timeout=TIMEOUT)
            if item is None:
                return
            yield item

    try:
        with connect(process) as wire:
            wire.create("m", MSE_SPEC)
            responses = wire.stub.Train(requests(), timeout=3 * TIMEOUT)
            feed.put(step_request("m", 1))
            assert next(responses).step == 1

            process.process.send_signal(signal.SIGTERM)
            statuses: list[str] = []
            ready_codes: set[int] = set()
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline and "UNAVAILABLE" not in statuses:
                try:
                    with httpx.Client(base_url=process.rest_url, timeout=1.0) as http:
                        ready = http.get("/readyz")
                    ready_codes.add(ready.status_code)
                    if ready.status_code == 503:
                        assert rest_failure(ready, 503).code == "UNAVAILABLE"
                except httpx.TransportError:
                    pass  # the REST listener has closed
                try:
                    wire.head_step("m")
                    statuses.append("OK")
                except grpc.RpcError as exc:
                    statuses.append(exc.code().name)
                time.sleep(0.01)
            assert statuses[-1] == "UNAVAILABLE", statuses
            assert ready_codes <= {200, 503}

            # The in-flight stream still trains and ends normally.
            feed.put(step_request("", 2))
            assert next(responses).step == 2
            feed.put(None)
            assert list(responses) == []
        assert process.stop() == 0
    finally:
        feed.put(None)
        process.kill()

    restarted = start_server(tmp_path / "store", log_dir=tmp_path)
    try:
        with connect(restarted) as wire:
            assert wire.head_step("m") == 2
    finally:
        restarted.stop()


def in_process_failures(tmp_path: Path, prepare: Any) -> tuple[Failure, Failure, str]:
    """Predict once over REST (ASGI, in process) and once over gRPC (a grpc.aio server on
    loopback) against a core that ``prepare(core)`` has set up to fail; returns both
    failures and the captured log."""
    from propserve.service.auth import Authenticator  # noqa: PLC0415 - only here
    from propserve.service.config import Settings  # noqa: PLC0415
    from propserve.service.dataplane import DataPlane  # noqa: PLC0415
    from propserve.service.grpc.server import add_services, new_server  # noqa: PLC0415
    from propserve.service.grpc.servicer import ModelService  # noqa: PLC0415
    from propserve.service.models import Models  # noqa: PLC0415
    from propserve.service.rest.app import RestApp  # noqa: PLC0415
    from propserve.service.store import ModelStore  # noqa: PLC0415

    settings = Settings(store=tmp_path / "store", max_message_bytes=1 << 18)
    core = Models(ModelStore(settings.store), settings)
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Capture()
    logging.getLogger("propserve").addHandler(handler)
    try:
        core.create_model("m", MSE_SPEC)
        prepare(core)
        auth = Authenticator({})
        plane = DataPlane(core, auth, core.metrics, settings)
        app = RestApp(plane, core.metrics, ready=lambda: False, version="test")

        async def call_rest() -> Failure:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                assert rest_failure(await client.get("/readyz"), 503).code == "UNAVAILABLE"
                assert (await client.get("/healthz")).status_code == 200
                body = {"inputs": [[1.0, 2.0, 3.0]]}
                response = await client.post("/v1/models/m/predict", json=body)
                failure = rest_failure(response, response.status_code)
                assert response.headers["x-request-id"]
                return failure

        rest = asyncio.run(call_rest())

        async def call_grpc() -> Failure:
            server = new_server(max_message_bytes=1 << 20)
            add_services(server, ModelService(plane))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = pb_grpc.ModelServiceStub(channel)
                    request = pb.PredictRequest(model="m", inputs=tensor(np.ones((1, 3))))
                    try:
                        await stub.Predict(request, timeout=TIMEOUT)
                    except grpc.aio.AioRpcError as exc:
                        return Failure(exc.code().name, exc.details() or "")
                    raise AssertionError("Predict succeeded on a failing core")
            finally:
                await server.stop(0)

        return (
            rest,
            asyncio.run(call_grpc()),
            "\n".join(r.getMessage() + (str(r.exc_info[1]) if r.exc_info else "") for r in records),
        )
    finally:
        logging.getLogger("propserve").removeHandler(handler)
        plane.close()
        core.close()


def test_a_shutting_down_core_answers_unavailable_on_both_transports(tmp_path: Path) -> None:
    """The core's Unavailable through each adapter's table, in process: on a real server the
    listeners close before the core refuses anything, so this row cannot be reached there
    without a race."""
    rest, grpc_failure_, _ = in_process_failures(tmp_path, lambda core: core.begin_shutdown())
    assert rest == Failure("UNAVAILABLE", "the server is shutting down")
    assert grpc_failure_ == Failure("UNAVAILABLE", "the server is shutting down")


def test_an_unexpected_exception_is_internal_without_internals(tmp_path: Path) -> None:
    """A bug (here: the core's batched predict raising a plain exception) answers
    INTERNAL / 500 with only a request id, and is logged with its traceback."""

    def break_predict(core: Any) -> None:
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("secret internal detail")

        core.predict_batch = broken

    rest, grpc_failure_, log = in_process_failures(tmp_path, break_predict)
    for failure in (rest, grpc_failure_):
        assert failure.code == "INTERNAL"
        assert INTERNAL_MESSAGE.fullmatch(failure.message), failure.message
        assert "secret" not in failure.message
    assert log.count("request.internal_error") == 2
    assert "secret internal detail" in log


def test_a_bug_in_a_framework_route_answers_the_envelope(tmp_path: Path) -> None:
    """An unexpected exception in a route the framework serves is answered like one in the
    predict endpoint: a JSON 500 with only the request id, and logged with its traceback."""
    from propserve.service.auth import Authenticator  # noqa: PLC0415 - only here
    from propserve.service.config import Settings  # noqa: PLC0415
    from propserve.service.dataplane import DataPlane  # noqa: PLC0415
    from propserve.service.models import Models  # noqa: PLC0415
    from propserve.service.rest.app import RestApp  # noqa: PLC0415
    from propserve.service.store import ModelStore  # noqa: PLC0415

    settings = Settings(store=tmp_path / "store")
    core = Models(ModelStore(settings.store), settings)
    plane = DataPlane(core, Authenticator({}), core.metrics, settings)
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    def broken() -> Any:
        raise RuntimeError("secret internal detail")

    core.list_models = broken  # type: ignore[method-assign]
    handler = Capture()
    logging.getLogger("propserve").addHandler(handler)
    try:
        app = RestApp(plane, core.metrics, ready=lambda: True, version="test")

        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.get("/v1/models")

        response = asyncio.run(call())
    finally:
        logging.getLogger("propserve").removeHandler(handler)
        plane.close()
        core.close()
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    failure = rest_failure(response, 500)
    assert failure.code == "INTERNAL"
    assert INTERNAL_MESSAGE.fullmatch(failure.message), failure.message
    assert response.headers["x-request-id"] in failure.message
    assert [r.getMessage() for r in records].count("request.internal_error") == 1
