"""The Open Inference Protocol's REST endpoints, asked by hand, against the protocol's own
OpenAPI file (tests/data/oip/open_inference_rest.yaml, upstream's, unchanged).

Every path the file has is asked on the real server, and every answer for which the file
declares a JSON body is validated against that schema, ``$ref``s resolved within the file:
server metadata, model metadata (by default, by version number, by label), model readiness,
and infer with JSON tensors (flat and nested data, by default, version and label), whose
outputs must be propserve's own ``/v1`` predictions of the same rows, bit for bit (each
request here is answered alone). The requests the tests send are themselves validated
against the file's request schema, so the tests speak the protocol as written.

Refusals answer the protocol's error object, ``{"error": string}`` and nothing else, with the
wire code's status: an unknown model or version 404; a datatype, shape, input name or body
the server cannot take 400. The refused requests are spec-valid JSON where they can be, so
the refusal is the server's own rule, not the schema's.

The binary tensor data extension (not in the OpenAPI file: a JSON header of
``Inference-Header-Content-Length`` bytes, then the tensors' raw bytes, ``binary_data_size``
in a tensor's parameters instead of ``data``) is spoken by hand: raw little-endian float32
inputs, binary outputs parsed by hand and compared with ``/v1`` bit for bit. A header length
past the body, a ``binary_data_size`` that does not account for the bytes, or a header that is
not a number of bytes is refused 400, and the server stays healthy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema  # type: ignore[import-untyped]
import numpy as np
import pytest
import yaml  # type: ignore[import-untyped]
from numpy.typing import NDArray
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from propserve.clients import RestClient
from tests.support.server import ServerProcess, start_server

ROOT = Path(__file__).resolve().parents[2]
SPEC_FILE = ROOT / "tests" / "data" / "oip" / "open_inference_rest.yaml"
#: The URI the file is registered under, so its ``#/components/...`` references resolve.
SPEC_URI = "https://github.com/kserve/open-inference-protocol/open_inference_rest.yaml"
#: Every path the file has, with its methods: what this module asks.
SPEC_PATHS = {
    "/v2/health/live": {"get"},
    "/v2/health/ready": {"get"},
    "/v2/": {"get"},
    "/v2/models/${MODEL_NAME}/versions/${MODEL_VERSION}": {"get"},
    "/v2/models/${MODEL_NAME}/versions/${MODEL_VERSION}/ready": {"get"},
    "/v2/models/${MODEL_NAME}/versions/${MODEL_VERSION}/infer": {"post"},
}
INFER_PATH = "/v2/models/${MODEL_NAME}/versions/${MODEL_VERSION}/infer"
METADATA_PATH = "/v2/models/${MODEL_NAME}/versions/${MODEL_VERSION}"
MODEL_SPEC: dict[str, Any] = {
    "input_dim": 4,
    "layers": [{"units": 8, "activation": "relu"}, {"units": 3, "activation": "softmax"}],
    "loss": "softmax_cross_entropy",
    "dtype": "float32",
    "seed": 1,
}
ROWS = 5
#: The model's outputs per row.
UNITS = 3
UNKNOWN = "no-such-model"
HEADER_LENGTH = "Inference-Header-Content-Length"
#: A URL's version part -> what /v1 is asked for the same weights, and the model_version the
#: answer names: "m1" has no ``stable`` label, so its default is the live head ("").
VERSIONS: dict[str, tuple[dict[str, Any], str]] = {
    "": ({}, ""),
    "1": ({"version": 1}, "1"),
    "canary": ({"label": "canary"}, "1"),
}
#: Generous: the assertions are about answers, never speed.
TIMEOUT = 60.0


# -- the spec as JSON Schema -------------------------------------------------------------------


def _as_json_schema(node: Any) -> Any:
    """An OpenAPI 3.0 schema object as JSON Schema: ``nullable: true`` becomes a ``null``
    alternative (OpenAPI 3.0 has no ``null`` type); everything else is the same."""
    if isinstance(node, list):
        return [_as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {
        key: _as_json_schema(value)
        for key, value in node.items()
        if not (key == "nullable" and isinstance(value, bool))
    }
    if node.get("nullable") is True:
        if "type" in converted:
            types = (
                converted["type"] if isinstance(converted["type"], list) else [converted["type"]]
            )
            converted["type"] = [*types, "null"]
        else:
            converted = {"anyOf": [converted, {"type": "null"}]}
    return converted


@cache
def spec() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(SPEC_FILE.read_text())
    return loaded


@cache
def _registry(binary: bool) -> Registry[Any]:
    """The file as one resource; with ``binary``, as the binary tensor data extension reads
    it: a tensor whose bytes follow the JSON has no ``data``."""
    document = _as_json_schema(spec())  # a copy: the cached spec stays as read
    if binary:
        for name in ("request_input", "response_output"):
            schema = document["components"]["schemas"][name]
            schema["required"] = [key for key in schema["required"] if key != "data"]
    resource = Resource.from_contents(document, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(SPEC_URI, resource)
    return registry


def _absolute(schema: dict[str, Any]) -> dict[str, Any]:
    """A schema taken out of the file, its ``#/...`` reference made absolute."""
    ref = schema.get("$ref", "")
    return {"$ref": SPEC_URI + ref} if ref.startswith("#") else schema


