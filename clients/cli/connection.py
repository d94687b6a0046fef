"""Which server the verbs talk to, over which transport, and the client for it.

Each setting comes from its flag, else from the environment, else from the default:

    --grpc HOST:PORT    PROPSERVE_GRPC       127.0.0.1:50051
    --rest URL          PROPSERVE_REST       http://127.0.0.1:8000
    --transport         PROPSERVE_TRANSPORT  rest when only --rest is given, else grpc
    --token             PROPSERVE_TOKEN      none

(The server's own PROPSERVE_* settings, such as PROPSERVE_GRPC_PORT, are where it
listens; these are where the CLI calls.)
"""

from __future__ import annotations

import argparse
import math
import os

from propserve.clients import Client, GrpcClient, RestClient
from propserve.clients.cli.datafiles import UsageError
from propserve.clients.rest_client import base_url

DEFAULT_GRPC = "127.0.0.1:50051"
DEFAULT_REST = "http://127.0.0.1:8000"
TRANSPORTS = ("grpc", "rest")


def settle_connection(args: argparse.Namespace) -> None:
    """Fill in the connection from the flags, the environment and the defaults."""
    environ = os.environ
    if args.transport is None:
        if args.rest is not None and args.grpc is None:
            args.transport = "rest"
        else:
            args.transport = environ.get("PROPSERVE_TRANSPORT") or "grpc"
            if args.transport not in TRANSPORTS:
                raise UsageError(
                    f"PROPSERVE_TRANSPORT={args.transport} is not one of {', '.join(TRANSPORTS)}"
                )
    # Named as the user gave it, in a message about it.
    rest_source = "--rest " if args.rest is not None else "PROPSERVE_REST="
    args.grpc = args.grpc or environ.get("PROPSERVE_GRPC") or DEFAULT_GRPC
    args.rest = args.rest or environ.get("PROPSERVE_REST") or DEFAULT_REST
    try:
        base_url(args.rest)
    except ValueError:
        given = rest_source + args.rest
        if "://" in args.rest:
            raise UsageError(f"{given}: the REST API is http:// or https://") from None
        raise UsageError(
            f"{given} is not a URL: add the scheme, e.g. {rest_source}http://{args.rest} "
            "(or https://)"
        ) from None


def seconds(text: str) -> float:
    """--timeout's value: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def address(args: argparse.Namespace) -> str:
    return str(args.rest if args.transport == "rest" else args.grpc)


def connect(args: argparse.Namespace) -> Client:
    token = args.token or os.environ.get("PROPSERVE_TOKEN") or None
    if args.ca_cert is not None and not args.ca_cert.is_file():
        raise UsageError(f"CA certificate {args.ca_cert} is not a readable file")
    if args.transport == "rest":
        return RestClient(
            args.rest, token=token, root_certificates=args.ca_cert, timeout=args.timeout
        )
    return GrpcClient(
        args.grpc,
        token=token,
        tls=args.tls,
        root_certificates=args.ca_cert,
        timeout=args.timeout,
    )
