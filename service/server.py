"""One process, one event loop: the gRPC server and the REST app over one core.

Start-up: open the store (the writer lock), load every model's head, bind both transports,
then turn ready. Shutdown (SIGTERM or SIGINT): turn not-ready, stop taking new requests, let
in-flight ones finish within the grace period, save every head with unsaved steps, close the
store, exit 0.
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
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import uvicorn
from grpc_health.v1 import health_pb2

from propserve.service import errors
from propserve.service.auth import Authenticator, load_tokens
from propserve.service.config import Settings
from propserve.service.core import Core, Limits
from propserve.service.dispatch import Dispatcher
from propserve.service.grpc_api import SERVICE_NAME, ModelServiceAdapter, add_services, new_server
from propserve.service.http_fast import protocol_class
from propserve.service.memory import after_bursts, collect_and_freeze
from propserve.service.metrics import Metrics
from propserve.service.rest_api import PredictHotPath, create_app
from propserve.service.store import ModelStore

log = logging.getLogger("propserve.server")

#: BLAS threads when ``settings.blas_threads`` is unset.
DEFAULT_BLAS_THREADS = 1


class _RestServer(uvicorn.Server):
    """uvicorn without its own signal handling: the process's signals drain both transports
    together (see :func:`serve`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass
class Server:
    """A running server; ``rest_port`` and ``grpc_port`` are the bound ports."""

    settings: Settings
    core: Core
    dispatcher: Dispatcher
    grpc_server: grpc.aio.Server
    health: object
    rest: uvicorn.Server
    rest_task: asyncio.Task[None] | None = None
    rest_port: int = 0
    grpc_port: int = 0
    ready: bool = False
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    adapter: ModelServiceAdapter | None = None
    trim_task: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        """Drain and stop (idempotent)."""
        if self.stopped.is_set() or (not self.ready and self.rest_task is None):
            return
        log.info("server.draining grace_seconds=%s", self.settings.grace_seconds)
        self.ready = False
        if self.trim_task is not None:
            self.trim_task.cancel()
        await self.health.enter_graceful_shutdown()  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()
        grace = self.settings.grace_seconds
        deadline = loop.time() + grace
        # gRPC: new calls are answered UNAVAILABLE (clients retry elsewhere) while calls and
        # streams in flight finish; only then does the server stop, cancelling what is left.
        assert self.adapter is not None
        drained = asyncio.create_task(self.adapter.drain(grace))
        self.rest.should_exit = True
        if self.rest_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.rest_task), grace + 1)
            except TimeoutError:
                self.rest.force_exit = True
                await self.rest_task
        if not await drained:
            log.warning("server.grace_expired transport=grpc")
        await self.grpc_server.stop(max(0.0, deadline - loop.time()))
        self.core.begin_shutdown()
        await asyncio.get_running_loop().run_in_executor(None, self.core.close)
        self.dispatcher.close()
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self.core.metrics.gc_callback)
        self.stopped.set()
        log.info("server.stopped")


def _check_exposure(settings: Settings, auth: Authenticator) -> None:
    if not settings.loopback_only and not auth.enabled and not settings.insecure:
        raise errors.FailedPrecondition(
            f"refusing to listen on {settings.rest_host}/{settings.grpc_host} beyond loopback "
            "without tokens; configure PROPSERVE_TOKENS or PROPSERVE_TOKENS_FILE, or pass "
            "--insecure to accept the risk"
        )


def _tls_pair(settings: Settings) -> tuple[bytes, bytes] | None:
    """The PEM certificate chain and key, read and checked to load together, or None."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    try:
        certificate, key = settings.tls_cert.read_bytes(), settings.tls_key.read_bytes()
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(settings.tls_cert, settings.tls_key)
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
    return certificate, key


def _listen(host: str, port: int) -> socket.socket:
    """The REST API's listening socket, bound here so that an address in use is reported
    as such (uvicorn would log it and exit the process)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host.strip("[]"), port), family=family, backlog=2048)
    except OSError as exc:
        raise errors.Unavailable(
            f"cannot listen for REST on {host}:{port}: {_reason(exc)}"
        ) from None


