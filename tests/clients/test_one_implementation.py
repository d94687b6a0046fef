"""The four clients are one implementation: the same methods with the same signatures, a
transport of the caller's own when given (and left to the caller to close), and the
server's request id on every error it answered."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import numpy as np
import pytest

from propserve import wire
from propserve.clients import (
    AsyncClient,
    AsyncGrpcClient,
    AsyncRestClient,
    Client,
    ClientError,
    GrpcClient,
    RestClient,
)
from propserve.v1 import model_service_pb2 as pb
from propserve.v1 import model_service_pb2_grpc as pb_grpc
from tests.clients.helpers import KINDS, SPECS, WAIT, connect
from tests.support.server import ServerProcess, start_server

OPERATIONS = {
    "create_model",
    "get_model",
    "list_models",
    "delete_model",
    "update_model",
    "predict",
    "evaluate",
    "train_step",
    "train",
    "save_version",
    "list_versions",
    "set_label",
    "remove_label",
    "rollback",
    "export_weights",
    "history",
}
#: Methods of the gRPC clients only: WatchHistory is a server stream (REST clients poll
#: ``history``).
GRPC_STREAMS = {"watch_history"}


def _public(cls: type) -> dict[str, Any]:
    return {
        name: member
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def _signature(function: Any) -> inspect.Signature:
    return inspect.signature(function, eval_str=True)


def test_the_four_clients_have_the_same_methods_with_the_same_signatures() -> None:
    blocking, asyncio_ = _public(Client), _public(AsyncClient)
    assert set(blocking) == set(asyncio_) == OPERATIONS | {"close"}
    # The transports add I/O only: every public method is the shared one.
    for blocking_cls in (GrpcClient, RestClient):
        own = GRPC_STREAMS if blocking_cls is GrpcClient else set()
        assert _public(blocking_cls).keys() == blocking.keys() | own
        assert all(getattr(blocking_cls, name) is blocking[name] for name in OPERATIONS)
    for asyncio_cls in (AsyncGrpcClient, AsyncRestClient):
        own = GRPC_STREAMS if asyncio_cls is AsyncGrpcClient else set()
        assert _public(asyncio_cls).keys() == asyncio_.keys() | own
        assert all(getattr(asyncio_cls, name) is asyncio_[name] for name in OPERATIONS)
    # A server stream only gRPC has: the same arguments in both flavours.
    for name in GRPC_STREAMS:
        sync, async_ = (_signature(getattr(cls, name)) for cls in (GrpcClient, AsyncGrpcClient))
        assert list(sync.parameters) == list(async_.parameters), name
    for name in sorted(blocking):
        sync, async_ = _signature(blocking[name]), _signature(asyncio_[name])
        assert inspect.iscoroutinefunction(asyncio_[name]), name
        assert sync.return_annotation == async_.return_annotation, name
        assert list(sync.parameters) == list(async_.parameters), name
        for parameter, twin in zip(
            sync.parameters.values(), async_.parameters.values(), strict=True
        ):
            assert (parameter.kind, parameter.default) == (twin.kind, twin.default), name
            if (name, parameter.name) != ("train", "batches"):
                assert parameter.annotation == twin.annotation, (name, parameter.name)
    # The asyncio train also reads async iterables, besides everything the blocking one does.
    batches = _signature(asyncio_["train"]).parameters["batches"].annotation
    assert _signature(blocking["train"]).parameters["batches"].annotation in batches.__args__


@pytest.mark.parametrize(
    ("blocking", "asyncio_", "injected"),
    [(GrpcClient, AsyncGrpcClient, "channel"), (RestClient, AsyncRestClient, "http_client")],
)
def test_the_twins_take_the_same_arguments(blocking: type, asyncio_: type, injected: str) -> None:
    sync, async_ = _signature(blocking), _signature(asyncio_)
    assert list(sync.parameters) == list(async_.parameters)
    assert list(sync.parameters)[-1] == injected
    for parameter, twin in zip(sync.parameters.values(), async_.parameters.values(), strict=True):
        assert (parameter.kind, parameter.default) == (twin.kind, twin.default)
        if parameter.name != injected:
            assert parameter.annotation == twin.annotation, parameter.name


# -- a transport of the caller's own -------------------------------------------------------


def _method(details: Any) -> str:
    method = details.method  # bytes in grpc.aio, str in grpc
    return str(method.decode() if isinstance(method, bytes) else method).rsplit("/", 1)[-1]


class Seen(grpc.UnaryUnaryClientInterceptor):
    """Records the method of every unary call that goes through a channel."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.methods.append(_method(details))
        return continuation(details, request)


