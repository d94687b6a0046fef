"""The REST protocol's own parts (service.http_fast), in process on a stand-in transport: which
requests it reads without the parser, when an idle keep-alive connection is closed and that a
busy one never is. (The HTTP framing, pipelining and answers are tested over real sockets in
tests/e2e/test_rest_hot_path.py.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from propserve.service.auth import Authenticator
from propserve.service.core import Core
from propserve.service.dispatch import Dispatcher
from propserve.service.http_fast import HotPathProtocol, plain_predict, protocol_class
from propserve.service.metrics import Metrics
from propserve.service.rest_api import PredictHotPath
from propserve.service.store import ModelStore

SPEC: dict[str, Any] = {
    "input_dim": 4,
    "layers": [{"units": 3, "activation": "softmax"}],
    "loss": "softmax_cross_entropy",
}
KEEP_ALIVE = 0.3  # seconds


class Transport(asyncio.Transport):
    """Stands in for a socket: keeps what was written and whether it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed_at: float | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed_at is not None

    def close(self) -> None:
        if self.closed_at is None:
            self.closed_at = asyncio.get_running_loop().time()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


Connect = Callable[[], tuple[HotPathProtocol, Transport]]


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Core]:
    core = Core(ModelStore(tmp_path / "store"))
    core.create_model("m", SPEC)
    yield core
    core.close()


def run(core: Core, test: Callable[[Connect], Awaitable[None]]) -> None:
    """Runs ``test`` with a way to open connections to a protocol over ``core``. Requests
    other than a predict go to an app that answers after 3 keep-alive timeouts."""

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(3 * KEEP_ALIVE)
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]}
        )
        await send({"type": "http.response.body", "body": b"slow"})

    async def main() -> None:
        metrics = Metrics()
        dispatcher = Dispatcher(core, busy_poll=0)
        hot = PredictHotPath(
            dispatcher, Authenticator({}), metrics, max_body=1 << 20, max_elements=1 << 20
        )
        protocol_type = protocol_class(hot)
        config = uvicorn.Config(
            slow_app, http=protocol_type, log_config=None, access_log=False, lifespan="off"
        )
        config.load()
        state = ServerState()
        state.default_headers = [(b"date", b"Sat, 28 Nov 2026 20:00:00 GMT")]

        def connect() -> tuple[HotPathProtocol, Transport]:
            protocol = protocol_type(config=config, server_state=state, app_state={})
            protocol.timeout_keep_alive = KEEP_ALIVE  # type: ignore[assignment]
            transport = Transport()
            protocol.connection_made(transport)
            return protocol, transport

        try:
            await test(connect)
        finally:
            dispatcher.close()

    asyncio.run(main())


def predict() -> bytes:
    body = json.dumps({"inputs": [[0.5, -1.0, 2.0, 0.25]]}).encode()
    head = f"POST /v1/models/m/predict HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def test_an_idle_connection_closes_after_the_keep_alive_timeout(core: Core) -> None:
    async def test(connect: Connect) -> None:
        loop = asyncio.get_running_loop()
        protocol, transport = connect()
        sent = loop.time()  # the answer's idle time starts after this
        protocol.data_received(predict())
        assert transport.written[-1].startswith(b"HTTP/1.1 200 OK")
        await asyncio.sleep(KEEP_ALIVE * 0.5)
        assert transport.closed_at is None
        await asyncio.sleep(KEEP_ALIVE)
        assert transport.closed_at is not None
        assert transport.closed_at - sent >= KEEP_ALIVE

    run(core, test)


def test_a_connection_in_use_stays_open_and_closes_a_timeout_after_its_last_answer(
    core: Core,
) -> None:
    async def test(connect: Connect) -> None:
        loop = asyncio.get_running_loop()
        protocol, transport = connect()
        for _ in range(16):  # over 4 timeouts, a request every quarter of one
            last = loop.time()
            protocol.data_received(predict())
            await asyncio.sleep(KEEP_ALIVE / 4)
            assert transport.closed_at is None
        await asyncio.sleep(KEEP_ALIVE * 1.2)
        assert len(transport.written) == 16
        assert all(w.startswith(b"HTTP/1.1 200 OK") for w in transport.written)
        assert transport.closed_at is not None
        assert transport.closed_at - last >= KEEP_ALIVE

    run(core, test)


