"""Benchmark of the server's REST path for single-row predictions, in process: the real
HTTP server (service/rest/http.py), predict endpoint, data plane, core and engine, fed a
request's bytes on stand-in transports, from the bytes in to the answer's bytes out. No
sockets, no client: what is left is the server's own work per request.

    .venv/bin/python bench/rest_path.py            # a table
    .venv/bin/python bench/rest_path.py --json     # one JSON object per case

Cases: model A=[784,512,256,10] and a tiny model (784 inputs, 2 outputs); the row sent to
``/v1/models/{m}/predict`` as nested JSON numbers (``json``), as base64 (``b64``) or as flat
numbers with a shape (``flat``), and to the Open Inference Protocol's ``/v2/models/{m}/infer``
as binary tensor data (``oip-bin``, outputs asked as binary), as flat JSON numbers
(``oip-json``) or as nested ones (``oip-nested``); one request at a time, or 8 arriving
together on 8 connections (they share a forward pass). Baseline: the engine's forward pass of
the same row alone, measured in the same run; "stack" is the time per request minus that
forward pass. One BLAS thread, as the server runs. Medians of interleaved blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SPEC_A, machine
from bench.payloads import infer_path, make_oip_payloads, make_payloads, predict_path, rows_of

#: 784 inputs like model A, 2 outputs: what a request costs besides a real forward pass.
SPEC_TINY: dict[str, Any] = {**SPEC_A, "layers": [{"units": 2, "activation": "softmax"}]}
MODELS = {"A": SPEC_A, "tiny": SPEC_TINY}


#: The bodies' kinds: propserve's own (/v1), then the Open Inference Protocol's (/v2).
KINDS = ("b64", "json", "flat", "oip-bin", "oip-json", "oip-nested")


def bodies() -> dict[str, tuple[bool, bytes, dict[str, str]]]:
    """A single-row body of each kind, the row the same: (OIP?, body, headers besides)."""
    own, oip = make_payloads("a", 1), make_oip_payloads("a", 1)
    return {
        "b64": (False, own.rest_b64, {}),
        "json": (False, own.rest, {}),
        "flat": (False, oip.v1_flat, {}),
        "oip-bin": (True, oip.binary, oip.binary_header),
        "oip-json": (True, oip.rest, {}),
        "oip-nested": (True, oip.rest_nested, {}),
    }


def request(model: str, oip: bool, body: bytes, headers: dict[str, str]) -> bytes:
    path = infer_path(model) if oip else predict_path(model)
    fields = {"Content-Type": "application/json", **headers}
    lines = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n{lines}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Transport(asyncio.Transport):
    """Stands in for a socket: keeps the last answer and wakes whoever waits for one."""

    def __init__(self) -> None:
        super().__init__()
        self.last = b""
        self.waiter: asyncio.Future[None] | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.last = bytes(data)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


async def measure(rounds: int, block: int) -> list[dict[str, Any]]:
    from propserve.engine import forward  # noqa: PLC0415
    from propserve.service.auth import Authenticator  # noqa: PLC0415
    from propserve.service.config import Settings  # noqa: PLC0415
    from propserve.service.dataplane import DataPlane  # noqa: PLC0415
    from propserve.service.metrics import Metrics  # noqa: PLC0415
    from propserve.service.models import Models  # noqa: PLC0415
    from propserve.service.rest import http  # noqa: PLC0415
    from propserve.service.rest.app import RestApp  # noqa: PLC0415
    from propserve.service.store import ModelStore  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory(prefix="propserve-rest-path-") as store:
        settings = Settings(store=Path(store), tune_heap=False)
        metrics = Metrics()
        models = Models(ModelStore(settings.store), settings, metrics)
        for name, spec in MODELS.items():
            models.create_model(name.lower(), spec)
        plane = DataPlane(models, Authenticator({}), metrics, settings)
        app = RestApp(plane, metrics, ready=lambda: True, version="bench")
        server = http.HttpServer(app, http.Limits(max_body_bytes=settings.max_message_bytes))

        def connect() -> tuple[Any, Transport]:
            protocol = http.Connection(server)
            transport = Transport()
            protocol.connection_made(transport)
            return protocol, transport

        connections = [connect() for _ in range(8)]
        payloads = bodies()
        x = rows_of(1)

        async def run(model: str, kind: str, together: int, n: int) -> float:
            data = request(model.lower(), *payloads[kind])
            start = time.perf_counter()
            for _ in range(n // together):
                for protocol, transport in connections[:together]:
                    transport.waiter = loop.create_future()
                    protocol.data_received(data)
                for _, transport in connections[:together]:
                    assert transport.waiter is not None
                    await transport.waiter
            elapsed = (time.perf_counter() - start) / (n // together * together)
            for _, transport in connections[:together]:
                if not transport.last.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"unexpected answer: {transport.last[:200]!r}")
            return elapsed

        def forward_alone(model: str, n: int) -> float:
            network = models._models[model.lower()].head
            start = time.perf_counter()
            for _ in range(n):
                forward(network.spec, network.params, x)
            return (time.perf_counter() - start) / n

        cases = [
            (model, kind, together) for model in MODELS for kind in KINDS for together in (1, 8)
        ]
        samples: dict[Any, list[float]] = {case: [] for case in cases}
        forwards: dict[str, list[float]] = {m: [] for m in MODELS}
        for case in cases:  # warm-up
            await run(*case, block)
        for _ in range(rounds):
            for case in cases:
                samples[case].append(await run(*case, block))
            for model in MODELS:
                forwards[model].append(forward_alone(model, block))
        plane.close()
        models.close()

    results = []
    for (model, kind, together), times in samples.items():
        path = statistics.median(times)
        fwd = statistics.median(forwards[model])
        results.append(
            {
                "model": model,
                "body": kind,
                "together": together,
                "path_s": path,
                "forward_s": fwd,
                "stack_s": path - fwd,
                "ratio": path / fwd,
            }
        )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved blocks per case")
    parser.add_argument("--block", type=int, default=400, help="requests per block")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    import uvloop  # noqa: PLC0415
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    limiter = threadpool_limits(1, user_api="blas")
    info = machine()
    results = uvloop.run(measure(args.rounds, args.block))
    del limiter
    if args.json:
        for r in results:
            print(json.dumps({**r, "machine": info}))
        return
    print(f"cpu: {info['cpu']}; cores {info['cores']}; python {info['python']}, ", end="")
    print(f"numpy {info['numpy']}; one BLAS thread; medians of interleaved blocks")
    print("baseline: the engine's forward pass of the same row alone; stack = path - forward")
    header = (
        f"{'model':<5} {'body':<10} {'together':>8} {'us/request':>11} {'forward us':>11} "
        f"{'stack us':>9} {'path/forward':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['model']:<5} {r['body']:<10} {r['together']:>8} {r['path_s'] * 1e6:>11.1f} "
            f"{r['forward_s'] * 1e6:>11.1f} {r['stack_s'] * 1e6:>9.1f} {r['ratio']:>13.2f}"
        )


if __name__ == "__main__":
    main()