class AsyncSeen(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.methods.append(_method(details))
        return await continuation(details, request)


def _batches(rows: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    x = np.linspace(-1, 1, rows * 5).reshape(rows, 5)
    return [(x, np.zeros((rows, 2)))]


def test_a_channel_of_ones_own_is_used_and_left_open(server: ServerProcess) -> None:
    seen = Seen()
    with grpc.insecure_channel(server.grpc_target) as plain:
        channel = grpc.intercept_channel(plain, seen)
        # The default target is not where the server is: only the channel can reach it.
        with GrpcClient(channel=channel, timeout=WAIT) as client:
            client.create_model("own-channel", SPECS["f64-mse-sgd"])
            assert [r.step for r in client.train("own-channel", _batches())] == [1]
        assert seen.methods == ["CreateModel"]
        # Still open after the client closed: the caller closes it.
        stub = pb_grpc.ModelServiceStub(channel)
        reply = stub.GetModel(pb.GetModelRequest(name="own-channel"), timeout=WAIT)
        assert reply.head_step == 1


def test_an_asyncio_channel_of_ones_own_is_used_and_left_open(server: ServerProcess) -> None:
    seen = AsyncSeen()

    async def run() -> int:
        async with grpc.aio.insecure_channel(server.grpc_target, interceptors=[seen]) as channel:
            async with AsyncGrpcClient(channel=channel, timeout=WAIT) as client:
                await client.create_model("own-aio-channel", SPECS["f64-mse-sgd"])
                await client.train("own-aio-channel", _batches())
            stub = pb_grpc.ModelServiceStub(channel)
            reply = await stub.GetModel(pb.GetModelRequest(name="own-aio-channel"), timeout=WAIT)
            return int(reply.head_step)

    assert asyncio.run(run()) == 1
    assert seen.methods == ["CreateModel", "GetModel"]


def test_an_http_client_of_ones_own_is_used_and_left_open(server: ServerProcess) -> None:
    sent: list[str] = []

    def record(request: httpx.Request) -> None:
        sent.append(f"{request.method} {request.url.path}")

    with httpx.Client(event_hooks={"request": [record]}) as http:
        with RestClient(server.rest_url, http_client=http, timeout=WAIT) as client:
            client.create_model("own-http", SPECS["f64-mse-sgd"])
            client.train("own-http", _batches())
        assert sent == ["POST /v1/models", "POST /v1/models/own-http/train_step"]
        assert not http.is_closed
        assert http.get(f"{server.rest_url}/v1/models/own-http").json()["head_step"] == 1


def test_an_asyncio_http_client_of_ones_own_is_used_and_left_open(server: ServerProcess) -> None:
    sent: list[str] = []

    async def record(request: httpx.Request) -> None:
        sent.append(f"{request.method} {request.url.path}")

    async def run() -> Any:
        async with httpx.AsyncClient(event_hooks={"request": [record]}) as http:
            async with AsyncRestClient(server.rest_url, http_client=http, timeout=WAIT) as client:
                await client.create_model("own-aio-http", SPECS["f64-mse-sgd"])
            assert not http.is_closed
            return (await http.get(f"{server.rest_url}/v1/models/own-aio-http")).json()

    assert asyncio.run(run())["name"] == "own-aio-http"
    assert sent == ["POST /v1/models", "GET /v1/models/own-aio-http"]


def test_settings_for_a_transport_one_brings_are_refused(tmp_path: Any) -> None:
    pem = tmp_path / "ca.pem"
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        for options in ({"tls": True}, {"root_certificates": pem}, {"max_message_bytes": 1 << 20}):
            with pytest.raises(ValueError, match="with channel= given"):
                GrpcClient(channel=channel, **options)
    with httpx.Client() as http, pytest.raises(ValueError, match="with http_client= given"):
        RestClient(http_client=http, root_certificates=pem)


# -- request ids ---------------------------------------------------------------------------


@pytest.fixture
def logged(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server whose log is read once it has stopped, when every line is written (a server
    may log a call's refusal after answering it)."""
    process = start_server(tmp_path / "store")
    try:
        with GrpcClient(process.grpc_target, timeout=WAIT) as client:
            client.create_model("ids", SPECS["f64-mse-sgd"])
        yield process
    finally:
        process.stop()


def test_every_refusal_carries_the_request_id_the_server_logged(logged: ServerProcess) -> None:
    model = "ids"
    x, y = np.ones((2, 5)), np.zeros((2, 2))
    huge = np.full((2, 2), 1e200)  # finite, but its squared error is not: the step is refused
    refusals: list[Callable[[Any], Any]] = [
        lambda c: c.get_model("nope"),
        lambda c: c.predict(model, np.ones((2, 4))),
        lambda c: c.predict(model, x, version=99),
        lambda c: c.create_model(model, SPECS["f64-mse-sgd"]),
        lambda c: c.create_model("bad", {"input_dim": -1}),
        lambda c: c.train_step(model, x, y, learning_rate=1e300),
        lambda c: c.train(model, [(x, y), (np.ones((2, 4)), y)]),
        lambda c: c.train(model, [(x, y), (x, huge)]),
        lambda c: c.set_label(model, "stable", 99),
        lambda c: c.rollback(model, label="gone"),
        lambda c: c.update_model("nope", retain=2),
    ]
    ids: list[str] = []
    for kind in KINDS:
        with connect(kind, logged) as client:
            for refuse in refusals:
                with pytest.raises(ClientError) as caught:
                    refuse(client)
                request_id = caught.value.request_id
                assert caught.value.status is not None, (kind, caught.value)
                assert request_id is not None and wire.valid_request_id(request_id), caught.value
                ids.append(request_id)
    assert logged.stop() == 0
    log = logged.log()
    assert [i for i in ids if i not in log] == []
    assert len(set(ids)) == len(ids) == len(KINDS) * len(refusals)


# -- answers that cannot be read -----------------------------------------------------------


def _answering(status: int, content: bytes) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=content, headers={"x-request-id": "r-7"})

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    ("status", "content"),
    [(200, b"<html>a proxy's page</html>"), (200, b'{"models": [{"name": "m"}]}'), (200, b"")],
)
def test_an_answer_that_cannot_be_read_is_a_client_error_with_its_request_id(
    status: int, content: bytes
) -> None:
    with (
        httpx.Client(transport=_answering(status, content)) as http,
        RestClient("http://propserve.invalid", http_client=http) as client,
        pytest.raises(ClientError, match="the server's answer could not be read") as caught,
    ):
        client.list_models()
    assert (caught.value.status, caught.value.request_id) == (200, "r-7")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
