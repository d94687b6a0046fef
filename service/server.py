"""One process, one event loop: the gRPC server and the REST server over one data plane.

Start-up: check what can be refused without touching the store (tokens and exposure, the TLS
files, both addresses), open the store (the writer lock), load every model's head, start
both transports, then turn ready. Shutdown (SIGTERM or SIGINT): turn not-ready, refuse new
calls, let those in flight finish within the grace period, save every head with unsaved
steps, close the store, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2

from propserve.service import errors, memory
from propserve.service.auth import Authenticator, load_tokens
from propserve.service.config import Settings
from propserve.service.dataplane import DataPlane
from propserve.service.grpc.oip import InferenceService, add_inference_service
from propserve.service.grpc.server import SERVICE_NAME, add_services, new_server
from propserve.service.grpc.servicer import ModelService
from propserve.service.metrics import Metrics
from propserve.service.models import Models
from propserve.service.replica import Follower, ReplicaModels
from propserve.service.rest import http
from propserve.service.rest.app import RestApp
from propserve.service.store import ModelStore

log = logging.getLogger("propserve.server")

#: BLAS threads when ``settings.blas_threads`` is unset: requests run in parallel on the
#: worker threads instead (see docs/operations.md#workers-and-blas-threads).
DEFAULT_BLAS_THREADS = 1


@dataclass
class Server:
    """A running server; ``rest_port`` and ``grpc_port`` are the bound ports."""

    settings: Settings
    plane: DataPlane
    grpc_server: grpc.aio.Server
    health: health.aio.HealthServicer
    http_server: http.HttpServer
    rest_port: int
    grpc_port: int
    ready: bool = False
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    trim_task: asyncio.Task[None] | None = None
    follower: Follower | None = None

    async def stop(self) -> None:
        """Drain and stop (idempotent)."""
        if self.stopped.is_set():
            return
        grace = self.settings.grace_seconds
        log.info("server.draining", extra={"grace_seconds": grace})
        self.ready = False
        if self.trim_task is not None:
            self.trim_task.cancel()
        if self.follower is not None:
            await self.follower.stop()
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # New calls on either transport are answered UNAVAILABLE / 503 (clients retry
        # elsewhere) while calls and streams in flight finish; only then do the servers stop,
        # cancelling what is left.
        drained = asyncio.create_task(self.plane.drain(grace))
        await self.http_server.shutdown(grace)
        if not await drained:
            log.warning("server.grace_expired")
        await self.grpc_server.stop(max(0.0, deadline - loop.time()))
        models = self.plane.models
        models.begin_shutdown()
        await loop.run_in_executor(None, models.close)
        self.plane.close()
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(models.metrics.gc_callback)
        self.stopped.set()
        log.info("server.stopped")


def _check_exposure(settings: Settings, auth: Authenticator) -> None:
    if not settings.loopback_only and not auth.enabled and not settings.insecure:
        raise errors.FailedPrecondition(
            f"refusing to listen on {settings.rest_host}/{settings.grpc_host} beyond loopback "
            "without tokens; configure PROPSERVE_TOKENS or PROPSERVE_TOKENS_FILE, or pass "
            "--insecure to accept the risk"
        )


def _load_tls(settings: Settings) -> ssl.SSLContext | None:
    """A server TLS context from the PEM certificate chain and key, or None."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except ssl.SSLError as exc:
        raise errors.FailedPrecondition(
            f"cannot use the TLS certificate {settings.tls_cert} with the key "
            f"{settings.tls_key}: they are not a PEM certificate chain and its private key "
            f"({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise errors.FailedPrecondition(
            f"cannot read the TLS certificate {settings.tls_cert} or its key "
            f"{settings.tls_key}: {_reason(exc)}"
        ) from None
    return context


def _listen(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The REST API's listening socket (shared with other processes with ``reuse_port``)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server(
            (host.strip("[]"), port), family=family, backlog=2048, reuse_port=reuse_port
        )
    except OSError as exc:
        raise errors.Unavailable(
            f"cannot listen for REST on {host}:{port}: {_reason(exc)}"
        ) from None


