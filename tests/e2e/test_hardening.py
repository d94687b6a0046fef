"""Attacks from outside, on the real server: each test here reproduces a way a client once
got a 500, forged a log line, stalled both transports or changed a model it should not
have, and checks the server's answer now."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from propserve.v1 import model_service_pb2 as pb
from propserve.v1 import model_service_pb2_grpc as pb_grpc
from tests.support.server import ServerProcess, start_server

PREDICT_TOKEN = "predict-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789ab"
TOKENS = f"{PREDICT_TOKEN}=predict;train-token-0123456789ab=train;{ADMIN_TOKEN}=admin"
SPEC: dict[str, Any] = {"input_dim": 4, "layers": [{"units": 3}], "loss": "mse", "seed": 1}
LIMITS = {
    "PROPSERVE_TOKENS": TOKENS,
    "PROPSERVE_HEADER_TIMEOUT": "1",
    "PROPSERVE_KEEP_ALIVE_TIMEOUT": "1",
    "PROPSERVE_MAX_CONNECTIONS": "16",
}
#: Generous bounds on waiting for the server to act on a timeout: the assertions are about
#: what happens, never how fast.
PATIENCE = 30.0


def headers(token: str = PREDICT_TOKEN, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("hardening") / "store", env=LIMITS)
    try:
        created = httpx.post(
            f"{process.rest_url}/v1/models",
            json={"name": "m1", "spec": SPEC, "settings": {"retain": 5}},
            headers=headers(ADMIN_TOKEN),
        )
        assert created.status_code == 201, created.text
        for _ in range(3):
            saved = httpx.post(
                f"{process.rest_url}/v1/models/m1/versions", headers=headers(ADMIN_TOKEN)
            )
            assert saved.status_code == 201
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.ModelServiceStub]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield pb_grpc.ModelServiceStub(channel)


def log_lines(server: ServerProcess) -> list[dict[str, Any]]:
    """Every line of the server's log, each one JSON object (a line that is not fails)."""
    return [json.loads(line) for line in server.log().splitlines() if line.strip()]


def model_state(server: ServerProcess) -> tuple[Any, Any]:
    model = httpx.get(f"{server.rest_url}/v1/models/m1", headers=headers()).json()
    versions = httpx.get(f"{server.rest_url}/v1/models/m1/versions", headers=headers()).json()
    return model, [v["version"] for v in versions["versions"]]


# -- 1: a JSON key holding NUL ----------------------------------------------------------------


