"""Bare transports to compare the server with, each run as a child process:

- ``grpc``: grpc.aio with one generic bytes-in/bytes-out method (ECHO_METHOD) that answers
  bytes the size of a PredictResponse for the request's rows of model A;
- ``rest``: FastAPI on uvicorn (uvloop/httptools, like the server), ``POST /echo`` reading
  the body raw and answering a small JSON.

    .venv/bin/python -m bench.echo grpc --ready PATH   # writes {pid, grpc_port} to PATH
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from bench import procs

ECHO_METHOD = "/bench.Echo/Echo"
KINDS = ("grpc", "rest")


def start_echo(kind: str, work: Path) -> procs.Child:
    """The ``kind`` echo on an ephemeral loopback port, ready."""
    name = f"echo-{kind}"
    ready = work / f"{name}.ready.json"
    command = [sys.executable, "-m", "bench.echo", kind, "--ready", str(ready)]
    return procs.spawn(name, command, work, {})


def _predict_reply_size(request_bytes: int) -> int:
    rows = max(request_bytes // (784 * 4), 1)
    return rows * 10 * 4 + 16


async def _grpc_echo(ready: Path) -> None:
    import grpc  # noqa: PLC0415

    replies: dict[int, bytes] = {}

    async def echo(request: bytes, context: Any) -> bytes:
        reply = replies.get(len(request))
        if reply is None:
            reply = replies[len(request)] = bytes(_predict_reply_size(len(request)))
        return reply

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    procs.write_ready(ready, {"grpc_port": port})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


async def _rest_echo(ready: Path) -> None:
    import orjson  # noqa: PLC0415
    import uvicorn  # noqa: PLC0415
    from fastapi import FastAPI, Request, Response  # noqa: PLC0415

    app = FastAPI()

    async def echo(request: Request) -> Response:
        body = await request.body()
        return Response(orjson.dumps({"bytes": len(body)}), media_type="application/json")

    # The annotations are strings here (postponed evaluation) naming local imports.
    echo.__annotations__ = {"request": Request, "return": Response}
    app.post("/echo")(echo)

    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            return
        await asyncio.sleep(0.01)
    procs.write_ready(ready, {"rest_port": server.servers[0].sockets[0].getsockname()[1]})
    await task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--ready", type=Path, required=True, help="ready file to write")
    args = parser.parse_args(argv)
    import uvloop  # noqa: PLC0415

    uvloop.run(_grpc_echo(args.ready) if args.kind == "grpc" else _rest_echo(args.ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
