"""Schemathesis against the live server's /openapi.json: every operation, with a fixed seed
and a small budget of generated requests, valid (positive) and invalid (negative) ones.

A request fails the test if its answer is a 5xx, a status the operation does not document, a
content type it does not document, or a body that does not match the documented schema. The
document must also say no more and no less than the server enforces: an invalid request is
refused (schemathesis' negative_data_rejection), and a valid one is never refused by the
framework's body validation (422). Beside the fuzzing, one valid request per operation checks
the documented success answers, and the document itself is read for the rules it must state.

The models the fuzzer aims at are scratch models, restored before each test: DeleteModel and
Rollback run on them too, and no test depends on another's order or outcome.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import negative_data_rejection, not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from propserve import wire
from propserve.engine.spec import MAX_LAYERS, MAX_UNITS, ModelSpec
from tests.support.server import ServerProcess, start_server

ADMIN_TOKEN = "fuzz-admin-token-0123456789"
HEADERS = {"authorization": f"Bearer {ADMIN_TOKEN}"}
ENV = {
    "PROPSERVE_TOKENS": f"{ADMIN_TOKEN}=admin",
    # Specs the fuzzer makes up stay cheap to build: a bigger one is refused (413).
    "PROPSERVE_MAX_PARAMS": "10000",
}
SEED = 20260101
#: Generated requests per operation and mode (26 runs of it).
MAX_EXAMPLES = 25
#: Seconds one request may take before it counts as a hang: generous on a busy machine.
PATIENCE = 30.0

#: Scratch models the fuzzer's requests are aimed at (besides names it makes up), each with a
#: saved version that the label LABEL names.
MODELS: dict[str, dict[str, Any]] = {
    "fz-mse": {"input_dim": 1, "layers": [{"units": 1}], "loss": "mse", "seed": 1},
    "fz-clf": {
        "input_dim": 1,
        "layers": [{"units": 2}],
        "loss": "softmax_cross_entropy",
        "seed": 2,
    },
}
LABEL = "stable"

#: Every operation of the document, and whether a request to it can be invalid (it has path
#: parameters or a body: else there is no negative data to make).
OPERATIONS: dict[str, bool] = {
    "CreateModel": True,
    "ListModels": False,
    "GetModel": True,
    "UpdateModel": True,
    "DeleteModel": True,
    "Predict": True,
    "TrainStep": True,
    "Evaluate": True,
    "SaveVersion": True,
    "ListVersions": True,
    "SetLabel": True,
    "RemoveLabel": True,
    "Rollback": True,
    "ExportWeights": True,
    "GetHistory": True,
    "Live": False,
    "Ready": False,
    "Metrics": False,
}
FUZZED = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (op, GenerationMode.NEGATIVE) for op, has_inputs in OPERATIONS.items() if has_inputs
]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
#: A refusal for being over a limit (413) is a refusal too.
CONFIG = schemathesis.Config.from_dict(
    {
        "request-timeout": PATIENCE,
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": [400, 401, 403, 404, 405, 409, 413, 415, 422, 429]
            }
        },
    }
)
NAME = f"^{wire.NAME_PATTERN}$"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("fuzz-rest") / "store", env=ENV)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def document(server: ServerProcess) -> dict[str, Any]:
    response = httpx.get(f"{server.rest_url}/openapi.json", timeout=PATIENCE)
    assert response.status_code == 200
    openapi: dict[str, Any] = response.json()
    return openapi


@pytest.fixture(scope="module")
def api(server: ServerProcess) -> OpenApiSchema:
    return schemathesis.openapi.from_url(f"{server.rest_url}/openapi.json", config=CONFIG)


def call(server: ServerProcess, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method, f"{server.rest_url}{path}", headers=HEADERS, timeout=PATIENCE, **kwargs
    )


def restore(server: ServerProcess) -> dict[str, int]:
    """Put the scratch models back (created, with a saved version that LABEL names); returns
    each one's labelled version."""
    labelled = {}
    for name, spec in MODELS.items():
        model = call(server, "GET", f"/v1/models/{name}")
        if model.status_code == 404:
            model = call(server, "POST", "/v1/models", json={"name": name, "spec": spec})
            assert model.status_code == 201, model.text
        versions = call(server, "GET", f"/v1/models/{name}/versions").json()["versions"]
        if not versions:
            saved = call(server, "POST", f"/v1/models/{name}/versions")
            assert saved.status_code == 201, saved.text
            versions = [saved.json()]
        version = model.json()["labels"].get(LABEL, versions[0]["version"])
        label = call(server, "PUT", f"/v1/models/{name}/labels/{LABEL}", json={"version": version})
        assert label.status_code == 200, label.text
        labelled[name] = version
    return labelled


