"""Which server the verbs talk to, over which transport, and the client for it."""

from __future__ import annotations

import argparse
import math
import os

from propserve.clients import Client, GrpcClient, RestClient
from propserve.clients.cli.datafiles import UsageError
from propserve.clients.rest_client import base_url

DEFAULT_GRPC = "127.0.0.1:50051"
DEFAULT_REST = "http://127.0.0.1:8000"


def settle_connection(args: argparse.Namespace) -> None:
    """Fill in the connection's defaults: ``--rest URL`` alone means REST, anything else
    gRPC unless ``--transport`` says which."""
    if args.transport is None:
        args.transport = "rest" if args.rest is not None and args.grpc is None else "grpc"
    args.grpc = args.grpc or DEFAULT_GRPC
    args.rest = args.rest or DEFAULT_REST
    try:
        base_url(args.rest)
    except ValueError:
        if "://" in args.rest:
            raise UsageError(f"--rest {args.rest}: the REST API is http:// or https://") from None
        raise UsageError(
            f"--rest {args.rest} is not a URL: add the scheme, e.g. --rest http://{args.rest} "
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