def test_a_request_being_answered_is_never_cut_by_the_timeout(core: Core) -> None:
    async def test(connect: Connect) -> None:
        protocol, transport = connect()
        protocol.data_received(predict())  # arms the timer
        protocol.data_received(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.sleep(KEEP_ALIVE * 2)  # the timer fires meanwhile
        assert transport.closed_at is None
        await asyncio.sleep(KEEP_ALIVE * 1.5)
        assert transport.written[-1].endswith(b"slow")
        assert transport.closed_at is None  # the idle time starts with that answer
        await asyncio.sleep(KEEP_ALIVE * 1.5)
        assert transport.closed_at is not None

    run(core, test)


def test_a_lost_connection_leaves_no_timer(core: Core) -> None:
    async def test(connect: Connect) -> None:
        protocol, _ = connect()
        protocol.data_received(predict())
        assert protocol.timeout_keep_alive_task is not None
        protocol.connection_lost(None)
        assert protocol.timeout_keep_alive_task is None

    run(core, test)


def head_and_body(answer: bytes) -> tuple[list[bytes], Any]:
    head, body = answer.split(b"\r\n\r\n", 1)
    return head.split(b"\r\n"), json.loads(body)


def test_a_request_in_pieces_is_answered_as_one(core: Core) -> None:
    async def test(connect: Connect) -> None:
        data = predict()
        whole, whole_transport = connect()
        whole.data_received(data)
        pieces, transport = connect()
        for cut in [(0, 10), (10, 40), (40, len(data) - 7), (len(data) - 7, len(data))]:
            pieces.data_received(data[slice(*cut)])
        await asyncio.sleep(0.05)  # two connections: answered on the next turn of the loop
        assert len(transport.written) == 1
        assert (
            head_and_body(transport.written[0])[1] == head_and_body(whole_transport.written[0])[1]
        )

    run(core, test)


def test_answers_carry_the_servers_current_date(core: Core) -> None:
    async def test(connect: Connect) -> None:
        protocol, transport = connect()
        protocol.data_received(predict())
        head, _ = head_and_body(transport.written[-1])
        assert b"date: Sat, 28 Nov 2026 20:00:00 GMT" in head
        # uvicorn replaces the list once a second
        protocol.server_state.default_headers = [(b"date", b"Sat, 28 Nov 2026 20:00:01 GMT")]
        protocol.data_received(predict())
        head, _ = head_and_body(transport.written[-1])
        assert b"date: Sat, 28 Nov 2026 20:00:01 GMT" in head
        assert b"date: Sat, 28 Nov 2026 20:00:00 GMT" not in head

    run(core, test)


BODY = b'{"inputs": [[0.5, -1.0, 2.0, 0.25]]}'


def raw(head: str, body: bytes = BODY) -> bytes:
    return head.replace("{n}", str(len(body))).replace("\n", "\r\n").encode() + body


PLAIN = "POST /v1/models/m/predict HTTP/1.1\nHost: t\nContent-Length: {n}\n\n"


def test_a_plain_request_is_read_without_the_parser() -> None:
    assert plain_predict(raw(PLAIN), 1 << 20) == (
        "m",
        [(b"host", b"t"), (b"content-length", str(len(BODY)).encode())],
        BODY,
        True,
    )
    head = (
        "POST /v1/models/m/predict HTTP/1.1\nX-Request-ID:  abc \t\nConnection: keep-alive, Close\n"
    )
    model, headers, body, keep_alive = plain_predict(  # type: ignore[misc]
        raw(head + "content-length: {n}\n\n"), 1 << 20
    )
    assert (model, body, keep_alive) == ("m", BODY, False)
    assert (b"x-request-id", b"abc") in headers


@pytest.mark.parametrize(
    "data",
    [
        raw(PLAIN.replace("HTTP/1.1", "HTTP/1.0")),
        raw(PLAIN.replace("POST", "PUT")),
        raw(PLAIN.replace("/predict", "/predict?x=1")),
        raw(PLAIN.replace("/predict", ":predict")),
        raw(PLAIN.replace("/m/", "/M/")),
        raw(PLAIN.replace("POST /", "POST  /")),
        raw("POST /v1/models/m/predict HTTP/1.1\nHost: t\n\n"),  # no length
        raw(PLAIN.replace("Host: t", "Content-Length: {n}")),  # twice
        raw(PLAIN.replace("Content-Length: {n}", "Content-Length: +{n}")),
        raw(PLAIN.replace("Content-Length: {n}", "Content-Length: {n} 0")),
        raw(PLAIN.replace("Host: t", "Transfer-Encoding: chunked")),
        raw(PLAIN.replace("Host: t", "Expect: 100-continue")),
        raw(PLAIN.replace("Host: t", "Upgrade: websocket")),
        raw(PLAIN.replace("Host: t", "Connection: Upgrade")),
        raw(PLAIN.replace("Host: t", "Host: t\n folded")),  # obsolete line folding
        raw(PLAIN.replace("Host: t", "Bad Name: t")),
        raw(PLAIN.replace("Host: t", ": t")),
        raw(PLAIN.replace("Host: t", "Host t")),
        raw(PLAIN.replace("Host: t", "Host: t\x01")),
        raw(PLAIN.replace("Host: t", "Host: t\u00e9")),
        raw(PLAIN).replace(b"Host: t\r\n", b"Host: t\n"),  # a bare line feed
        raw(PLAIN).replace(b"Host: t\r\n", b"Host: t\rX: y\r\n"),  # a bare carriage return
        raw(PLAIN)[:-1],  # the body not all there
        raw(PLAIN) + b"P",  # the next request's first byte
        raw(PLAIN)[:30],  # the head not all there
    ],
)
def test_anything_less_plain_is_left_to_the_parser(data: bytes) -> None:
    assert plain_predict(data, 1 << 20) is None


def test_a_body_over_the_limit_is_left_to_the_parser() -> None:
    assert plain_predict(raw(PLAIN), len(BODY)) is not None
    assert plain_predict(raw(PLAIN), len(BODY) - 1) is None


def test_bytes_inside_a_request_are_never_read_as_a_request(core: Core) -> None:
    """Bytes that arrive in a read of their own and look like a whole predict request are
    still part of the request the parser is reading: here, a header's value and more."""

    async def test(connect: Connect) -> None:
        protocol, transport = connect()
        protocol.data_received(
            b"POST /v1/models/m/predict HTTP/1.1\r\nX-Request-ID: outer\r\nX-Note: "
        )
        protocol.data_received(predict().replace(b"Host: t", b"X-Request-ID: inner"))
        assert len(transport.written) == 1
        head, _ = head_and_body(transport.written[0])
        assert head[0] == b"HTTP/1.1 200 OK"
        assert b"x-request-id: outer" in head  # the first of the outer request's two
        protocol.data_received(predict())  # the next request: read whole again
        assert len(transport.written) == 2
        assert transport.written[-1].startswith(b"HTTP/1.1 200 OK")

    run(core, test)


def test_no_request_is_read_after_one_that_closes_the_connection(core: Core) -> None:
    async def test(connect: Connect) -> None:
        protocol, transport = connect()
        closing = predict().replace(b"Host: t\r\n", b"Host: t\r\nConnection: close\r\n")
        protocol.data_received(closing)
        assert transport.written[-1].startswith(b"HTTP/1.1 200 OK")
        assert b"connection: close" in transport.written[-1]
        assert transport.closed_at is not None
        protocol.data_received(predict())
        assert len(transport.written) == 1

    run(core, test)