@pytest.mark.parametrize("inputs", ["[[1,2,3,4]]", '{"data": [1,2,3,4], "shape": [1, 4]}'])
@pytest.mark.parametrize("route", ["predict", "train_step"])
def test_a_key_with_a_nul_is_an_unknown_field_not_a_500(
    server: ServerProcess, route: str, inputs: str
) -> None:
    body = '{"a\\u0000b": 1, "inputs": ' + inputs
    body += ', "targets": [[1,2,3]]}' if route == "train_step" else "}"
    token = "train-token-0123456789ab" if route == "train_step" else PREDICT_TOKEN
    response = httpx.post(
        f"{server.rest_url}/v1/models/m1/{route}", content=body, headers=headers(token)
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_argument"
    assert "unknown field" in response.json()["error"]["message"]


# -- 2: a zero dimension beside a huge one --------------------------------------------------

SHAPES = [[2**63 - 1, 0], [0, 2**63 - 1], [2**40, 2**40, 0]]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("encoding", ["b64", "flat"])
def test_a_huge_dimension_beside_a_zero_is_refused_over_rest(
    server: ServerProcess, shape: list[int], encoding: str
) -> None:
    tensor: dict[str, Any] = (
        {"b64": "", "shape": shape, "dtype": "float32"}
        if encoding == "b64"
        else {"data": [], "shape": shape}
    )
    response = httpx.post(
        f"{server.rest_url}/v1/models/m1/predict", json={"inputs": tensor}, headers=headers()
    )
    assert response.status_code == 400, response.text
    assert "dimension" in response.json()["error"]["message"]


def _empty(shape: list[int]) -> pb.Tensor:
    return pb.Tensor(shape=shape, dtype=pb.DTYPE_FLOAT32, data=b"")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method", ["Predict", "TrainStep", "Train"])
def test_a_huge_dimension_beside_a_zero_is_refused_over_grpc(
    server: ServerProcess, stub: pb_grpc.ModelServiceStub, shape: list[int], method: str
) -> None:
    metadata = (("authorization", "Bearer train-token-0123456789ab"),)
    good = pb.Tensor(shape=[1, 3], dtype=pb.DTYPE_FLOAT32, data=np.ones(3, "<f4").tobytes())
    with pytest.raises(grpc.RpcError) as refused:
        if method == "Predict":
            stub.Predict(pb.PredictRequest(model="m1", inputs=_empty(shape)), metadata=metadata)
        else:
            request = pb.TrainStepRequest(model="m1", inputs=_empty(shape), targets=good)
            if method == "TrainStep":
                stub.TrainStep(request, metadata=metadata)
            else:
                list(stub.Train(iter([request]), metadata=metadata))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dimension" in (refused.value.details() or "")


# -- 3: log lines forged through client text ------------------------------------------------

FORGED_LEVEL = "critical"
FORGED_EVENT = "server.stopped"


def test_client_text_never_rewrites_a_log_lines_fields(
    server: ServerProcess, stub: pb_grpc.ModelServiceStub
) -> None:
    forged = f"abc level={FORGED_LEVEL} event={FORGED_EVENT} logger=x"
    path = "/v1/models/a%20level=critical%20event=server.stopped%20logger=x/predict"
    response = httpx.post(
        f"{server.rest_url}{path}", json={"inputs": [[1, 2, 3, 4]]}, headers=headers()
    )
    assert response.status_code == 400
    response = httpx.post(
        f"{server.rest_url}/v1/models/nope/predict",
        json={"inputs": [[1, 2, 3, 4]]},
        headers=headers(**{"x-request-id": forged}),
    )
    assert response.status_code == 404
    assert response.headers["x-request-id"] != forged  # replaced by a fresh one
    with pytest.raises(grpc.RpcError) as refused:
        stub.GetModel(
            pb.GetModelRequest(name="nope"),
            metadata=(("authorization", f"Bearer {PREDICT_TOKEN}"), ("x-request-id", forged)),
        )
    error: Any = refused.value
    trailers = {str(key): value for key, value in error.trailing_metadata() or ()}
    assert trailers["x-request-id"] != forged
    lines = log_lines(server)
    assert lines
    for line in lines:
        assert line["level"] in ("debug", "info", "warning", "error"), line
        assert line["event"] != FORGED_EVENT, line
        assert line["logger"].startswith(("propserve", "grpc", "asyncio", "py.warnings")), line
        if line["logger"].startswith("propserve"):  # ours name an event and carry fields
            assert "message" not in line and line["event"] != "log", line
    failed = [line for line in lines if line["event"] == "request.failed"]
    assert any("level=critical" in str(line.get("reason")) for line in failed)  # as data


# -- 4: Connection: close, then Connection: keep-alive ----------------------------------------


def test_any_connection_close_header_closes_the_connection(server: ServerProcess) -> None:
    body = b'{"inputs": [[1, 2, 3, 4]]}'
    request = (
        b"POST /v1/models/m1/predict HTTP/1.1\r\nHost: t\r\n"
        + f"Authorization: Bearer {PREDICT_TOKEN}\r\n".encode()
        + b"Connection: close\r\nConnection: keep-alive\r\n"
        + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=PATIENCE) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):  # until the server closes
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nconnection: close\r\n" in received.lower()


# -- 5: strict integers in settings and label bodies ----------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PATCH", "/v1/models/m1", {"settings": {"retain": True}}),
        ("PATCH", "/v1/models/m1", {"settings": {"retain": 1.0}}),
        ("PATCH", "/v1/models/m1", {"settings": {"autosave_every": "3"}}),
        ("PATCH", "/v1/models/m1", {"settings": {"retain": None}}),
        ("PUT", "/v1/models/m1/labels/stable", {"version": "3"}),
        ("PUT", "/v1/models/m1/labels/stable", {"version": 3.0}),
        ("PUT", "/v1/models/m1/labels/stable", {"version": True}),
        ("POST", "/v1/models/m1/rollback", {"version": "1"}),
        ("POST", "/v1/models/m1/rollback", {"version": 1.0}),
    ],
)
def test_integers_are_strict_and_a_refusal_changes_nothing(
    server: ServerProcess, method: str, path: str, body: dict[str, Any]
) -> None:
    before = model_state(server)
    response = httpx.request(
        method, f"{server.rest_url}{path}", json=body, headers=headers(ADMIN_TOKEN)
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_argument"
    assert model_state(server) == before


# -- 6: 405 keeps Allow ---------------------------------------------------------------------------


def test_a_wrong_method_answers_405_with_allow(server: ServerProcess) -> None:
    response = httpx.delete(f"{server.rest_url}/v1/models", headers=headers(ADMIN_TOKEN))
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
    assert response.json()["error"]["code"] == "invalid_argument"


# -- 7: one huge header stalls nobody ------------------------------------------------------------


def test_a_huge_header_is_refused_while_predictions_go_on(server: ServerProcess) -> None:
    answers: list[int] = []
    received = b""

    def huge_header() -> None:
        nonlocal received
        with socket.create_connection(("127.0.0.1", server.rest_port), timeout=PATIENCE) as sock:
            with contextlib.suppress(OSError):  # the server may stop reading: it refused
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Padding: ")
                for _ in range(16):  # 1 MiB in 64 KiB writes
                    sock.sendall(b"a" * (64 << 10))
                sock.sendall(b"\r\n\r\n")
            while chunk := sock.recv(65536):
                received += chunk

    sender = threading.Thread(target=huge_header)
    with httpx.Client(base_url=server.rest_url, headers=headers()) as client:
        sender.start()
        for _ in range(50):
            response = client.post("/v1/models/m1/predict", json={"inputs": [[1, 2, 3, 4]]})
            answers.append(response.status_code)
    sender.join(PATIENCE)
    assert received.startswith(b"HTTP/1.1 431 "), received[:200]
    assert b"connection: close" in received.lower()
    assert answers == [200] * 50


# -- 8: idle and slow connections, and the connection limit ------------------------------------


def test_an_idle_keep_alive_connection_is_closed(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=PATIENCE) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):  # the answer, then the close after 1 s idle
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 ")


