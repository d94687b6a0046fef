"""``propserve serve``: the server's verb of the ``propserve`` command (see propserve.cli)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from propserve.service import errors


def _serve(args: argparse.Namespace) -> int:
    from propserve.service.memory import configure_heap  # noqa: PLC0415 - keep client commands light

    configure_heap()  # before any thread of the server's starts
    from propserve.service import logs  # noqa: PLC0415
    from propserve.service.config import Settings, describe, unknown_variables  # noqa: PLC0415
    from propserve.service.server import serve  # noqa: PLC0415

    overrides: dict[str, Any] = {
        k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None
    }
    if args.insecure:
        overrides["insecure"] = True
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for line in describe(exc).splitlines():
            print(f"propserve: invalid setting: {line}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    for name in unknown_variables(os.environ):
        logging.getLogger("propserve.config").warning("config.unknown_variable name=%s", name)
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        runner = asyncio.run
    try:
        runner(serve(settings))
    except errors.PropserveError as exc:
        print(f"propserve: {exc.message}", file=sys.stderr)
        return 1
    return 0


def add_serve(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the model server (gRPC and REST)")
    serve.add_argument("--store", type=Path, help="model store folder (default ./models)")
    serve.add_argument("--rest-host", dest="rest_host")
    serve.add_argument("--rest-port", dest="rest_port", type=int)
    serve.add_argument("--grpc-host", dest="grpc_host")
    serve.add_argument("--grpc-port", dest="grpc_port", type=int)
    serve.add_argument("--tokens-file", dest="tokens_file", type=Path)
    serve.add_argument("--tls-cert", dest="tls_cert", type=Path)
    serve.add_argument("--tls-key", dest="tls_key", type=Path)
    serve.add_argument(
        "--insecure", action="store_true", help="allow listening beyond loopback without tokens"
    )
    serve.add_argument("--log-level", dest="log_level")
    serve.add_argument("--grace-seconds", dest="grace_seconds", type=float)
    serve.add_argument(
        "--ready-file",
        dest="ready_file",
        type=Path,
        help="write {pid, rest_port, grpc_port} here once ready",
    )
    serve.set_defaults(handler=_serve)
