"""Too busy, end to end: predictions queued beyond PROPSERVE_MAX_QUEUED_ROWS are refused with
RESOURCE_EXHAUSTED on gRPC and 429 on REST, at once and without being computed; the others
are answered, and the model serves normally afterwards."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from propserve.clients import AsyncGrpcClient, AsyncRestClient, RetryPolicy
from propserve.v1 import model_service_pb2 as pb
from tests.support.server import ServerProcess, start_server

# A forward pass of 512 rows takes tens of milliseconds: long enough for a burst to queue.
WIDE: dict[str, Any] = {
    "input_dim": 1024,
    "layers": [
        {"units": 2048, "activation": "relu"},
        {"units": 2048, "activation": "relu"},
        {"units": 4, "activation": "identity"},
    ],
    "loss": "mse",
    "optimizer": {"name": "sgd", "lr": 0.01},
    "dtype": "float32",
    "seed": 1,
}
PREDICT = "/propserve.v1.ModelService/Predict"
# With a queue of one row, twelve callers retrying together can collide again; the default
# policy's four attempts usually suffice, these always do.
PATIENT = RetryPolicy(attempts=12, base_delay=0.02, max_delay=0.2)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = start_server(
        tmp_path / "store",
        env={"PROPSERVE_MAX_QUEUED_ROWS": "1", "PROPSERVE_BATCH_ROWS": "512"},
    )
    try:
        # A wide model takes a while to build on a busy machine: no 5 s default here.
        response = httpx.post(
            f"{process.rest_url}/v1/models", json={"name": "w", "spec": WIDE}, timeout=120
        )
        assert response.status_code == 201, response.text
        yield process
    finally:
        assert process.stop() == 0


def grpc_request(rows: int, seed: int) -> bytes:
    x = np.random.default_rng(seed).standard_normal((rows, 1024), dtype=np.float32)
    tensor = pb.Tensor(shape=[rows, 1024], dtype=pb.DTYPE_FLOAT32, data=x.tobytes())
    return pb.PredictRequest(model="w", inputs=tensor).SerializeToString()


async def rest_predict(port: int, seed: int) -> tuple[int, dict[str, Any], bytes]:
    x = np.random.default_rng(seed).standard_normal((1, 1024)).round(4).tolist()
    body = json.dumps({"inputs": x}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/models/w/predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        return int(head.split()[1]), json.loads(await reader.readexactly(length)), head.lower()
    finally:
        writer.close()


def test_a_burst_beyond_the_queue_limit_is_refused_too_busy(server: ServerProcess) -> None:
    async def run() -> tuple[list[Any], list[Any]]:
        async with grpc.aio.insecure_channel(
            server.grpc_target, options=[("grpc.max_send_message_length", 64 << 20)]
        ) as channel:
            predict: Any = channel.unary_unary(PREDICT)
            await predict(grpc_request(1, 0), timeout=30)  # warm up
            for _ in range(20):  # bounded: until the server was seen too busy
                big = asyncio.ensure_future(predict(grpc_request(512, 1), timeout=30))
                await asyncio.sleep(0.005)  # the big pass is running now
                burst: list[Any] = [
                    *(predict(grpc_request(1, 10 + i), timeout=30) for i in range(6)),
                    *(rest_predict(server.rest_port, 20 + i) for i in range(6)),
                ]
                answers: list[Any] = await asyncio.gather(*burst, return_exceptions=True)
                try:
                    await big
                except grpc.aio.AioRpcError as exc:  # a burst's row arrived first: refused
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                if any(isinstance(a, grpc.aio.AioRpcError) for a in answers[:6]) and any(
                    a[0] == 429 for a in answers[6:]
                ):
                    return answers[:6], answers[6:]
            pytest.fail("no burst ever found the queue full on both transports")

    grpc_answers, rest_answers = asyncio.run(run())
    refused_grpc = [a for a in grpc_answers if isinstance(a, grpc.aio.AioRpcError)]
    for failure in refused_grpc:
        assert failure.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "try again later" in (failure.details() or "")
        trailers = tuple(failure.trailing_metadata() or ())
        assert ("retry-after-ms", "100") in trailers
        assert ("error-code", "too_busy") in trailers
    assert all(isinstance(a, bytes) for a in grpc_answers if a not in refused_grpc)
    for status, body, head in rest_answers:
        if status == 429:
            assert body["error"]["code"] == "too_busy"
            assert "are waiting already" in body["error"]["message"]
            assert b"\r\nretry-after: 1\r\n" in head
            assert b"\r\nretry-after-ms: 100\r\n" in head
        else:
            assert status == 200 and len(body["outputs"]) == 1
    # Nothing stays stuck: the model answers normally afterwards.
    response = httpx.post(
        f"{server.rest_url}/v1/models/w/predict", json={"inputs": [[0.5] * 1024]}, timeout=30
    )
    assert response.status_code == 200


def test_the_clients_ride_out_a_busy_server(server: ServerProcess) -> None:
    """The same bursts through the real async clients: refusals are retried after the
    server's hint, so every prediction is answered."""
    x = np.random.default_rng(3).standard_normal((1, 1024)).astype(np.float32)

    async def run() -> list[Any]:
        async with (
            grpc.aio.insecure_channel(
                server.grpc_target, options=[("grpc.max_send_message_length", 64 << 20)]
            ) as channel,
            AsyncGrpcClient(server.grpc_target, retry=PATIENT) as over_grpc,
            AsyncRestClient(server.rest_url, retry=PATIENT) as over_rest,
        ):
            predict: Any = channel.unary_unary(PREDICT)
            answers: list[Any] = []
            for _ in range(3):
                big = asyncio.ensure_future(predict(grpc_request(512, 1), timeout=30))
                await asyncio.sleep(0.005)
                burst = [
                    *(over_grpc.predict("w", x) for _ in range(6)),
                    *(over_rest.predict("w", x) for _ in range(6)),
                ]
                answers += await asyncio.gather(*burst, return_exceptions=True)
                try:
                    await big
                except grpc.aio.AioRpcError as exc:
                    # The pass that fills the queue is sent without retries: when the last
                    # burst's retries are still queued (a slow machine), it is refused too.
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            return answers

    answers = asyncio.run(run())
    failures = [a for a in answers if isinstance(a, BaseException)]
    assert not failures, failures[:3]
    assert all(a.outputs.shape == (1, 4) for a in answers)
    refused = 0.0
    for line in httpx.get(f"{server.rest_url}/metrics").text.splitlines():
        predict = line.startswith("propserve_requests_total{") and 'method="Predict"' in line
        if predict and 'code="too_busy"' in line:
            refused += float(line.split()[-1])
    assert refused >= 1, "the server was never too busy: the retries went untested"