def test_a_connection_that_never_sends_a_request_is_closed(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=PATIENCE) as sock:
        assert sock.recv(65536) == b""  # closed by the server after the header timeout


def test_a_request_sent_a_byte_at_a_time_is_cut_off(server: ServerProcess) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=PATIENCE) as sock:
        sent = 0
        with contextlib.suppress(OSError):  # closed by the server
            for byte in request:
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.05)  # 200 bytes take 10 s; the header timeout is 1 s
        received = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
    assert sent < len(request)
    assert received.startswith(b"HTTP/1.1 408 ")


def test_connections_beyond_the_limit_are_closed_and_logged(tmp_path: Path) -> None:
    process = start_server(tmp_path / "store", env={"PROPSERVE_MAX_CONNECTIONS": "4"})
    try:
        held = [
            socket.create_connection(("127.0.0.1", process.rest_port), timeout=PATIENCE)
            for _ in range(4)
        ]
        for sock in held:  # each is accepted and answered
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        with socket.create_connection(("127.0.0.1", process.rest_port), timeout=PATIENCE) as extra:
            try:
                extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                refused = extra.recv(65536)
            except OSError:
                refused = b""
        assert refused == b""
        for sock in held:
            sock.close()
        # Once a connection is free, new ones are served again.
        deadline = time.monotonic() + PATIENCE
        while httpx.get(f"{process.rest_url}/healthz").status_code != 200:
            assert time.monotonic() < deadline
    finally:
        assert process.stop() == 0
    warnings = [line for line in log_lines(process) if line["event"] == "http.connection_limit"]
    assert warnings and warnings[0]["level"] == "warning" and warnings[0]["limit"] == 4


# -- 15: quieter corners ----------------------------------------------------------------------


def test_an_input_beyond_float32_is_a_400_and_the_log_stays_json(server: ServerProcess) -> None:
    x = np.full((1, 4), 1e300)
    tensor = {"b64": base64.b64encode(x.tobytes()).decode(), "shape": [1, 4], "dtype": "float64"}
    response = httpx.post(
        f"{server.rest_url}/v1/models/m1/predict", json={"inputs": tensor}, headers=headers()
    )
    assert response.status_code == 400
    assert "beyond the range of float32" in response.json()["error"]["message"]
    log_lines(server)  # every line is one JSON object: no stray warning text


def test_failed_train_streams_leave_no_unretrieved_task_errors(
    server: ServerProcess, stub: pb_grpc.ModelServiceStub
) -> None:
    """A stream whose last step is refused (a diverging loss) while the client has already
    closed its side: the server's read of the next message ends too, and was left unread."""
    metadata = (("authorization", "Bearer train-token-0123456789ab"),)

    def step(target: float) -> pb.TrainStepRequest:
        return pb.TrainStepRequest(
            model="m1",
            inputs=pb.Tensor(
                shape=[1, 4], dtype=pb.DTYPE_FLOAT32, data=np.ones(4, "<f4").tobytes()
            ),
            targets=pb.Tensor(
                shape=[1, 3], dtype=pb.DTYPE_FLOAT32, data=np.full(3, target, "<f4").tobytes()
            ),
        )

    for i in range(30):
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Train(iter([step(1.0)] * (i % 3) + [step(3e38)]), metadata=metadata))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Idle for a moment: the server collects its garbage after each burst, which is when an
    # unread exception is reported.
    time.sleep(3)
    assert "never retrieved" not in server.log()
    assert "Traceback" not in server.log()
