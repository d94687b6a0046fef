"""KServe's Python clients against a running propserve, in a process of their own.

KServe and tritonclient each register their own ``inference.*`` messages in protobuf's
default pool, so the two cannot be imported into one process. The test suite imports
tritonclient, so tests/oip/test_kserve_clients.py runs this script as a child process:

    python tests/oip/kserve_check.py < plan.json > results.json

The plan names the server (``rest_url``, ``grpc_target``), the input rows (``inputs``: base64
of little-endian float32 bytes, with their ``shape``), the predictions to ask for (``infer``:
``{"model", "version"}``, the version ``""`` for the server's choice), the models whose
readiness to ask (``ready``) and a model the server does not have (``unknown``). The results
say what each client call returned or raised, outputs as base64 of their little-endian bytes
so the test compares them bit for bit with propserve's own predictions. A call that raises is
recorded (its type and message) and the others still run, so one failure hides nothing.

Each call goes out on its own, after the previous one is answered, so each prediction is
answered alone, as the test's own predictions are.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from kserve import (
    InferenceGRPCClient,
    InferenceRESTClient,
    InferInput,
    InferRequest,
    InferResponse,
    RESTConfig,
)
from numpy.typing import NDArray

#: Seconds any one call may take: generous, as the checks are about answers, never speed.
TIMEOUT = 60.0
#: The input's datatype in the protocol and as numpy.
DATATYPE = "FP32"
DTYPE = np.dtype("<f4")


def tensor(array: NDArray[Any]) -> dict[str, Any]:
    """An array as JSON: its shape, dtype and base64 of its little-endian bytes."""
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {
        "shape": list(little.shape),
        "dtype": little.dtype.name,
        "b64": base64.b64encode(little.tobytes()).decode("ascii"),
    }


def raised(exc: BaseException) -> dict[str, Any]:
    """An exception as JSON: its type, message and, for gRPC, its status code and details."""
    record: dict[str, Any] = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
    }
    if isinstance(exc, grpc.aio.AioRpcError):
        record["code"] = exc.code().name
        record["details"] = exc.details() or ""
    return {"raised": record}


async def attempt(call: Callable[[], Awaitable[Any]], convert: Callable[[Any], Any]) -> Any:
    """``{"value": convert(result)}`` or ``{"raised": ...}``."""
    try:
        result = await call()
    except Exception as exc:
        return raised(exc)
    return {"value": convert(result)}


def answer(response: InferResponse) -> dict[str, Any]:
    """What an infer response holds, as the client decoded it."""
    parameters = response.parameters
    step: Any = None
    if parameters is not None and "step" in parameters:
        value = parameters["step"]
        step = value if isinstance(value, int) else value.int64_param
    return {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "step": step,
        "outputs": [
            {"name": out.name, "datatype": out.datatype, **tensor(out.as_numpy())}
            for out in response.outputs
        ],
    }


def infer_input(x: NDArray[Any], binary: bool) -> InferInput:
    tensor_in = InferInput("inputs", list(x.shape), DATATYPE)
    tensor_in.set_data_from_numpy(x, binary_data=binary)
    return tensor_in


async def check_rest(plan: dict[str, Any], x: NDArray[Any]) -> dict[str, Any]:
    """InferenceRESTClient (protocol v2): health, readiness, infer with JSON and binary
    tensors. The client has no version argument: a version is asked for by its path,
    ``{name}/versions/{version}``, the protocol's versioned infer URL."""
    url = plan["rest_url"]
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=TIMEOUT))
    try:
        results: dict[str, Any] = {
            "live": await attempt(lambda: client.is_server_live(url), bool),
            "ready": await attempt(lambda: client.is_server_ready(url), bool),
            "model_ready": {},
            "infer": [],
        }
        for name in [*plan["ready"], plan["unknown"]]:
            results["model_ready"][name] = await attempt(
                functools.partial(client.is_model_ready, url, name), bool
            )
        for case in plan["infer"]:
            model, version = case["model"], case["version"]
            path = f"{model}/versions/{version}" if version else model
            for encoding in ("json", "binary"):
                request = InferRequest(
                    model_name=model,
                    infer_inputs=[infer_input(x, binary=encoding == "binary")],
                    request_id=f"rest-{model}-{version or 'default'}-{encoding}",
                    parameters={"binary_data_output": True} if encoding == "binary" else None,
                )
                outcome = await attempt(
                    functools.partial(client.infer, url, request, model_name=path),
                    answer,
                )
                results["infer"].append({**case, "encoding": encoding, "outcome": outcome})
        unknown = InferRequest(model_name=plan["unknown"], infer_inputs=[infer_input(x, False)])
        results["unknown_infer"] = await attempt(
            lambda: client.infer(url, unknown, model_name=plan["unknown"]), answer
        )
        return results
    finally:
        await client.close()


async def check_grpc(plan: dict[str, Any], x: NDArray[Any]) -> dict[str, Any]:
    """InferenceGRPCClient: health, readiness, infer with typed ``contents`` and with
    ``raw_input_contents``, the version in the request's ``model_version``."""
    client = InferenceGRPCClient(plan["grpc_target"], timeout=TIMEOUT)
    try:
        results: dict[str, Any] = {
            "live": await attempt(client.is_server_live, bool),
            "ready": await attempt(client.is_server_ready, bool),
            "model_ready": {},
            "infer": [],
        }
        for name in [*plan["ready"], plan["unknown"]]:
            results["model_ready"][name] = await attempt(
                functools.partial(client.is_model_ready, name), bool
            )
        for case in plan["infer"]:
            model, version = case["model"], case["version"]
            for encoding in ("contents", "raw"):
                request = InferRequest(
                    model_name=model,
                    infer_inputs=[infer_input(x, binary=encoding == "raw")],
                    request_id=f"grpc-{model}-{version or 'default'}-{encoding}",
                    model_version=version or None,
                )
                outcome = await attempt(functools.partial(client.infer, request), answer)
                results["infer"].append({**case, "encoding": encoding, "outcome": outcome})
        unknown = InferRequest(model_name=plan["unknown"], infer_inputs=[infer_input(x, True)])
        results["unknown_infer"] = await attempt(lambda: client.infer(unknown), answer)
        return results
    finally:
        await client.close()


async def check(plan: dict[str, Any]) -> dict[str, Any]:
    inputs = plan["inputs"]
    x = np.frombuffer(base64.b64decode(inputs["b64"]), dtype=DTYPE).reshape(inputs["shape"])
    return {"rest": await check_rest(plan, x), "grpc": await check_grpc(plan, x)}


def main() -> None:
    plan = json.load(sys.stdin)
    json.dump(asyncio.run(check(plan)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
