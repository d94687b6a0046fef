"""What the client tests share: the four kinds of client, driven the same way, and a few
specs and batches."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from propserve.clients import (
    AsyncGrpcClient,
    AsyncRestClient,
    GrpcClient,
    RestClient,
)
from tests.support.server import ServerProcess

KINDS = ["grpc", "rest", "async-grpc", "async-rest"]
WAIT = 20.0

SPECS: dict[str, dict[str, Any]] = {
    "f32-softmax-adam": {
        "input_dim": 5,
        "layers": [{"units": 12, "activation": "relu"}, {"units": 3, "activation": "softmax"}],
        "loss": "softmax_cross_entropy",
        "optimizer": {"name": "adam", "lr": 0.01},
        "seed": 1,
    },
    "f64-mse-sgd": {
        "input_dim": 5,
        "layers": [{"units": 7, "activation": "tanh"}, {"units": 2}],
        "loss": "mse",
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "dtype": "float64",
        "seed": 2,
    },
}


class SyncOf:
    """An async client driven from blocking code on its own event loop, so that one scenario
    runs on all four clients."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._loop = asyncio.new_event_loop()

        async def build() -> Any:
            return make()  # inside the running loop, as grpc.aio channels want

        self.client = self._loop.run_until_complete(build())

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._loop.run_until_complete(method(*args, **kwargs))

        return call

    def __enter__(self) -> SyncOf:
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.run_until_complete(self.client.__aexit__(None, None, None))
        self._loop.close()


def connect(kind: str, process: ServerProcess | tuple[str, str], **options: Any) -> Any:
    """A client of ``kind`` for a server (or a (grpc_target, rest_url) pair)."""
    target, url = (
        (process.grpc_target, process.rest_url) if isinstance(process, ServerProcess) else process
    )
    options.setdefault("timeout", WAIT)
    if kind == "grpc":
        return GrpcClient(target, **options)
    if kind == "rest":
        return RestClient(url, **options)
    if kind == "rest-json":  # tensors as numbers written out, not base64
        return RestClient(url, tensor_encoding="json", **options)
    if kind == "async-grpc":
        return SyncOf(lambda: AsyncGrpcClient(target, **options))
    return SyncOf(lambda: AsyncRestClient(url, **options))


def batches_for(spec: dict[str, Any], count: int, seed: int) -> list[tuple[NDArray[Any], Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = rng.standard_normal((6, spec["input_dim"])).astype(spec.get("dtype", "float32"))
        n_out = spec["layers"][-1]["units"]
        if spec["loss"] == "mse":
            y: Any = rng.standard_normal((6, n_out)).astype(spec.get("dtype", "float32"))
        else:
            y = rng.integers(0, n_out, size=6).astype(np.int64)
        out.append((x, y))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
