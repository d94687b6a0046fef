"""Predict through the Open Inference Protocol's own clients, in an environment where
propserve, tritonclient and KServe are installed together (tests/test_ecosystem_install.py).

Run with that environment's Python, one mode per process::

    python -I ecosystem_check.py triton REST_URL GRPC_TARGET OUT
    python -I ecosystem_check.py kserve REST_URL GRPC_TARGET OUT

tritonclient.grpc and KServe each register the protocol's messages as ``inference.*`` in
protobuf's default pool, so one process imports one of them. Each mode also imports
propserve's server-side OIP module, whose messages are ``propserve.oip.*``, beside the
client's. ``triton`` first creates the model with propserve's own REST client and keeps its
``/v1`` prediction.

Each mode writes the inputs and every client's outputs to ``OUT.npz``, and to ``OUT.json``
the files the modules were imported from, the messages protobuf's default pool holds, and
the calls that failed (what they raised, or the answer that was wrong; the other calls still
run, so one failure hides nothing). Calls go out one after another, so each prediction is
answered alone.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

MODEL = "ecosystem"
SPEC: dict[str, Any] = {
    "input_dim": 4,
    "layers": [{"units": 8, "activation": "tanh"}, {"units": 3}],
    "loss": "mse",
    "seed": 7,
}
#: The protocol's request message under each package in protobuf's default pool.
MESSAGES = ("inference.ModelInferRequest", "propserve.oip.ModelInferRequest")
#: The modules each mode imports, whose files the report names.
MODULES = {
    "triton": ("propserve", "propserve.service.grpc.oip", "tritonclient.grpc"),
    "kserve": ("propserve", "propserve.service.grpc.oip", "kserve"),
}
#: The predictions each mode asks for: propserve's own, then one per client and encoding.
PREDICTIONS = {
    "triton": ("v1", "tritonclient.http.json", "tritonclient.http.binary", "tritonclient.grpc"),
    "kserve": ("kserve.rest.json", "kserve.rest.binary", "kserve.grpc"),
}


def inputs() -> NDArray[np.float32]:
    return np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)


class Calls:
    """What each call returned, or why it failed."""

    def __init__(self) -> None:
        self.outputs: dict[str, NDArray[Any]] = {}
        self.errors: dict[str, str] = {}

    def run(self, name: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as exc:
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            return None

    async def wait(self, name: str, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await call()
        except Exception as exc:
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            return None

    def expect(self, name: str, answer: Any, wanted: Any) -> None:
        if name not in self.errors and answer != wanted:
            self.errors[name] = f"answered {answer!r}, not {wanted!r}"

    def keep(self, name: str, output: Callable[[], NDArray[Any]]) -> None:
        array = self.run(name, output)
        if array is not None:
            self.outputs[name] = array


def _predict(client: Any, tensor: Any, wanted: Any) -> NDArray[Any]:
    """A tritonclient prediction (either transport's client) as an array."""
    return np.asarray(client.infer(MODEL, [tensor], outputs=[wanted]).as_numpy("outputs"))


def triton(rest_url: str, grpc_target: str, calls: Calls) -> None:
    import tritonclient.grpc  # noqa: PLC0415
    import tritonclient.http  # noqa: PLC0415

    import propserve.service.grpc.oip  # noqa: F401, PLC0415 - beside tritonclient.grpc
    from propserve.clients import RestClient  # noqa: PLC0415

    x = inputs()
    with RestClient(rest_url) as client:
        client.create_model(MODEL, SPEC)
        calls.outputs["v1"] = client.predict(MODEL, x).outputs

    http = tritonclient.http
    rest = http.InferenceServerClient(url=rest_url.removeprefix("http://"))
    try:
        for name, call in (
            ("tritonclient.http ready", rest.is_server_ready),
            ("tritonclient.http model ready", lambda: rest.is_model_ready(MODEL)),
        ):
            calls.expect(name, calls.run(name, call), True)
        name = "tritonclient.http metadata"
        metadata = calls.run(name, lambda: rest.get_model_metadata(MODEL))
        calls.expect(name, metadata and metadata["inputs"][0]["shape"], [-1, x.shape[1]])
        for encoding in ("json", "binary"):
            binary = encoding == "binary"
            tensor = http.InferInput("inputs", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            wanted = http.InferRequestedOutput("outputs", binary_data=binary)
            calls.keep(f"tritonclient.http.{encoding}", partial(_predict, rest, tensor, wanted))
    finally:
        rest.close()

    grpc = tritonclient.grpc
    channel = grpc.InferenceServerClient(url=grpc_target)
    try:
        for name, call in (
            ("tritonclient.grpc ready", channel.is_server_ready),
            ("tritonclient.grpc model ready", lambda: channel.is_model_ready(MODEL)),
        ):
            calls.expect(name, calls.run(name, call), True)
        name = "tritonclient.grpc metadata"
        metadata = calls.run(name, lambda: channel.get_model_metadata(MODEL))
        calls.expect(name, metadata and list(metadata.inputs[0].shape), [-1, x.shape[1]])
        tensor = grpc.InferInput("inputs", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        wanted = grpc.InferRequestedOutput("outputs")
        calls.keep("tritonclient.grpc", partial(_predict, channel, tensor, wanted))
    finally:
        channel.close()


async def kserve(rest_url: str, grpc_target: str, calls: Calls) -> None:
    from kserve import (  # noqa: PLC0415
        InferenceGRPCClient,
        InferenceRESTClient,
        InferInput,
        InferRequest,
        RESTConfig,
    )

    import propserve.service.grpc.oip  # noqa: F401, PLC0415 - beside KServe

    x = inputs()

    def request(binary: bool) -> Any:
        tensor = InferInput("inputs", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        return InferRequest(model_name=MODEL, infer_inputs=[tensor])

    async with InferenceRESTClient(RESTConfig(protocol="v2")) as rest:
        for name, call in (
            ("kserve.rest ready", lambda: rest.is_server_ready(rest_url)),
            ("kserve.rest model ready", lambda: rest.is_model_ready(rest_url, MODEL)),
        ):
            calls.expect(name, await calls.wait(name, call), True)
        for encoding in ("json", "binary"):
            name = f"kserve.rest.{encoding}"
            call = partial(rest.infer, rest_url, request(encoding == "binary"), model_name=MODEL)
            answer = await calls.wait(name, call)
            if answer is not None:
                calls.keep(name, answer.outputs[0].as_numpy)

    async with InferenceGRPCClient(grpc_target) as channel:
        for name, call in (
            ("kserve.grpc ready", channel.is_server_ready),
            ("kserve.grpc model ready", lambda: channel.is_model_ready(MODEL)),
        ):
            calls.expect(name, await calls.wait(name, call), True)
        answer = await calls.wait("kserve.grpc", lambda: channel.infer(request(True)))
        if answer is not None:
            calls.keep("kserve.grpc", answer.outputs[0].as_numpy)


def pool_messages() -> list[str]:
    """Which of MESSAGES the pool of propserve's OIP messages (protobuf's default) holds."""
    from propserve.oip import open_inference_pb2  # noqa: PLC0415

    pool = open_inference_pb2.DESCRIPTOR.pool
    held = []
    for message in MESSAGES:
        try:
            pool.FindMessageTypeByName(message)
        except KeyError:
            continue
        held.append(message)
    return held


def main(argv: list[str]) -> int:
    mode, rest_url, grpc_target, out = argv
    calls = Calls()
    if mode == "triton":
        triton(rest_url, grpc_target, calls)
    elif mode == "kserve":
        asyncio.run(kserve(rest_url, grpc_target, calls))
    else:
        raise SystemExit(f"unknown mode {mode!r}: triton or kserve")
    arrays: dict[str, Any] = {"inputs": inputs(), **calls.outputs}
    np.savez(Path(out).with_suffix(".npz"), **arrays)
    report = {
        "files": {name: sys.modules[name].__file__ for name in MODULES[mode]},
        "messages": pool_messages(),
        "errors": calls.errors,
    }
    Path(out).with_suffix(".json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
