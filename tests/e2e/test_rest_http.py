"""The REST server's HTTP/1.1 (service.rest.http), over raw sockets to the real server:
framing, keep-alive, pipelining, request variants, and the limits that keep one client from
stalling the others (header size and time, idle connections, the connection limit)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from propserve.engine import ModelSpec, Network
from tests.support.server import ServerProcess, start_server

SPEC: dict[str, Any] = {
    "input_dim": 4,
    "layers": [
        {"units": 8, "activation": "relu"},
        {"units": 3, "activation": "softmax"},
    ],
    "loss": "softmax_cross_entropy",
    "optimizer": {"name": "sgd", "lr": 0.1},
    "dtype": "float32",
    "seed": 5,
}
X = [[0.5, -1.0, 2.0, 0.25], [1.5, 0.0, -0.5, 3.0]]
TOKENS = "predict-token-0123456789=predict;admin-token-0123456789=admin"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("hot")
    process = start_server(root / "store", env={"PROPSERVE_TOKENS": TOKENS})
    try:
        admin = {"authorization": "Bearer admin-token-0123456789"}
        response = httpx.post(
            f"{process.rest_url}/v1/models", json={"name": "h", "spec": SPEC}, headers=admin
        )
        assert response.status_code == 201, response.text
        yield process
    finally:
        process.stop()


def expected_outputs() -> np.ndarray[Any, Any]:
    return Network(ModelSpec.from_dict(SPEC)).forward(np.asarray(X, dtype=np.float32))


def request(
    path: str = "/v1/models/h/predict",
    body: bytes | None = None,
    *,
    token: str | None = "predict-token-0123456789",
    extra: str = "",
    version: str = "1.1",
) -> bytes:
    body = json.dumps({"inputs": X}).encode() if body is None else body
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST {path} HTTP/{version}\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"{auth}{extra}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def read_responses(sock: socket.socket, count: int, buffer: bytes = b"") -> list[Response]:
    """``count`` HTTP/1.1 responses (content-length or chunked framing) from ``sock``, after
    the bytes already read into ``buffer``."""
    responses: list[Response] = []

    def fill() -> None:
        nonlocal buffer
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the responses were complete")
        buffer += data

    while len(responses) < count:
        while b"\r\n\r\n" not in buffer:
            fill()
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(buffer) < length:
                fill()
            body, buffer = buffer[:length], buffer[length:]
        else:
            assert headers.get("transfer-encoding") == "chunked", headers
            body = b""
            while True:
                while b"\r\n" not in buffer:
                    fill()
                size_line, buffer = buffer.split(b"\r\n", 1)
                size = int(size_line, 16)
                while len(buffer) < size + 2:
                    fill()
                body += buffer[:size]
                buffer = buffer[size + 2 :]
                if size == 0:
                    break
        responses.append(Response(int(status_line.split()[1]), headers, body))
    assert buffer == b"", "unexpected bytes after the responses"
    return responses


def connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.rest_port), timeout=20)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def assert_prediction(response: Response) -> None:
    assert response.status == 200, response.body
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"model", "outputs", "dtype", "version", "step"}
    assert body["model"] == "h" and body["dtype"] == "float32"
    assert body["version"] is None and body["step"] == 0
    got = np.asarray(body["outputs"], dtype=np.float32)
    assert np.array_equal(got, expected_outputs())


def test_keep_alive_answers_each_request_on_one_connection(server: ServerProcess) -> None:
    with connect(server) as sock:
        for i in range(3):
            sock.sendall(request(extra=f"X-Request-Id: hot-{i}\r\n"))
            (response,) = read_responses(sock, 1)
            assert_prediction(response)
            assert response.headers["x-request-id"] == f"hot-{i}"
            assert "connection" not in response.headers
            assert "date" in response.headers


def test_pipelined_requests_are_answered_in_order(server: ServerProcess) -> None:
    """A predict, a request the framework answers, and another predict, in one write: three
    answers, in the order asked."""

    health = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(
            request(extra="X-Request-Id: first\r\n")
            + health
            + request(extra="X-Request-Id: third\r\n")
        )
        first, second, third = read_responses(sock, 3)
    assert_prediction(first)
    assert first.headers["x-request-id"] == "first"
    assert second.status == 200 and second.json() == {"status": "ok"}
    assert_prediction(third)
    assert third.headers["x-request-id"] == "third"


def test_connection_close_is_honoured(server: ServerProcess) -> None:
    with connect(server) as sock:
        sock.sendall(request(extra="Connection: close\r\n"))
        (response,) = read_responses(sock, 1)
        assert_prediction(response)
        assert response.headers["connection"] == "close"
        assert sock.recv(1) == b""  # the server closed the connection


@pytest.mark.parametrize(
    "variant",
    ["chunked", "query-string", "http-1.0", "expect-100"],
)
def test_request_variants_answer_the_same(server: ServerProcess, variant: str) -> None:
    body = json.dumps({"inputs": X}).encode()
    with connect(server) as sock:
        if variant == "chunked":
            sock.sendall(
                b"POST /v1/models/h/predict HTTP/1.1\r\nHost: test\r\n"
                b"Authorization: Bearer predict-token-0123456789\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n0\r\n\r\n"
                % (len(body), body)
            )
        elif variant == "query-string":
            sock.sendall(request("/v1/models/h/predict?trace=1"))
        elif variant == "http-1.0":
            sock.sendall(request(version="1.0"))
        else:  # the head alone; the body follows the server's interim answer
            whole = request(extra="Expect: 100-continue\r\n")
            head, _, content = whole.partition(b"\r\n\r\n")
            sock.sendall(head + b"\r\n\r\n")
            interim, early = b"HTTP/1.1 100 Continue\r\n\r\n", b""
            while len(early) < len(interim):
                data = sock.recv(65536)
                assert data, "closed before the interim answer"
                early += data
            assert early == interim, early
            sock.sendall(content)
        (response,) = read_responses(sock, 1)
    assert_prediction(response)
    assert len(response.headers["x-request-id"]) == 16


@pytest.mark.parametrize(
    ("token", "status", "code"),
    [(None, 401, "unauthenticated"), ("wrong-token-0123456789", 401, "unauthenticated")],
)
def test_tokens_are_checked_on_the_hot_path(
    server: ServerProcess, token: str | None, status: int, code: str
) -> None:
    with connect(server) as sock:
        sock.sendall(request(token=token))
        (response,) = read_responses(sock, 1)
    assert response.status == status
    assert response.json()["error"]["code"] == code


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"inputs": [[1, 2]]}', 400, "features"),
        (b'{"inputs": [[1, 2, 3, "x"]]}', 400, "numbers"),
        (b'{"inputs": [[1, 2, 3, NaN]]}', 400, "not valid JSON"),
        (b'{"inputs": [[1e400, 2, 3, 4]]}', 400, ""),
        (b'{"inputs": [[1, 2, 3, 4]], "version": 7}', 404, "version"),
        (b'{"inputs": [[1, 2, 3, 4]], "label": "nope"}', 404, "nope"),
        (b'{"inputs": [[1, 2, 3, 4]], "extra": 1}', 400, "unknown field"),
        (b"", 400, "not valid JSON"),
    ],
)
def test_bad_bodies_answer_the_error_table(
    server: ServerProcess, body: bytes, status: int, fragment: str
) -> None:
    with connect(server) as sock:
        sock.sendall(request(body=body))
        (response,) = read_responses(sock, 1)
        assert response.status == status, response.body
        error = response.json()["error"]
        assert fragment in error["message"]
        # The connection stays usable after an error.
        sock.sendall(request())
        (after,) = read_responses(sock, 1)
    assert_prediction(after)


def test_unknown_model_on_the_hot_path(server: ServerProcess) -> None:
    with connect(server) as sock:
        sock.sendall(request("/v1/models/missing/predict"))
        (response,) = read_responses(sock, 1)
    assert response.status == 404
    assert response.json()["error"] == {
        "code": "not_found",
        "message": "model 'missing' not found",
    }


def test_concurrent_predictions_share_forward_passes_and_each_gets_its_own_rows(
    server: ServerProcess,
) -> None:
    """64 connections each asking for different rows at once: every answer is the engine's
    outputs for its own rows (to float32 rounding: shared passes may round differently), and
    the batch-size metric shows passes over more than one request."""
    rng = np.random.default_rng(11)
    inputs = [rng.standard_normal((1 + i % 3, 4)).astype(np.float32) for i in range(64)]
    network = Network(ModelSpec.from_dict(SPEC))

    async def ask(x: np.ndarray[Any, Any]) -> Any:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.rest_port)
        try:
            for _ in range(20):
                writer.write(request(body=json.dumps({"inputs": x.tolist()}).encode()))
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                )
                answer = json.loads(await reader.readexactly(length))
            return answer
        finally:
            writer.close()

    async def run() -> list[Any]:
        return list(await asyncio.wait_for(asyncio.gather(*(ask(x) for x in inputs)), 60))

    answers = asyncio.run(run())
    for x, answer in zip(inputs, answers, strict=True):
        got = np.asarray(answer["outputs"], dtype=np.float32)
        np.testing.assert_allclose(got, network.forward(x), rtol=1e-5, atol=1e-7)
    metrics = httpx.get(f"{server.rest_url}/metrics").text
    count = sum_ = 0.0
    for line in metrics.splitlines():
        if line.startswith('propserve_predict_batch_rows_count{model="h"}'):
            count = float(line.split()[-1])
        elif line.startswith('propserve_predict_batch_rows_sum{model="h"}'):
            sum_ = float(line.split()[-1])
    requests = sum(len(x) for x in inputs) * 20
    assert sum_ >= requests
    assert count < 64 * 20, "no two concurrent predictions ever shared a forward pass"


def test_predict_requests_are_counted_in_the_metrics(server: ServerProcess) -> None:
    def predicted_ok() -> float:
        text = httpx.get(f"{server.rest_url}/metrics").text
        for line in text.splitlines():
            wanted = ('method="Predict"', 'transport="rest"', 'code="ok"')
            if line.startswith("propserve_requests_total{") and all(w in line for w in wanted):
                return float(line.split()[-1])
        return 0.0

    before = predicted_ok()
    with connect(server) as sock:
        for _ in range(5):
            sock.sendall(request())
            read_responses(sock, 1)
    assert predicted_ok() == before + 5


def test_a_large_body_goes_through_admission_control(tmp_path: Path) -> None:
    """A body over the admission threshold is answered, and one over the body limit is
    refused 413 from its Content-Length."""
    process = start_server(tmp_path / "store", env={"PROPSERVE_MAX_MESSAGE_BYTES": str(1 << 20)})
    try:
        assert (
            httpx.post(
                f"{process.rest_url}/v1/models", json={"name": "h", "spec": SPEC}
            ).status_code
            == 201
        )
        rows = np.random.default_rng(1).standard_normal((12000, 4)).round(6).tolist()
        body = json.dumps({"inputs": rows}).encode()
        assert 256 << 10 < len(body) < 1 << 20
        response = httpx.post(f"{process.rest_url}/v1/models/h/predict", content=body)
        assert response.status_code == 200
        assert len(response.json()["outputs"]) == 12000
        too_big = json.dumps({"inputs": rows * 3}).encode()
        refused = httpx.post(f"{process.rest_url}/v1/models/h/predict", content=too_big)
        assert refused.status_code == 413
        assert refused.json()["error"]["code"] == "resource_exhausted"
    finally:
        assert process.stop() == 0


def test_a_malformed_request_is_a_400_and_the_connection_closes(server: ServerProcess) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 400 ")
    body = json.loads(received.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "invalid_argument"


def test_a_head_request_has_the_headers_and_no_body(server: ServerProcess) -> None:
    with connect(server) as sock:
        sock.sendall(
            b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        received = b""
        while received.count(b"HTTP/1.1 ") < 2 or not received.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    head, rest = received.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 405 ") or head.startswith(b"HTTP/1.1 200 ")
    assert rest.startswith(b"HTTP/1.1 200 ")  # the next answer follows the head at once


def test_a_pipelined_request_over_the_body_limit_is_refused_in_its_turn(tmp_path: Path) -> None:
    process = start_server(tmp_path / "store", env={"PROPSERVE_MAX_MESSAGE_BYTES": "2048"})
    try:
        big = b"x" * 4096
        with socket.create_connection(("127.0.0.1", process.rest_port), timeout=20) as sock:
            sock.sendall(
                b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
                b"POST /v1/models HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                % (len(big), big)
            )
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
    finally:
        assert process.stop() == 0
    first, second = received.split(b"HTTP/1.1 ", 2)[1:]
    assert first.startswith(b"200 ")
    assert second.startswith(b"413 ")
    assert b"exceeds the limit of 2,048" in second


def test_a_slow_request_pipelined_behind_an_answer_ends_the_connection_after_it(
    tmp_path: Path,
) -> None:
    """A second request whose headers never complete, behind a first still being answered:
    the first's answer is written whole, then the connection closes."""
    process = start_server(tmp_path / "store", env={"PROPSERVE_HEADER_TIMEOUT": "1"})
    try:
        with socket.create_connection(("127.0.0.1", process.rest_port), timeout=30) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /healthz HTTP/1.1\r\nHo")
            received = b""
            while chunk := sock.recv(65536):  # the first answer, then the close
                received += chunk
    finally:
        assert process.stop() == 0
    assert received.startswith(b"HTTP/1.1 200 ")
    assert received.count(b"HTTP/1.1 ") == 1 or b"HTTP/1.1 408 " in received