# -- reading the document -------------------------------------------------------------------


def own_paths(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The document's paths of propserve's own API (the Open Inference Protocol's, /v2, are
    fuzzed by tests/oip/test_fuzz_oip.py)."""
    return {
        path: methods
        for path, methods in document["paths"].items()
        if path != "/v2" and not path.startswith("/v2/")
    }


def operations(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each operation's object in the document, by operation id."""
    return {
        operation["operationId"]: operation
        for methods in own_paths(document).values()
        for operation in methods.values()
    }


def refs(node: Any) -> Iterator[str]:
    """The components a node refers to (their names)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value.removeprefix("#/components/schemas/")
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def request_schemas(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every component a request body refers to, directly or not, by name."""
    components = document["components"]["schemas"]
    bodies = [op["requestBody"] for op in operations(document).values() if "requestBody" in op]
    found: dict[str, dict[str, Any]] = {}
    pending = list(refs(bodies))
    while pending:
        name = pending.pop()
        if name not in found:
            found[name] = components[name]
            pending.extend(refs(components[name]))
    return found


def schemas_within(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema within ``node``, with where it lies."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from schemas_within(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from schemas_within(item, f"{path}/{index}")


def objects(node: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema of an object within ``node``, with where it lies."""
    for path, schema in schemas_within(node):
        if schema.get("type") == "object" or "properties" in schema:
            yield path, schema


def integer_fields(document: dict[str, Any]) -> frozenset[str]:
    """The names of the request bodies' integer fields (and arrays of integers)."""
    integers: set[str] = set()
    others: set[str] = set()
    for _, schema in objects(request_schemas(document)):
        for name, field in schema.get("properties", {}).items():
            kind = field.get("items", field).get("type")
            (integers if kind == "integer" else others).add(name)
    assert not integers & others, f"fields both integer and not: {integers & others}"
    return frozenset(integers)


# -- the document states the rules ----------------------------------------------------------


def test_every_operation_is_fuzzed(document: dict[str, Any]) -> None:
    found = operations(document)
    assert {
        op_id: bool(op.get("parameters") or "requestBody" in op) for op_id, op in found.items()
    } == OPERATIONS


def test_every_name_in_a_path_has_the_name_pattern(document: dict[str, Any]) -> None:
    templates = 0
    for path, methods in own_paths(document).items():
        for operation in methods.values():
            in_path = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "path"}
            assert set(in_path) == set(re.findall(r"\{(\w+)\}", path)), path
            for name, parameter in in_path.items():
                assert parameter["required"] is True
                if name == "version":  # a saved version's number
                    assert parameter["schema"]["type"] == "integer", path
                    assert parameter["schema"]["minimum"] == 1, path
                    continue
                assert name in ("name", "label"), path
                assert parameter["schema"]["type"] == "string"
                assert parameter["schema"]["pattern"] == NAME, (path, name)
                templates += 1
    assert templates >= 12


def test_every_request_body_states_its_fields(document: dict[str, Any]) -> None:
    """No unknown field (additionalProperties false on every object), no null (a field that
    may be left out is not nullable; only the spec's grad_clip_norm takes null), and only
    JSON Schema's keywords (pydantic's own, e.g. "ge", would be ignored by every reader)."""
    bodies = request_schemas(document)
    assert {"CreateModelBody", "UpdateModelBody", "PredictBody", "TrainStepBody"} <= set(bodies)
    assert {"LabelBody", "RollbackBody", "ModelSettings", "FlatTensor", "Base64Tensor"} <= set(
        bodies
    )
    for path, schema in objects(bodies):
        assert schema.get("additionalProperties") is False, path
    for path, schema in schemas_within(bodies):
        assert not {"ge", "le", "gt", "lt", "default"} & schema.keys(), path
        nullable = schema.get("type") == "null" or "null" in schema.get("type", [])
        assert not nullable or "/grad_clip_norm/" in path, path


def test_every_integer_of_a_request_is_bounded(document: dict[str, Any]) -> None:
    """Each integer states its lowest value, and its highest unless it is a server's setting
    (a tensor's dimensions: see the description)."""
    found = set()
    for path, schema in schemas_within(request_schemas(document)):
        if schema.get("type") == "integer":
            found.add(path.split("/properties/")[-1].split("/")[0])
            assert "minimum" in schema, path
            if not path.endswith("/shape/items"):
                assert "maximum" in schema or schema.get("format") == "int64", path
    assert {"version", "retain", "autosave_every", "input_dim", "units", "seed", "shape"} <= found


def test_the_bounds_are_the_wire_contracts(document: dict[str, Any]) -> None:
    bodies = request_schemas(document)
    version = {"type": "integer", "format": "int64", "minimum": 1}
    assert wire.MAX_VERSION == 2**63 - 1  # int64's highest
    for body in ("LabelBody", "RollbackBody", "PredictBody"):
        schema = bodies[body]["properties"]["version"]
        assert {k: schema[k] for k in version} == version, body
    for body, field in [("RollbackBody", "label"), ("PredictBody", "label")]:
        assert bodies[body]["properties"][field]["pattern"] == NAME
    assert bodies["CreateModelBody"]["properties"]["name"]["pattern"] == NAME
    settings = bodies["ModelSettings"]["properties"]
    for name, (low, high) in wire.SETTINGS.items():
        assert (settings[name]["minimum"], settings[name]["maximum"]) == (low, high), name
    # Rollback takes one of a version and a label; Predict at most one.
    assert bodies["RollbackBody"]["oneOf"] == [{"required": ["version"]}, {"required": ["label"]}]
    assert bodies["PredictBody"]["not"] == {"required": ["version", "label"]}


def test_the_spec_is_stated(document: dict[str, Any]) -> None:
    spec = request_schemas(document)["CreateModelBody"]["properties"]["spec"]
    assert set(spec["required"]) == {"input_dim", "layers", "loss"}
    # Every field the engine knows, and no other (it refuses unknown ones).
    minimal = {"input_dim": 1, "layers": [{"units": 1}], "loss": "mse"}
    assert set(spec["properties"]) == set(ModelSpec.from_dict(minimal).to_dict())
    assert (spec["properties"]["layers"]["minItems"], spec["properties"]["layers"]["maxItems"]) == (
        1,
        MAX_LAYERS,
    )
    layer = spec["properties"]["layers"]["items"]
    assert layer["required"] == ["units"]
    for dimension in (spec["properties"]["input_dim"], layer["properties"]["units"]):
        assert (dimension["minimum"], dimension["maximum"]) == (1, MAX_UNITS)
    assert spec["properties"]["seed"] == {"type": "integer", "format": "int64", "minimum": 0}


def test_the_tensors_state_their_rank_and_encoding(document: dict[str, Any]) -> None:
    bodies = request_schemas(document)
    value = {"type": ["number", "boolean"]}
    rows = {"type": "array", "items": {"type": "array", "items": value}}
    for body, field, nested in [
        ("PredictBody", "inputs", [rows]),
        ("TrainStepBody", "inputs", [rows]),
        ("TrainStepBody", "targets", [{"type": "array", "items": value}, rows]),
    ]:
        forms = bodies[body]["properties"][field]["anyOf"]
        assert forms == [
            *nested,
            {"$ref": "#/components/schemas/FlatTensor"},
            {"$ref": "#/components/schemas/Base64Tensor"},
        ], (body, field)
    for tensor in ("FlatTensor", "Base64Tensor"):
        shape = bodies[tensor]["properties"]["shape"]
        assert shape["maxItems"] == wire.MAX_RANK
        assert shape["items"] == {"type": "integer", "minimum": 0}
        assert bodies[tensor]["properties"]["dtype"]["enum"] == list(wire.DTYPES)
    assert bodies["FlatTensor"]["properties"]["data"]["items"] == value
    pattern = re.compile(bodies["Base64Tensor"]["properties"]["b64"]["pattern"])
    assert all(pattern.fullmatch(base64.b64encode(bytes(n)).decode()) for n in range(9))
    assert not any(pattern.fullmatch(text) for text in ["A", "AA", "AA=A", "AAAA\n", "-_=="])


# -- fuzzing ----------------------------------------------------------------------------------


def strict_integers(value: Any, fields: frozenset[str], integer: bool = False) -> Any:
    """``value`` with integral floats in integer fields written as integers: JSON Schema's
    integers include 1.0, which the server refuses (strict integers, see schemas.py), so a
    valid request sends 1."""
    if isinstance(value, dict):
        return {key: strict_integers(item, fields, key in fields) for key, item in value.items()}
    if isinstance(value, list):
        return [strict_integers(item, fields, integer) for item in value]
    if integer and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def check_answer(
    case: Case[Any], server: ServerProcess, mode: GenerationMode, fields: frozenset[str]
) -> int:
    """Send ``case`` and run the checks on its answer; returns the status."""
    if mode is GenerationMode.POSITIVE and isinstance(case.body, dict | list):
        case.body = strict_integers(case.body, fields)
    response = case.call_and_validate(
        base_url=server.rest_url, headers=HEADERS, checks=CHECKS, timeout=PATIENCE
    )
    if mode is GenerationMode.POSITIVE and response.status_code == 422:
        raise AssertionError(
            "a request the document allows was refused by the framework's validation:\n"
            f"{case.as_curl_command(headers=HEADERS)}\n{response.text}"
        )
    return response.status_code


@pytest.mark.parametrize(("operation_id", "mode"), FUZZED, ids=lambda v: getattr(v, "value", v))
def test_fuzz_operation(
    server: ServerProcess,
    document: dict[str, Any],
    api: OpenApiSchema,
    operation_id: str,
    mode: GenerationMode,
) -> None:
    restore(server)
    operation = api.find_operation_by_id(operation_id)
    fields = integer_fields(document)
    # Names the fuzzer makes up find no model (404) nearly always; aim most requests at the
    # scratch models (with their label) to reach what lies behind. Negative data then lies in
    # the body, so only where there is one.
    documented = operations(document)[operation_id]
    names = [p["name"] for p in documented.get("parameters", []) if p["in"] == "path"]
    strategies = []
    if names and (mode is GenerationMode.POSITIVE or "requestBody" in documented):
        for model in MODELS:
            fixed = {"name": model, "label": LABEL} if "label" in names else {"name": model}
            strategies.append(operation.as_strategy(generation_mode=mode, path_parameters=fixed))
    strategies.append(operation.as_strategy(generation_mode=mode))

    @seed(SEED)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        # The server answers in its own time; generated bodies may be large.
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=st.one_of(strategies))
    def fuzz(case: Case[Any]) -> None:
        check_answer(case, server, mode, fields)

    fuzz()


# -- one valid request per operation: the documented success answers ------------------------

Request = tuple[dict[str, Any], Any]  # (path parameters, body or None)


def b64(values: list[float], dtype: str) -> str:
    return base64.b64encode(np.asarray(values, dtype=wire.DTYPES[dtype]).tobytes()).decode()


def create(server: ServerProcess, labelled: dict[str, int]) -> Request:
    call(server, "DELETE", "/v1/models/fz-created")
    spec = {
        "input_dim": 2,
        "layers": [{"units": 3, "activation": "relu"}, {"units": 2}],
        "loss": "softmax_cross_entropy",
        "optimizer": {"name": "adam", "lr": 0.01, "betas": [0.9, 0.99]},
        "dtype": "float64",
        "init": "xavier_uniform",
        "seed": 2**63 - 1,
        "grad_clip_norm": None,
    }
    return {}, {"name": "fz-created", "spec": spec, "settings": {"retain": 2}}


def doomed(server: ServerProcess, labelled: dict[str, int]) -> Request:
    spec = MODELS["fz-mse"]
    created = call(server, "POST", "/v1/models", json={"name": "fz-doomed", "spec": spec})
    assert created.status_code in (201, 409), created.text
    return {"name": "fz-doomed"}, None


def removable(server: ServerProcess, labelled: dict[str, int]) -> Request:
    version = labelled["fz-mse"]
    label = call(server, "PUT", "/v1/models/fz-mse/labels/gone", json={"version": version})
    assert label.status_code == 200, label.text
    return {"name": "fz-mse", "label": "gone"}, None


MSE, CLF = {"name": "fz-mse"}, {"name": "fz-clf"}
#: Per case (named after its operation): what gives (path parameters, body), the server and
#: each scratch model's labelled version given.
VALID: dict[str, Callable[[ServerProcess, dict[str, int]], Request]] = {
    "CreateModel": create,
    "ListModels": lambda s, v: ({}, None),
    "GetModel": lambda s, v: (MSE, None),
    "UpdateModel": lambda s, v: (MSE, {"settings": {"retain": 5, "autosave_every": 0}}),
    "DeleteModel": doomed,
    "Predict-rows": lambda s, v: (MSE, {"inputs": [[0.5], [-1]]}),
    "Predict-booleans": lambda s, v: (MSE, {"inputs": [[True], [False]]}),
    "Predict-flat": lambda s, v: (
        CLF,
        {"inputs": {"data": [0.5], "shape": [1, 1]}, "label": LABEL},
    ),
    "Predict-b64": lambda s, v: (
        MSE,
        {
            "inputs": {"b64": b64([0.5, 2], "float32"), "shape": [2, 1], "dtype": "float32"},
            "version": v["fz-mse"],
        },
    ),
    "TrainStep-rows": lambda s, v: (MSE, {"inputs": [[0.5]], "targets": [[1.0]]}),
    "TrainStep-labels": lambda s, v: (
        CLF,
        {"inputs": [[0.5], [1]], "targets": [1, 0], "learning_rate": 0.01},
    ),
    "TrainStep-encoded": lambda s, v: (
        CLF,
        {
            "inputs": {"data": [0.5], "shape": [1, 1], "dtype": "float64"},
            "targets": {"b64": b64([1], "int64"), "shape": [1], "dtype": "int64"},
            "learning_rate": 0,
        },
    ),
    "Evaluate-rows": lambda s, v: (MSE, {"inputs": [[0.5]], "targets": [[1.0]]}),
    "Evaluate-label": lambda s, v: (
        CLF,
        {"inputs": [[0.5], [1]], "targets": [1, 0], "label": LABEL},
    ),
    "SaveVersion": lambda s, v: (MSE, None),
    "ListVersions": lambda s, v: (MSE, None),
    "SetLabel": lambda s, v: ({"name": "fz-mse", "label": "fz-label"}, {"version": v["fz-mse"]}),
    "RemoveLabel": removable,
    "Rollback-label": lambda s, v: (CLF, {"label": LABEL}),
    "Rollback-version": lambda s, v: (MSE, {"version": v["fz-mse"]}),
    "ExportWeights": lambda s, v: ({"name": "fz-clf", "version": v["fz-clf"]}, None),
    "GetHistory": lambda s, v: (MSE, None),
    "Live": lambda s, v: ({}, None),
    "Ready": lambda s, v: ({}, None),
    "Metrics": lambda s, v: ({}, None),
}


def test_every_operation_has_a_valid_request() -> None:
    assert {case.split("-")[0] for case in VALID} == set(OPERATIONS)


@pytest.mark.parametrize("case_id", VALID)
def test_a_valid_request_gets_a_documented_success(
    server: ServerProcess, document: dict[str, Any], api: OpenApiSchema, case_id: str
) -> None:
    parameters, body = VALID[case_id](server, restore(server))
    operation = api.find_operation_by_id(case_id.split("-", maxsplit=1)[0])
    if body is None:
        case = operation.Case(path_parameters=parameters)
    else:
        case = operation.Case(path_parameters=parameters, body=body, media_type="application/json")
    status = check_answer(case, server, GenerationMode.POSITIVE, integer_fields(document))
    assert 200 <= status < 300, case.as_curl_command(headers=HEADERS)


# -- bugs the fuzzer found ---------------------------------------------------------------------

#: A tensor of no element whose other dimensions, each within the element limit (2**24 by
#: default), multiply past what numpy can describe (it was answered 500).
EMPTY_BUT_HUGE = [2**24, 2**24, 2**24, 0]


def refused(response: httpx.Response) -> tuple[int, str | None, str]:
    """(status, the error envelope's code, the content type) of an answer."""
    content_type = response.headers.get("content-type", "")
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    return response.status_code, code, content_type


@pytest.mark.parametrize("route", ["predict", "train_step"])
@pytest.mark.parametrize("encoding", ["flat", "b64"])
def test_an_empty_tensor_numpy_cannot_shape_is_refused(
    server: ServerProcess, route: str, encoding: str
) -> None:
    tensor: dict[str, Any] = (
        {"data": [], "shape": EMPTY_BUT_HUGE}
        if encoding == "flat"
        else {"b64": "", "shape": EMPTY_BUT_HUGE, "dtype": "float32"}
    )
    body: dict[str, Any] = {"inputs": tensor}
    if route == "train_step":
        body["targets"] = [1.0]
    response = call(server, "POST", f"/v1/models/fz-mse/{route}", json=body)
    assert refused(response) == (400, "invalid_argument", "application/json")


@pytest.mark.parametrize("route", ["predict", "train_step"])
@pytest.mark.parametrize("data", [[[1, 2]], [[]]], ids=["[[1,2]]", "[[]]"])
def test_flat_data_of_lists_is_refused(server: ServerProcess, route: str, data: Any) -> None:
    body: dict[str, Any] = {"inputs": {"data": data, "shape": [1]}}
    if route == "train_step":
        body = {"inputs": [[1.0]], "targets": body["inputs"]}
    response = call(server, "POST", f"/v1/models/fz-mse/{route}", json=body)
    assert refused(response) == (400, "invalid_argument", "application/json")