def _reason(exc: OSError) -> str:
    """The system's words for ``exc``, without the call's own decoration."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


async def start(settings: Settings) -> Server:
    """Open the store, build both transports and start listening; returns when ready.

    What can be refused without touching the store is checked first: tokens and exposure,
    the TLS files, both addresses."""
    auth = Authenticator(
        load_tokens(
            settings.tokens.get_secret_value() if settings.tokens else None, settings.tokens_file
        )
    )
    _check_exposure(settings, auth)
    tls = _tls_pair(settings)
    rest_socket = _listen(settings.rest_host, settings.rest_port)
    grpc_server = new_server(max_message_bytes=settings.max_message_bytes)
    try:
        grpc_port = _bind_grpc(grpc_server, settings, tls)
        return await _start(settings, auth, rest_socket, grpc_server, grpc_port)
    except BaseException:
        rest_socket.close()
        await grpc_server.stop(None)
        raise


def _bind_grpc(server: grpc.aio.Server, settings: Settings, tls: tuple[bytes, bytes] | None) -> int:
    """Bind the gRPC address (with TLS when given); returns the port."""
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    if ":" in settings.grpc_host and not settings.grpc_host.startswith("["):
        address = f"[{settings.grpc_host}]:{settings.grpc_port}"
    try:
        if tls is None:
            return server.add_insecure_port(address)
        certificate, key = tls
        return server.add_secure_port(address, grpc.ssl_server_credentials([(key, certificate)]))
    except RuntimeError:  # grpc says only "Failed to bind"
        raise errors.Unavailable(
            f"cannot listen for gRPC on {address}: the address is in use or not available"
        ) from None


async def _start(
    settings: Settings,
    auth: Authenticator,
    rest_socket: socket.socket,
    grpc_server: grpc.aio.Server,
    grpc_port: int,
) -> Server:
    # NOTE: one BLAS thread unless told otherwise. OpenBLAS's own default (one per core) makes
    # concurrent heavy requests oversubscribe the cores: measured on 2 cores, 256-row
    # predictions at concurrency 8 cost 17-35 ms of CPU each with 2 threads and 4.5 ms with
    # one, while single-row latency did not change. Parallelism comes from the worker threads
    # (see service.dispatch) instead.
    from threadpoolctl import threadpool_limits  # noqa: PLC0415 - optional tuning

    threadpool_limits(settings.blas_threads or DEFAULT_BLAS_THREADS, user_api="blas")
    metrics = Metrics()
    try:
        store = ModelStore(settings.store)
    except OSError as exc:
        reason = (
            "it is not a folder"
            if settings.store.exists() and not settings.store.is_dir()
            else _reason(exc)
        )
        raise errors.Unavailable(
            f"cannot open the model store at {settings.store}: {reason}"
        ) from None
    limits = Limits(
        max_rows=settings.max_rows,
        max_params=settings.max_params,
        max_elements=max(settings.max_message_bytes // 4, 1),
    )
    try:
        core = await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: Core(
                store,
                limits=limits,
                metrics=metrics,
                version_cache=settings.version_cache,
                default_settings={
                    "retain": settings.default_retain,
                    "autosave_every": settings.default_autosave_every,
                },
            ),
        )
    except BaseException:
        store.close()
        raise
    dispatcher = Dispatcher(
        core,
        batch_rows=settings.batch_rows,
        max_queued_rows=settings.max_queued_rows,
        max_pending_calls=settings.max_pending_calls,
        busy_poll=settings.busy_poll_us / 1e6,
    )
    adapter = ModelServiceAdapter(dispatcher, auth, metrics, limits.max_elements)
    health = add_services(grpc_server, adapter)

    server_ref: list[Server] = []
    app = create_app(
        dispatcher,
        auth,
        metrics,
        max_body=settings.max_message_bytes,
        max_elements=limits.max_elements,
        ready=lambda: bool(server_ref) and server_ref[0].ready,
    )
    hot_path = PredictHotPath(
        dispatcher,
        auth,
        metrics,
        max_body=settings.max_message_bytes,
        max_elements=limits.max_elements,
    )
    config = uvicorn.Config(
        app,
        http=protocol_class(hot_path),
        host=settings.rest_host,
        port=settings.rest_port,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=int(settings.grace_seconds),
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        ssl_version=ssl.PROTOCOL_TLS_SERVER,
    )
    rest = _RestServer(config)
    server = Server(
        settings, core, dispatcher, grpc_server, health, rest, grpc_port=grpc_port, adapter=adapter
    )
    server_ref.append(server)
    await grpc_server.start()
    server.rest_task = asyncio.create_task(rest.serve(sockets=[rest_socket]))
    while not rest.started:
        if server.rest_task.done():
            await grpc_server.stop(0)
            dispatcher.close()
            core.close()
            server.rest_task.result()
            raise errors.Unavailable(
                f"the REST server did not start on {settings.rest_host}:{settings.rest_port}"
            )
        await asyncio.sleep(0.01)
    server.rest_port = rest_socket.getsockname()[1]
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    idle = after_bursts(
        lambda: metrics.answered, lambda: not dispatcher.working, metrics.heap_trims.inc
    )
    server.trim_task = asyncio.create_task(idle.run())
    # Start-up's objects live as long as the process: out of the collector's way (see
    # service.memory.collect_and_freeze), before the first request.
    collect_and_freeze()
    gc.callbacks.append(metrics.gc_callback)
    server.ready = True
    if settings.ready_file is not None:
        _write_ready_file(settings.ready_file, server)
    log.info(
        "server.ready rest=%s:%d grpc=%s:%d store=%s models=%d auth=%s tls=%s",
        settings.rest_host,
        server.rest_port,
        settings.grpc_host,
        grpc_port,
        settings.store,
        len(core.list_models()),
        auth.enabled,
        bool(settings.tls_cert),
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


async def serve(settings: Settings) -> None:
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
        server = await start(settings)
        await stop.wait()
        await server.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
