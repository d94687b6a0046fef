"""While the server is not ready or drains, the Open Inference Protocol says so as its clients
read it: the status (503) for tritonclient, the body's ``ready: false`` for KServe's client;
liveness stays 200, and inference is refused UNAVAILABLE in the protocol's envelope. In
process, over ASGI and a grpc.aio server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from propserve.oip import open_inference_pb2 as pb
from propserve.service.auth import Authenticator
from propserve.service.config import Settings
from propserve.service.dataplane import DataPlane
from propserve.service.grpc.oip import InferenceService, add_inference_service
from propserve.service.grpc.server import new_server
from propserve.service.models import Models
from propserve.service.rest.app import RestApp
from propserve.service.store import ModelStore

SPEC: dict[str, Any] = {"input_dim": 2, "layers": [{"units": 1}], "loss": "mse", "seed": 1}
INFER = {"inputs": [{"name": "inputs", "shape": [1, 2], "datatype": "FP64", "data": [1, 2]}]}


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[DataPlane]:
    settings = Settings(store=tmp_path / "store")
    core = Models(ModelStore(settings.store), settings)
    core.create_model("m", SPEC)
    opened = DataPlane(core, Authenticator({}), core.metrics, settings)
    yield opened
    opened.close()
    core.close()


def rest(plane: DataPlane, ready: bool, requests: list[tuple[str, str]]) -> list[httpx.Response]:
    app = RestApp(plane, plane.metrics, ready=lambda: ready, version="test")

    async def send() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [
                await client.request(method, path, json=INFER if method == "POST" else None)
                for method, path in requests
            ]

    return asyncio.run(send())


REQUESTS = [
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2/models/m/ready"),
    ("POST", "/v2/models/m/infer"),
]


def test_ready_answers_200_and_true(plane: DataPlane) -> None:
    answers = rest(plane, True, REQUESTS)
    assert [(a.status_code, a.json()) for a in answers[:3]] == [
        (200, {"live": True}),
        (200, {"ready": True}),
        (200, {"name": "m", "ready": True}),
    ]
    assert answers[3].status_code == 200


def test_not_ready_answers_503_and_false_in_the_body(plane: DataPlane) -> None:
    answers = rest(plane, False, REQUESTS)
    assert [(a.status_code, a.json()) for a in answers[:3]] == [
        (200, {"live": True}),
        (503, {"ready": False}),
        (503, {"name": "m", "ready": False}),
    ]


def test_a_draining_server_refuses_inference_unavailable(plane: DataPlane) -> None:
    plane.draining = True
    answers = rest(plane, False, REQUESTS)
    assert answers[0].status_code == 200
    refused = answers[3]
    assert refused.status_code == 503
    assert refused.json() == {"error": "the server is shutting down"}
    assert refused.headers["error-code"] == "unavailable"


def test_grpc_readiness_follows_the_server(plane: DataPlane) -> None:
    state = {"ready": True}

    async def ask() -> list[bool]:
        server = new_server(max_message_bytes=1 << 20)
        add_inference_service(
            server, InferenceService(plane, ready=lambda: state["ready"], version="test")
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        answers = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                service = "/inference.GRPCInferenceService"
                server_ready = channel.unary_unary(
                    f"{service}/ServerReady",
                    request_serializer=pb.ServerReadyRequest.SerializeToString,
                    response_deserializer=pb.ServerReadyResponse.FromString,
                )
                model_ready = channel.unary_unary(
                    f"{service}/ModelReady",
                    request_serializer=pb.ModelReadyRequest.SerializeToString,
                    response_deserializer=pb.ModelReadyResponse.FromString,
                )
                for ready in (True, False):
                    state["ready"] = ready
                    answers.append((await server_ready(pb.ServerReadyRequest())).ready)
                    answers.append((await model_ready(pb.ModelReadyRequest(name="m"))).ready)
        finally:
            await server.stop(None)
        return answers

    assert asyncio.run(ask()) == [True, True, False, False]


def test_the_body_may_name_the_model_and_version_as_the_path_does(plane: DataPlane) -> None:
    """KServe's client repeats the model (and version) in the body: the same is taken, a
    different one refused, and a version in the body alone names the weights."""
    plane.models.save_version("m")
    app = RestApp(plane, plane.metrics, ready=lambda: True, version="test")

    async def send() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            bodies: list[tuple[str, dict[str, Any]]] = [
                ("/v2/models/m/infer", {"model_name": "m"}),
                ("/v2/models/m/infer", {"model_name": "other"}),
                ("/v2/models/m/infer", {"model_name": "m", "model_version": "1"}),
                ("/v2/models/m/versions/1/infer", {"model_version": "1"}),
                ("/v2/models/m/versions/1/infer", {"model_version": "2"}),
                ("/v2/models/m/infer", {"model_version": 1}),
            ]
            return [await client.post(path, json=INFER | extra) for path, extra in bodies]

    answers = asyncio.run(send())
    assert [a.status_code for a in answers] == [200, 400, 200, 200, 400, 400]
    assert answers[0].json()["model_version"] == ""
    assert answers[2].json()["model_version"] == answers[3].json()["model_version"] == "1"
    assert "'other'" in answers[1].json()["error"]