def validator(schema: dict[str, Any], *, binary: bool = False) -> Any:
    return jsonschema.Draft202012Validator(_absolute(schema), registry=_registry(binary))


def component(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def response_schema(path: str, method: str, status: int) -> dict[str, Any] | None:
    """The schema the file declares for a JSON answer, or None where it declares none."""
    response = spec()["paths"][path][method]["responses"].get(str(status), {})
    schema: dict[str, Any] | None = (
        response.get("content", {}).get("application/json", {}).get("schema")
    )
    return schema


def declared(path: str, method: str, status: int) -> dict[str, Any]:
    """The schema the file declares for a JSON answer, which it must declare."""
    schema = response_schema(path, method, status)
    assert schema is not None, f"the file declares no JSON answer for {method} {path} {status}"
    return schema


def request_schema(path: str, method: str) -> dict[str, Any]:
    schema: dict[str, Any] = spec()["paths"][path][method]["requestBody"]["content"][
        "application/json"
    ]["schema"]
    return schema


def spec_valid_request(body: dict[str, Any], *, binary: bool = False) -> dict[str, Any]:
    """``body``, after checking it is an inference request as the file has it."""
    validator(request_schema(INFER_PATH, "post"), binary=binary).validate(body)
    return body


def concrete(path: str, name: str, version: str) -> str:
    """A path of the file with its placeholders filled; an empty version drops the
    optional ``/versions/...`` part, as the protocol's text allows."""
    if not version:
        path = path.replace("/versions/${MODEL_VERSION}", "")
    return path.replace("${MODEL_NAME}", name).replace("${MODEL_VERSION}", version)


# -- the server --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """The server and what propserve's /v1 predicts for ``x`` from each of VERSIONS."""

    server: ServerProcess
    x: NDArray[np.float32]
    expected: dict[str, NDArray[Any]]


def _rows() -> NDArray[np.float32]:
    return np.random.default_rng(11).normal(0.0, 2.0, size=(ROWS, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """m1: version 1 saved and labelled ``canary``, the head trained past it."""
    process = start_server(tmp_path_factory.mktemp("oip-spec") / "store")
    try:
        x = _rows()
        targets = np.arange(ROWS) % UNITS
        with RestClient(process.rest_url) as client:
            client.create_model("m1", MODEL_SPEC)
            client.train_step("m1", x, targets)
            client.save_version("m1")
            client.set_label("m1", "canary", 1)
            client.train_step("m1", x, targets)
            expected = {
                version: client.predict("m1", x, **source).outputs
                for version, (source, _) in VERSIONS.items()
            }
        yield Served(process, x, expected)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.server.rest_url, timeout=TIMEOUT) as client:
        yield client


def infer_body(x: NDArray[Any], *, nested: bool = False, **extra: Any) -> dict[str, Any]:
    data = x.tolist() if nested else x.ravel().tolist()
    tensor = {"name": "inputs", "shape": list(x.shape), "datatype": "FP32", "data": data}
    return spec_valid_request({"inputs": [tensor], **extra})


def json_outputs(answer: dict[str, Any]) -> NDArray[np.float32]:
    (output,) = answer["outputs"]
    assert (output["name"], output["datatype"]) == ("outputs", "FP32")
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def same_bits(got: NDArray[Any], expected: NDArray[Any]) -> None:
    assert got.dtype == expected.dtype == np.float32
    assert got.shape == expected.shape == (ROWS, UNITS)
    assert got.astype("<f4").tobytes() == expected.astype("<f4").tobytes()


def assert_error(response: httpx.Response, status: int, schema: str) -> str:
    """A refusal in the protocol's error object, validated against the file's ``schema``;
    its message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    validator(component(schema)).validate(body)
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    assert body["error"]
    message: str = body["error"]
    return message


def assert_healthy(served: Served, http: httpx.Client) -> None:
    """The server is up, ready, and still answers a prediction correctly."""
    assert served.server.process.poll() is None
    assert http.get("/v2/health/ready").status_code == 200
    answer = http.post(concrete(INFER_PATH, "m1", ""), json=infer_body(served.x))
    assert answer.status_code == 200, answer.text
    same_bits(json_outputs(answer.json()), served.expected[""])


# -- the file ----------------------------------------------------------------------------------


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_the_spec_file_is_the_protocols_openapi_document() -> None:
    """The paths this module asks are exactly the file's, its schemas are JSON Schema, and
    every reference in it resolves."""
    document = spec()
    assert document["openapi"].startswith("3.0")
    assert {path: set(item) - {"parameters"} for path, item in document["paths"].items()} == (
        SPEC_PATHS
    )
    for schema in _as_json_schema(document)["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    refs = set(_refs(document))
    assert "#/components/schemas/tensor_data" in refs
    resolver = _registry(False).resolver()
    for ref in refs:
        assert isinstance(resolver.lookup(SPEC_URI + ref).contents, dict), ref


def test_the_validation_bites() -> None:
    """The schemas refuse what they should, nested references included; the binary
    extension's reading differs only in letting a tensor go without ``data``."""
    answer = validator(component("inference_response"))
    output = {"name": "outputs", "shape": [1, 3], "datatype": "FP32"}
    assert answer.is_valid({"model_name": "m", "outputs": [{**output, "data": [[1, 2, 3]]}]})
    assert not answer.is_valid({"outputs": []})
    assert not answer.is_valid({"model_name": "m", "outputs": [{**output, "data": [None]}]})
    assert not answer.is_valid({"model_name": "m", "outputs": [{**output, "shape": ["1"]}]})
    assert not answer.is_valid({"model_name": "m", "outputs": [output]})
    assert validator(component("inference_response"), binary=True).is_valid(
        {"model_name": "m", "outputs": [output]}
    )
    assert not validator(component("inference_error_response")).is_valid({"error": 404})


def test_nullable_becomes_a_null_alternative() -> None:
    """The file has no ``nullable`` now; should it gain one, it still validates as meant."""
    converted = _as_json_schema(
        {"type": "object", "properties": {"id": {"type": "string", "nullable": True}}}
    )
    assert converted["properties"]["id"] == {"type": ["string", "null"]}
    assert jsonschema.Draft202012Validator(converted).is_valid({"id": None})


# -- every path of the file --------------------------------------------------------------------


#: Each path of the file, with each kind of version where it has one.
PATH_CASES = [
    (path, version)
    for path in sorted(SPEC_PATHS)
    for version in (["", "1", "canary"] if "${MODEL_VERSION}" in path else [""])
]


@pytest.mark.parametrize(("path", "version"), PATH_CASES, ids=[f"{p}@{v}" for p, v in PATH_CASES])
def test_every_path_of_the_spec_is_served_as_declared(
    served: Served, http: httpx.Client, path: str, version: str
) -> None:
    """Each path, its placeholders filled (with and without the optional version): 200,
    and a body valid against the schema the file declares for it, if any. ``/v2/`` may
    redirect to ``/v2``, the protocol text's spelling."""
    (method,) = SPEC_PATHS[path]
    url = concrete(path, "m1", version)
    if method == "post":
        response = http.post(url, json=infer_body(served.x))
    else:
        response = http.get(url, follow_redirects=True)
    assert response.status_code == 200, response.text
    schema = response_schema(path, method, 200)
    if schema is not None:
        assert response.headers["content-type"] == "application/json"
        validator(schema).validate(response.json())


# -- health and metadata -----------------------------------------------------------------------


def test_health_answers_in_the_status_and_the_body(http: httpx.Client) -> None:
    """The file declares a 200 and no body; propserve's body says the same, as documented."""
    assert response_schema("/v2/health/live", "get", 200) is None
    live = http.get("/v2/health/live")
    ready = http.get("/v2/health/ready")
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert (ready.status_code, ready.json()) == (200, {"ready": True})


def test_server_metadata_is_the_specs_object(http: httpx.Client) -> None:
    response = http.get("/v2")
    assert response.status_code == 200
    body = response.json()
    validator(declared("/v2/", "get", 200)).validate(body)
    assert body["name"] == "propserve"
    assert {"binary_tensor_data", "model_repository"} <= set(body["extensions"])


@pytest.mark.parametrize("version", ["", "1", "canary"], ids=["default", "number", "label"])
def test_model_metadata_is_the_specs_object(http: httpx.Client, version: str) -> None:
    response = http.get(concrete(METADATA_PATH, "m1", version))
    assert response.status_code == 200, response.text
    body = response.json()
    validator(declared(METADATA_PATH, "get", 200)).validate(body)
    assert body["name"] == "m1"
    assert body["versions"] == ["1"]
    assert body["inputs"] == [{"name": "inputs", "datatype": "FP32", "shape": [-1, 4]}]
    assert body["outputs"] == [{"name": "outputs", "datatype": "FP32", "shape": [-1, UNITS]}]
    assert body["properties"]["label.canary"] == "1"


#: Unknown models and versions asked about: (path, the file's error schema, the name the
#: message has). The file declares no error body for readiness; it is the same object.
UNKNOWN_PATHS = [
    (concrete(METADATA_PATH, UNKNOWN, ""), "metadata_model_error_response", UNKNOWN),
    (concrete(METADATA_PATH, UNKNOWN, "1"), "metadata_model_error_response", UNKNOWN),
    (concrete(METADATA_PATH, "m1", "9"), "metadata_model_error_response", "'9'"),
    (concrete(METADATA_PATH, "m1", "no-such-label"), "metadata_model_error_response", "no-such"),
    (concrete(METADATA_PATH, UNKNOWN, "") + "/ready", "metadata_model_error_response", UNKNOWN),
    (concrete(METADATA_PATH, "m1", "9") + "/ready", "metadata_model_error_response", "'9'"),
]


@pytest.mark.parametrize(
    ("path", "schema", "name"), UNKNOWN_PATHS, ids=[p for p, _, _ in UNKNOWN_PATHS]
)
def test_an_unknown_model_or_version_is_a_404_error_object(
    http: httpx.Client, path: str, schema: str, name: str
) -> None:
    assert name in assert_error(http.get(path), 404, schema)


# -- infer with JSON tensors -------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("version", list(VERSIONS), ids=["default", "number", "label"])
def test_infer_with_json_tensors_answers_the_v1_prediction(
    served: Served, http: httpx.Client, version: str, nested: bool
) -> None:
    body = infer_body(served.x, nested=nested, id="req-1", outputs=[{"name": "outputs"}])
    response = http.post(concrete(INFER_PATH, "m1", version), json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert HEADER_LENGTH.lower() not in response.headers
    answer = response.json()
    validator(declared(INFER_PATH, "post", 200)).validate(answer)
    assert answer["model_name"] == "m1"
    assert answer["model_version"] == VERSIONS[version][1]
    assert answer["id"] == "req-1"
    assert answer["parameters"]["step"] == (2 if version == "" else 1)
    same_bits(json_outputs(answer), served.expected[version])


def test_a_body_naming_its_model_as_kserves_client_writes_it_is_answered(
    served: Served, http: httpx.Client
) -> None:
    """KServe's InferenceRESTClient writes ``model_name`` into every infer body, beside the
    path. The file's request schema lists no such field but allows fields it does not list,
    so the body is a valid request and is answered as the same body without it."""
    body = infer_body(served.x, model_name="m1")
    response = http.post(concrete(INFER_PATH, "m1", ""), json=body)
    assert response.status_code == 200, response.text
    same_bits(json_outputs(response.json()), served.expected[""])


def _tensor(**changes: Any) -> dict[str, Any]:
    tensor: dict[str, Any] = {
        "name": "inputs",
        "shape": [2, 4],
        "datatype": "FP32",
        "data": [0.5] * 8,
    }
    return {**tensor, **changes}


#: Spec-valid requests the server refuses: (what, the body, a word the message has).
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("INT32 datatype", {"inputs": [_tensor(datatype="INT32", data=[1] * 8)]}, "datatype"),
    ("FP16 datatype", {"inputs": [_tensor(datatype="FP16")]}, "datatype"),
    ("BYTES datatype", {"inputs": [_tensor(datatype="BYTES", data=["a"] * 8)]}, "datatype"),
    ("too few values", {"inputs": [_tensor(data=[0.5] * 7)]}, "shape"),
    ("too many values", {"inputs": [_tensor(data=[0.5] * 9)]}, "shape"),
    ("three dimensions", {"inputs": [_tensor(shape=[2, 2, 2])]}, "shape"),
    ("one dimension", {"inputs": [_tensor(shape=[8])]}, "shape"),
    ("wrong features", {"inputs": [_tensor(shape=[2, 3], data=[0.5] * 6)]}, "features"),
    (
        "nested rows unlike shape",
        {"inputs": [_tensor(data=[[0.5] * 4] * 2, shape=[4, 2])]},
        "[4, 2]",
    ),
    ("unknown input name", {"inputs": [_tensor(name="input0")]}, "input0"),
    ("two inputs", {"inputs": [_tensor(), _tensor()]}, "2 input"),
    ("unknown output", {"inputs": [_tensor()], "outputs": [{"name": "output0"}]}, "output0"),
]


@pytest.mark.parametrize(("what", "body", "word"), REFUSED, ids=[r[0] for r in REFUSED])
def test_a_spec_valid_request_the_model_cannot_take_is_a_400_error_object(
    served: Served, http: httpx.Client, what: str, body: dict[str, Any], word: str
) -> None:
    spec_valid_request(body)
    response = http.post(concrete(INFER_PATH, "m1", ""), json=body)
    message = assert_error(response, 400, "inference_error_response")
    assert word in message
    assert response.headers["error-code"] == "invalid_argument"


@pytest.mark.parametrize(
    "content",
    [b"{nope", b"", b"[1, 2]", b'{"inputs": [', b"\xff\xfe", b'"inputs"'],
    ids=["broken", "empty", "array", "cut", "not-utf8", "string"],
)
def test_a_body_that_is_not_a_json_object_is_a_400_error_object(
    http: httpx.Client, content: bytes
) -> None:
    response = http.post(
        concrete(INFER_PATH, "m1", ""),
        content=content,
        headers={"content-type": "application/json"},
    )
    assert_error(response, 400, "inference_error_response")


@pytest.mark.parametrize("version", ["", "1"])
def test_infer_on_an_unknown_model_is_a_404_error_object(
    served: Served, http: httpx.Client, version: str
) -> None:
    response = http.post(concrete(INFER_PATH, UNKNOWN, version), json=infer_body(served.x))
    assert UNKNOWN in assert_error(response, 404, "inference_error_response")


@pytest.mark.parametrize("version", ["9", "no-such-label"])
def test_infer_on_an_unknown_version_is_a_404_error_object(
    served: Served, http: httpx.Client, version: str
) -> None:
    response = http.post(concrete(INFER_PATH, "m1", version), json=infer_body(served.x))
    assert version in assert_error(response, 404, "inference_error_response")


# -- the binary tensor data extension, by hand -------------------------------------------------


def binary_request(header: dict[str, Any], data: bytes = b"") -> tuple[bytes, dict[str, str]]:
    """A body of the JSON header then ``data``, and the headers that say where it splits."""
    head = json.dumps(header).encode()
    return head + data, {
        HEADER_LENGTH: str(len(head)),
        "content-type": "application/octet-stream",
    }


def binary_input(x: NDArray[Any]) -> tuple[dict[str, Any], bytes]:
    raw = x.astype("<f4").tobytes()
    tensor = {
        "name": "inputs",
        "shape": list(x.shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": len(raw)},
    }
    return tensor, raw


def read_binary_answer(response: httpx.Response) -> tuple[dict[str, Any], NDArray[Any]]:
    """The JSON header and the one output of an answer with binary outputs, by hand: the
    header's length from Inference-Header-Content-Length, the output's bytes after it."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    body = response.content
    length = int(response.headers[HEADER_LENGTH])
    answer: dict[str, Any] = json.loads(body[:length])
    validator(declared(INFER_PATH, "post", 200), binary=True).validate(answer)
    (output,) = answer["outputs"]
    assert "data" not in output
    size = output["parameters"]["binary_data_size"]
    assert output["datatype"] == "FP32"
    assert size == 4 * int(np.prod(output["shape"]))
    assert len(body) == length + size
    outputs = np.frombuffer(body[length:], dtype="<f4").reshape(output["shape"])
    return answer, outputs


@pytest.mark.parametrize("version", list(VERSIONS), ids=["default", "number", "label"])
def test_binary_inputs_and_outputs(served: Served, http: httpx.Client, version: str) -> None:
    """Raw float32 rows after the JSON header, ``binary_data_output`` asking for the outputs
    as raw bytes too: the answer's bytes are the /v1 prediction's."""
    tensor, raw = binary_input(served.x)
    header = spec_valid_request(
        {"id": "bin-1", "inputs": [tensor], "parameters": {"binary_data_output": True}},
        binary=True,
    )
    content, headers = binary_request(header, raw)
    response = http.post(concrete(INFER_PATH, "m1", version), content=content, headers=headers)
    answer, outputs = read_binary_answer(response)
    assert (answer["model_name"], answer["id"]) == ("m1", "bin-1")
    assert answer["model_version"] == VERSIONS[version][1]
    same_bits(outputs, served.expected[version])


def test_binary_inputs_with_json_outputs(served: Served, http: httpx.Client) -> None:
    tensor, raw = binary_input(served.x)
    content, headers = binary_request(spec_valid_request({"inputs": [tensor]}, binary=True), raw)
    response = http.post(concrete(INFER_PATH, "m1", ""), content=content, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    validator(declared(INFER_PATH, "post", 200)).validate(answer)
    same_bits(json_outputs(answer), served.expected[""])


def test_json_inputs_with_one_output_asked_as_binary(served: Served, http: httpx.Client) -> None:
    """``binary_data`` on the requested output, the inputs plain JSON with no header."""
    body = infer_body(served.x, outputs=[{"name": "outputs", "parameters": {"binary_data": True}}])
    response = http.post(concrete(INFER_PATH, "m1", "1"), json=body)
    _, outputs = read_binary_answer(response)
    same_bits(outputs, served.expected["1"])


def _binary_case(
    header_length: str | None = None, size: int | None = None, extra: bytes = b"", cut: int = 0
) -> tuple[bytes, dict[str, str]]:
    """A binary request for two rows, spoiled as asked: another header value, another
    ``binary_data_size``, bytes added or cut off the end."""
    x = np.ones((2, 4), dtype=np.float32)
    tensor, raw = binary_input(x)
    if size is not None:
        tensor["parameters"]["binary_data_size"] = size
    content, headers = binary_request({"inputs": [tensor]}, raw + extra)
    if cut:
        content = content[:-cut]
    if header_length is not None:
        headers[HEADER_LENGTH] = header_length
    return content, headers


#: Binary requests refused 400: (what, body and headers, a word the message has).
HEADER = HEADER_LENGTH
BINARY_REFUSED: list[tuple[str, tuple[bytes, dict[str, str]], str]] = [
    ("header length past the body", _binary_case(header_length="100000"), HEADER),
    ("header length one past the body", _binary_case(cut=33), HEADER),
    ("header length cuts the JSON", _binary_case(header_length="10"), "JSON"),
    ("header length zero", _binary_case(header_length="0"), "JSON"),
    ("binary_data_size short of the bytes", _binary_case(size=28), "bytes"),
    ("binary_data_size past the bytes", _binary_case(size=36), "binary_data_size"),
    ("bytes beyond binary_data_size", _binary_case(extra=b"\0\0\0\0"), "bytes"),
    ("bytes short of the shape", _binary_case(size=28, cut=4), "shape"),
    ("binary_data_size negative", _binary_case(size=-32), "binary_data_size"),
    ("header not a number", _binary_case(header_length="abc"), HEADER),
    ("header negative", _binary_case(header_length="-5"), HEADER),
    ("header with an exponent", _binary_case(header_length="1e2"), HEADER),
    ("header in hex", _binary_case(header_length="0x40"), HEADER),
    ("header empty", _binary_case(header_length=""), HEADER),
    ("header unicode digits", _binary_case(header_length="\u0661\u0662"), HEADER),
]


@pytest.mark.parametrize(
    ("what", "case", "word"), BINARY_REFUSED, ids=[r[0] for r in BINARY_REFUSED]
)
def test_a_malformed_binary_request_is_a_400_and_the_server_stays_healthy(
    served: Served,
    http: httpx.Client,
    what: str,
    case: tuple[bytes, dict[str, str]],
    word: str,
) -> None:
    content, headers = case
    encoded = {key.encode(): value.encode("utf-8") for key, value in headers.items()}
    response = http.post(concrete(INFER_PATH, "m1", ""), content=content, headers=encoded)
    assert word in assert_error(response, 400, "inference_error_response")
    assert response.headers["error-code"] == "invalid_argument"
    assert_healthy(served, http)


def test_a_well_formed_binary_request_of_the_same_shape_is_answered(
    served: Served, http: httpx.Client
) -> None:
    """The unspoilt request the refused ones are made from: refused only for the spoiling."""
    content, headers = _binary_case()
    response = http.post(concrete(INFER_PATH, "m1", ""), content=content, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [2, UNITS]
