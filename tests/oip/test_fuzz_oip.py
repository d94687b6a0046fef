"""The Open Inference Protocol fuzzed on one real server: schemathesis against the /v2
operations of the live /openapi.json, and hypothesis against every method of
inference.GRPCInferenceService (random bytes, and random but well-typed messages).

REST: no 5xx, only documented statuses, content types and bodies, invalid requests refused,
valid ones never refused by the framework's validation (see tests/e2e/test_fuzz_rest.py,
whose checks this reuses). gRPC: never INTERNAL or UNKNOWN, an answer within the deadline,
and nothing changed, except that a repository load or unload that succeeded may change the
model it names (whether it is in memory).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import schemathesis
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.specs.openapi.schemas import OpenApiSchema

from propserve import wire
from propserve.oip import open_inference_pb2 as pb
from propserve.service.grpc.oip import METHODS
from tests.e2e.test_fuzz_grpc import SCALARS, corrupted
from tests.e2e.test_fuzz_rest import ADMIN_TOKEN, CONFIG, check_answer
from tests.support.server import ServerProcess, start_server

# The token check_answer sends (tests/e2e/test_fuzz_rest.py's).
HEADERS = {"authorization": f"Bearer {ADMIN_TOKEN}"}
METADATA = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
ENV = {"PROPSERVE_TOKENS": f"{ADMIN_TOKEN}=admin", "PROPSERVE_MAX_PARAMS": "10000"}
SEED = 20261207
MAX_EXAMPLES = 25
PATIENCE = 30.0
SERVICE = "inference.GRPCInferenceService"

#: Scratch models (restored before each test), each with a saved version LABEL names.
MODELS: dict[str, dict[str, Any]] = {
    "oz-mse": {"input_dim": 2, "layers": [{"units": 1}], "loss": "mse", "seed": 1},
    "oz-clf": {
        "input_dim": 2,
        "layers": [{"units": 3, "activation": "softmax"}],
        "loss": "softmax_cross_entropy",
        "dtype": "float32",
        "seed": 2,
    },
}
LABEL = "stable"
#: Methods that may change (load or unload) the model they name when they succeed.
MUTATING = {"RepositoryModelLoad", "RepositoryModelUnload"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("fuzz-oip") / "store", env=ENV)
    try:
        yield process
    finally:
        client = _CLIENTS.pop(process.rest_url, None)
        if client is not None:
            client.close()
        process.stop()


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as opened:
        yield opened


_CLIENTS: dict[str, httpx.Client] = {}


def call(server: ServerProcess, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """A request on one kept-alive connection per server."""
    client = _CLIENTS.get(server.rest_url)
    if client is None or client.is_closed:
        client = _CLIENTS[server.rest_url] = httpx.Client(
            base_url=server.rest_url, headers=HEADERS, timeout=PATIENCE
        )
    return client.request(method, path, **kwargs)


def restore(server: ServerProcess) -> None:
    """Only the scratch models, loaded, each with a saved version that LABEL names."""
    for model in call(server, "GET", "/v1/models").json()["models"]:
        if model["name"] not in MODELS:
            assert call(server, "DELETE", f"/v1/models/{model['name']}").status_code == 204
    for name, spec in MODELS.items():
        if call(server, "GET", f"/v1/models/{name}").status_code == 404:
            created = call(server, "POST", "/v1/models", json={"name": name, "spec": spec})
            assert created.status_code == 201, created.text
        assert call(server, "POST", f"/v2/repository/models/{name}/load").status_code == 200
        versions = call(server, "GET", f"/v1/models/{name}/versions").json()["versions"]
        if not versions:
            versions = [call(server, "POST", f"/v1/models/{name}/versions").json()]
        body = {"version": versions[0]["version"]}
        assert call(server, "PUT", f"/v1/models/{name}/labels/{LABEL}", json=body).is_success


def snapshot(server: ServerProcess) -> dict[str, Any]:
    """Per model: its record, versions, whether it is in memory and what it predicts."""
    state: dict[str, Any] = {}
    for model in call(server, "GET", "/v1/models").json()["models"]:
        name = model["name"]
        row = {"inputs": [[1.0] * model["spec"]["input_dim"]]}
        predicted = call(server, "POST", f"/v1/models/{name}/predict", json=row)
        state[name] = (
            model,
            call(server, "GET", f"/v1/models/{name}/versions").json(),
            call(server, "GET", f"/v2/models/{name}/ready").status_code,
            predicted.status_code,
            predicted.json().get("outputs"),
        )
    return state


# -- REST: schemathesis on the /v2 operations ------------------------------------------------


@pytest.fixture(scope="module")
def document(server: ServerProcess) -> dict[str, Any]:
    openapi: dict[str, Any] = httpx.get(f"{server.rest_url}/openapi.json").json()
    return openapi


@pytest.fixture(scope="module")
def api(server: ServerProcess) -> OpenApiSchema:
    return schemathesis.openapi.from_url(f"{server.rest_url}/openapi.json", config=CONFIG)


def oip_operations(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        operation["operationId"]: operation
        for path, methods in document["paths"].items()
        if path == "/v2" or path.startswith("/v2/")
        for operation in methods.values()
    }


#: Every /v2 operation the document has, and whether a request to it can be invalid.
OPERATIONS = {
    "ServerLive": False,
    "ServerReady": False,
    "ServerMetadata": False,
    "ModelMetadata": True,
    "ModelVersionMetadata": True,
    "ModelReady": True,
    "ModelVersionReady": True,
    "ModelInfer": True,
    "ModelVersionInfer": True,
    "RepositoryIndex": True,
    "RepositoryModelLoad": True,
    "RepositoryModelUnload": True,
}
FUZZED = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (op, GenerationMode.NEGATIVE) for op, has_inputs in OPERATIONS.items() if has_inputs
]


def test_every_oip_operation_is_documented_and_fuzzed(document: dict[str, Any]) -> None:
    found = oip_operations(document)
    assert {
        op_id: bool(op.get("parameters") or "requestBody" in op) for op_id, op in found.items()
    } == OPERATIONS
    for op_id, operation in found.items():
        for parameter in operation.get("parameters", []):
            if parameter["name"] == "name":
                assert parameter["schema"]["pattern"] == f"^{wire.NAME_PATTERN}$", op_id


@pytest.mark.parametrize(("operation_id", "mode"), FUZZED, ids=lambda v: getattr(v, "value", v))
def test_fuzz_oip_operation(
    server: ServerProcess, api: OpenApiSchema, operation_id: str, mode: GenerationMode
) -> None:
    restore(server)
    operation = api.find_operation_by_id(operation_id)
    strategies = [operation.as_strategy(generation_mode=mode)]
    parameters = {p["name"] for p in operation.definition.raw.get("parameters", [])}
    if "name" in parameters and mode is GenerationMode.POSITIVE:
        for model in MODELS:
            fixed = {"name": model}
            if "model_version" in parameters:
                fixed["model_version"] = LABEL
            strategies.append(operation.as_strategy(generation_mode=mode, path_parameters=fixed))

    @seed(SEED)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=st.one_of(strategies))
    def fuzz(case: Case[Any]) -> None:
        check_oip_answer(case, server, mode)

    fuzz()


def check_oip_answer(case: Case[Any], server: ServerProcess, mode: GenerationMode) -> None:
    status = check_answer(case, server, mode, frozenset())
    # A bad request is the protocol's 400, never the framework's 422.
    assert status != 422, case.as_curl_command(headers=HEADERS)


def test_a_valid_infer_gets_a_documented_success(server: ServerProcess, api: OpenApiSchema) -> None:
    restore(server)
    body: dict[str, Any] = {
        "id": "a",
        "inputs": [{"name": "inputs", "shape": [2, 2], "datatype": "FP64", "data": [1, 2, 3, 4]}],
        "outputs": [{"name": "outputs"}],
    }
    for operation_id, parameters in [
        ("ModelInfer", {"name": "oz-clf"}),
        ("ModelVersionInfer", {"name": "oz-mse", "model_version": "1"}),
    ]:
        operation = api.find_operation_by_id(operation_id)
        case = operation.Case(path_parameters=parameters, body=body, media_type="application/json")
        status = check_answer(case, server, GenerationMode.POSITIVE, frozenset())
        assert status == 200


# -- gRPC: hypothesis on every method ------------------------------------------------------------

#: Names: mostly the scratch models' and their label, to reach what lies behind a name.
NAMES = st.one_of(
    st.sampled_from([*MODELS, LABEL, "1", "2", ""]),
    st.from_regex(f"^{wire.NAME_PATTERN}$", fullmatch=True),
    st.sampled_from(["a" * 65, "..", "a/b", "a\x00b", "-1", "01", str(2**64), "é"]),
    st.text(max_size=40),
)
#: The datatypes a client may name: the two taken and some that are not.
DATATYPES = st.sampled_from(["FP32", "FP64", "INT32", "BYTES", "fp32", ""])
#: Shapes: the scratch models' ([rows, 2]), and any (huge, negative, of any rank).
SHAPES = st.one_of(
    st.sampled_from([[1, 2], [3, 2], [0, 2]]),
    st.lists(st.one_of(st.integers(-2, 4), st.sampled_from([2**24, 2**31, 2**63 - 1])), max_size=4),
)


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """ModelInfer requests: mostly one input of a fitting shape, its values in the contents of
    its datatype or as raw bytes, sometimes any of that wrong."""
    request = pb.ModelInferRequest(
        model_name=draw(NAMES),
        model_version=draw(NAMES),
        id=draw(st.text(max_size=8)),
    )
    for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2]))):
        shape = draw(SHAPES)
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["inputs", "inputs", "x"])),
            datatype=draw(DATATYPES),
            shape=shape,
        )
        count = int(np.prod(shape)) if all(0 <= d <= 8 for d in shape) else draw(st.integers(0, 4))
        values = draw(st.lists(st.floats(width=32), min_size=count, max_size=count + 1))
        how = draw(st.sampled_from(["fp32", "fp64", "raw", "int", "none"]))
        if how == "fp32":
            tensor.contents.fp32_contents.extend(values)
        elif how == "fp64":
            tensor.contents.fp64_contents.extend(values)
        elif how == "int":
            tensor.contents.int_contents.extend(range(count))
        elif how == "raw":
            dtype = "<f8" if tensor.datatype == "FP64" else "<f4"
            request.raw_input_contents.append(np.asarray(values, dtype).tobytes())
    for name in draw(st.lists(st.sampled_from(["outputs", "y"]), max_size=2)):
        request.outputs.add(name=name)
    return request


def messages(descriptor: Descriptor) -> st.SearchStrategy[Message]:
    """Well-typed messages of the other methods: names and versions from NAMES."""
    if descriptor.name == "ModelInferRequest":
        return infer_requests()
    cls = pb.DESCRIPTOR.message_types_by_name[descriptor.name]._concrete_class
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            fields[field.name] = NAMES
        elif field.message_type is None:
            fields[field.name] = SCALARS[field.type]
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: cls(**values))


REQUESTS = {name: pb.DESCRIPTOR.message_types_by_name[f"{name}Request"] for name in METHODS}


def raw_requests(descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=128),
        messages(descriptor).map(lambda m: m.SerializeToString()).flatmap(corrupted),
    )


def invoke(channel: grpc.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    def unparsed(data: bytes) -> bytes:
        return data

    stub = channel.unary_unary(
        f"/{SERVICE}/{method}", request_serializer=unparsed, response_deserializer=unparsed
    )
    try:
        stub(payload, timeout=PATIENCE, metadata=METADATA)
    except grpc.RpcError as exc:
        error: Any = exc
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


def named_model(method: str, payload: bytes) -> str | None:
    try:
        request = pb.DESCRIPTOR.message_types_by_name[f"{method}Request"]._concrete_class
        return str(request.FromString(payload).model_name)
    except DecodeError:
        return None


def test_every_method_of_the_protocol_is_served() -> None:
    served = set(METHODS)
    assert served == {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    }


@pytest.mark.parametrize("kind", ["bytes", "messages"])
@pytest.mark.parametrize("method", METHODS)
def test_fuzz_oip_method(
    server: ServerProcess, channel: grpc.Channel, method: str, kind: str
) -> None:
    restore(server)
    descriptor = REQUESTS[method]
    payloads = (
        raw_requests(descriptor)
        if kind == "bytes"
        else messages(descriptor).map(lambda m: m.SerializeToString())
    )
    state = [snapshot(server)]

    @seed(SEED)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(payload=payloads)
    def fuzz(payload: bytes) -> None:
        code = invoke(channel, method, payload)
        before, after = state[0], snapshot(server)
        state[0] = after
        request = f"{method}({payload.hex()})"
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (request, code)
        assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{request}: no answer in time"
        touched = (
            named_model(method, payload) if method in MUTATING and code.value[0] == 0 else None
        )
        differ = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert set(differ) <= {touched}, f"{request} -> {code} changed {differ}"

    fuzz()


def test_state_is_json_comparable(server: ServerProcess) -> None:
    """The fuzz's snapshot sees a change it must see: an unload."""
    restore(server)
    before = snapshot(server)
    assert call(server, "POST", "/v2/repository/models/oz-mse/unload").status_code == 200
    after = snapshot(server)
    assert json.dumps(before["oz-clf"]) == json.dumps(after["oz-clf"])
    assert before["oz-mse"] != after["oz-mse"]
