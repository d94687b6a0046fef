"""What the running server says about itself: the REST OpenAPI document lists every
operation with resolvable schemas, and gRPC reflection lists the services."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support.server import ServerProcess

OPERATIONS = {
    "CreateModel": ("post", "/v1/models"),
    "ListModels": ("get", "/v1/models"),
    "GetModel": ("get", "/v1/models/{name}"),
    "UpdateModel": ("patch", "/v1/models/{name}"),
    "DeleteModel": ("delete", "/v1/models/{name}"),
    "Predict": ("post", "/v1/models/{name}/predict"),
    "Evaluate": ("post", "/v1/models/{name}/evaluate"),
    "TrainStep": ("post", "/v1/models/{name}/train_step"),
    "SaveVersion": ("post", "/v1/models/{name}/versions"),
    "ListVersions": ("get", "/v1/models/{name}/versions"),
    "SetLabel": ("put", "/v1/models/{name}/labels/{label}"),
    "RemoveLabel": ("delete", "/v1/models/{name}/labels/{label}"),
    "Rollback": ("post", "/v1/models/{name}/rollback"),
    "ExportWeights": ("get", "/v1/models/{name}/versions/{version}/weights"),
    "GetHistory": ("get", "/v1/models/{name}/history"),
}
#: gRPC methods with no REST route of their own: CreateModel's chunked twin, and the live
#: history stream (REST clients poll GetHistory).
GRPC_ONLY = {"Train", "UploadModel", "WatchHistory"}


@pytest.fixture(scope="module")
def openapi(server: ServerProcess) -> dict[str, Any]:
    response = httpx.get(f"{server.rest_url}/openapi.json", timeout=10)
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def resolve(document: dict[str, Any], ref: str) -> dict[str, Any]:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    assert isinstance(node, dict)
    return node


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def operations(document: dict[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    found = {}
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            if isinstance(operation, dict) and "operationId" in operation:
                found[operation["operationId"]] = (method, path, operation)
    return found


def test_every_operation_is_listed(openapi: dict[str, Any]) -> None:
    found = operations(openapi)
    assert {op: found[op][:2] for op in OPERATIONS if op in found} == OPERATIONS
    for name, (_, _, operation) in found.items():
        if name in OPERATIONS:
            assert operation["tags"] == ["models"], name
            assert "404" in operation["responses"], name
            assert "429" in operation["responses"], name  # too busy


@pytest.mark.parametrize(
    ("operation", "schema"),
    [("Predict", "PredictBody"), ("TrainStep", "TrainStepBody"), ("Evaluate", "EvaluateBody")],
)
def test_tensor_bodies_are_documented(openapi: dict[str, Any], operation: str, schema: str) -> None:
    _, _, spec = operations(openapi)[operation]
    body = spec["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": f"#/components/schemas/{schema}"}
    resolved = resolve(openapi, body["$ref"])
    assert "inputs" in resolved["properties"]
    assert "inputs" in resolved["required"]
    if schema == "TrainStepBody":
        assert {"inputs", "targets"} <= set(resolved["required"])
        assert "learning_rate" in resolved["properties"]
    else:
        assert {"version", "label"} <= set(resolved["properties"])
    for ref in refs(resolved):
        resolve(openapi, ref)


def test_every_reference_resolves(openapi: dict[str, Any]) -> None:
    every = set(refs(openapi))
    assert "#/components/schemas/FlatTensor" in every
    for ref in every:
        resolve(openapi, ref)


def test_reflection_lists_the_services(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        answers = list(stub.ServerReflectionInfo(requests, timeout=10))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"propserve.v1.ModelService", "grpc.health.v1.Health"} <= names

        lookup = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="propserve.v1.ModelService"
        )
        answers = list(stub.ServerReflectionInfo(iter([lookup]), timeout=10))
        files = answers[0].file_descriptor_response.file_descriptor_proto
        parsed = [descriptor_pb2.FileDescriptorProto.FromString(f) for f in files]
        services = {
            f"{f.package}.{s.name}": {m.name for m in s.method} for f in parsed for s in f.service
        }
        assert services["propserve.v1.ModelService"] == {*OPERATIONS, *GRPC_ONLY}