def _reason(exc: OSError) -> str:
    """The system's words for ``exc``, without the call's own decoration."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _bind_grpc(server: grpc.aio.Server, settings: Settings, tls: ssl.SSLContext | None) -> int:
    """Bind the gRPC address (with TLS when configured); returns the port."""
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    if ":" in settings.grpc_host and not settings.grpc_host.startswith("["):
        address = f"[{settings.grpc_host}]:{settings.grpc_port}"
    try:
        if tls is None:
            return server.add_insecure_port(address)
        assert settings.tls_cert is not None and settings.tls_key is not None
        credentials = grpc.ssl_server_credentials(
            [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
        )
        return server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc says only "Failed to bind"
        raise errors.Unavailable(
            f"cannot listen for gRPC on {address}: the address is in use or not available"
        ) from None


async def start(settings: Settings, *, version: str = "0+unknown") -> Server:
    """Open the store, build both transports and start listening; returns when ready."""
    auth = Authenticator(
        load_tokens(
            settings.tokens.get_secret_value() if settings.tokens else None, settings.tokens_file
        )
    )
    _check_exposure(settings, auth)
    tls = _load_tls(settings)
    rest_socket = _listen(settings.rest_host, settings.rest_port, reuse_port=settings.reuse_port)
    grpc_server = new_server(
        max_message_bytes=settings.max_message_bytes, reuse_port=settings.reuse_port
    )
    try:
        grpc_port = _bind_grpc(grpc_server, settings, tls)
        return await _start(settings, auth, tls, rest_socket, grpc_server, grpc_port, version)
    except BaseException:
        rest_socket.close()
        await grpc_server.stop(None)
        raise


async def _start(
    settings: Settings,
    auth: Authenticator,
    tls: ssl.SSLContext | None,
    rest_socket: socket.socket,
    grpc_server: grpc.aio.Server,
    grpc_port: int,
    version: str,
) -> Server:
    from threadpoolctl import threadpool_limits  # noqa: PLC0415 - optional tuning

    threadpool_limits(settings.blas_threads or DEFAULT_BLAS_THREADS, user_api="blas")
    metrics = Metrics()
    try:
        store = ModelStore(settings.store, read_only=settings.follow)
    except errors.NotFound:
        raise errors.Unavailable(
            f"cannot follow the model store at {settings.store}: it does not exist"
        ) from None
    except OSError as exc:
        reason = (
            "it is not a folder"
            if settings.store.exists() and not settings.store.is_dir()
            else _reason(exc)
        )
        raise errors.Unavailable(
            f"cannot open the model store at {settings.store}: {reason}"
        ) from None
    try:
        core = ReplicaModels if settings.follow else Models
        models = await asyncio.get_running_loop().run_in_executor(
            None, lambda: core(store, settings, metrics)
        )
    except BaseException:
        store.close()
        raise
    plane = DataPlane(models, auth, metrics, settings)
    health_servicer = add_services(grpc_server, ModelService(plane))
    server_ref: list[Server] = []

    def ready() -> bool:
        if isinstance(models, ReplicaModels) and not models.healthy:
            return False
        return bool(server_ref) and server_ref[0].ready

    add_inference_service(grpc_server, InferenceService(plane, ready=ready, version=version))
    app = RestApp(plane, metrics, ready=ready, version=version)
    http_server = http.HttpServer(
        app,
        http.Limits(
            max_body_bytes=settings.max_message_bytes,
            max_header_bytes=settings.max_header_bytes,
            header_timeout=settings.header_timeout,
            keep_alive_timeout=settings.keep_alive_timeout,
            max_connections=settings.max_connections,
        ),
        ssl_context=tls,
        refused=lambda code: metrics.observe("other", "rest", code, 0.0, api=False),
    )
    await grpc_server.start()
    await http_server.start(rest_socket)
    server = Server(
        settings,
        plane,
        grpc_server,
        health_servicer,
        http_server,
        rest_port=rest_socket.getsockname()[1],
        grpc_port=grpc_port,
    )
    server_ref.append(server)
    if isinstance(models, ReplicaModels):
        loop = asyncio.get_running_loop()
        server.follower = Follower(
            models, settings.poll_interval, lambda work: loop.run_in_executor(None, work)
        )
        server.follower.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if settings.tune_heap:
        idle = memory.after_bursts(
            lambda: metrics.answered, lambda: not plane.workers.busy, metrics.heap_trims.inc
        )
        server.trim_task = asyncio.create_task(idle.run())
        # Start-up's objects live as long as the process: out of the collector's way,
        # before the first request (see docs/operations.md#memory).
        memory.collect_and_freeze()
    gc.callbacks.append(metrics.gc_callback)
    server.ready = True
    if settings.ready_file is not None:
        _write_ready_file(settings.ready_file, server)
    log.info(
        "server.ready",
        extra={
            "rest": f"{settings.rest_host}:{server.rest_port}",
            "grpc": f"{settings.grpc_host}:{grpc_port}",
            "store": str(settings.store),
            "models": len(models.list_models()),
            "auth": auth.enabled,
            "tls": tls is not None,
            "version": version,
        },
    )
    return server


def _write_ready_file(path: Path, server: Server) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(
        json.dumps(
            {"pid": os.getpid(), "rest_port": server.rest_port, "grpc_port": server.grpc_port}
        )
    )
    os.replace(temporary, path)


async def serve(settings: Settings, *, version: str = "0+unknown") -> None:
    """Run until SIGTERM or SIGINT, then drain and stop.

    The handlers are installed before start-up: a signal that arrives while the server
    starts, or just after it has said it is ready, is a request to drain like any other,
    not the default action's kill (an orchestrator may stop a server it has just seen
    ready).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        server = await start(settings, version=version)
        await stop.wait()
        await server.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
