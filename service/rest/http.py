"""HTTP/1.1 for the REST API: an asyncio protocol on llhttp (httptools) serving an ASGI app.

Requests are parsed by llhttp, a maintained parser; this module frames them as ASGI
(``http`` scopes, ``http.request`` / ``http.response.*`` messages) and enforces the limits
that keep one client from starving the others, since the gRPC server shares the event loop:

- a request line and header block of at most ``max_header_bytes``, counted before the parser
  sees the bytes (431 and close);
- a body of at most ``max_body_bytes``: refused from its Content-Length before it is read, or
  as it streams (413 and close);
- ``header_timeout`` seconds to send a request's line and headers (408 and close, or a plain
  close before the first byte), ``keep_alive_timeout`` seconds of idleness between requests;
- at most ``max_connections`` open connections; beyond, new ones are closed at once and a
  warning is logged.

Keep-alive follows llhttp's reading of the request (HTTP/1.0, any ``Connection: close``).
Pipelined requests are answered in order, one at a time. A response's head and its first
body part go out in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools
import orjson
from starlette.types import ASGIApp, Message, Scope

log = logging.getLogger("propserve.http")


#: Body bytes buffered for an app that has not read them yet before the socket is paused.
BODY_HIGH_WATER = 256 << 10
_JSON = (b"content-type", b"application/json")
#: Seconds a refused connection's further bytes are read and dropped before it is closed.
LINGER_SECONDS = 2.0
#: How often the deadlines of every connection are checked (seconds).
SWEEP_INTERVAL = 0.5

_STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode("latin-1")
    for status in HTTPStatus
}


@dataclass(frozen=True)
class Limits:
    """What one connection or request may take (see the module's docstring)."""

    max_body_bytes: int
    max_header_bytes: int = 64 << 10
    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 1024


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else f"HTTP/1.1 {status} Unknown\r\n".encode("latin-1")


def error_body(code: str, message: str) -> bytes:
    """The API's error envelope, for answers the server gives by itself."""
    return orjson.dumps({"error": {"code": code, "message": message}})


class _Date:
    """The Date header's value, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def value(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode("latin-1")
        return self._value


class HttpServer:
    """Serves ``app`` on a listening socket until :meth:`shutdown`."""

    def __init__(
        self,
        app: ASGIApp,
        limits: Limits,
        *,
        ssl_context: ssl.SSLContext | None = None,
        refused: Callable[[str], None] = lambda code: None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.ssl_context = ssl_context
        #: Called with the wire code of each request the server refuses by itself.
        self.refused = refused
        self.connections: set[Connection] = set()
        self.closing = False
        self.date = _Date()
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._over_limit = 0
        self._over_limit_logged = 0.0

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self), sock=sock, ssl=self.ssl_context, backlog=2048
        )
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        for connection in list(self.connections):
            connection.check_deadline(now)
        if self._over_limit:
            self._log_over_limit(force=True)
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._sweep)

    def admit(self, connection: Connection) -> bool:
        """Whether a new connection may stay open (the connection limit)."""
        if len(self.connections) < self.limits.max_connections and not self.closing:
            self.connections.add(connection)
            return True
        if not self.closing:
            self._over_limit += 1
            self._log_over_limit()
        return False

    def _log_over_limit(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._over_limit_logged >= 10.0:
            log.warning(
                "http.connection_limit",
                extra={"limit": self.limits.max_connections, "refused": self._over_limit},
            )
            self._over_limit = 0
            self._over_limit_logged = now

    async def shutdown(self, grace: float) -> None:
        """Stop accepting connections, close idle ones, let requests in progress finish for
        up to ``grace`` seconds, then close everything."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self.connections):
            connection.close_when_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


class Connection(asyncio.Protocol):
    """One client connection: parses requests and runs the app for each, in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.scheme = "https" if server.ssl_context is not None else "http"
        self.local: Any = None
        self.peer: Any = None
        # The request being read (its headers, body state) and those waiting to be answered.
        self.reading: Request | None = None
        self.answering: Request | None = None
        self.queued: deque[Request] = deque()
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: bytes | None = None
        self.expect_continue = False
        self.header_bytes = 0
        self.tail = b""
        self.in_headers = False
        self.deadline: float | None = None
        self.deadline_status = 0
        self.paused_reading = False
        self.writable: asyncio.Event | None = None
        self.closed = False
        self.lingering = False
        self.close_after_answer = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport
        if not self.server.admit(self):
            self.closed = True
            transport.close()
            return
        self.local = transport.get_extra_info("sockname")
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A connection that sends nothing is closed after the header timeout.
        self.deadline = self.loop.time() + self.limits.header_timeout
        self.deadline_status = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for request in (self.reading, self.answering, *self.queued):
            if request is not None:
                request.disconnected()
        self.queued.clear()
        if self.writable is not None:
            self.writable.set()

    def pause_writing(self) -> None:
        self.writable = asyncio.Event()

    def resume_writing(self) -> None:
        if self.writable is not None:
            self.writable.set()
            self.writable = None

    def data_received(self, data: bytes) -> None:
        if self.closed or self.lingering:
            return
        if self.reading is None or self.in_headers:
            # A request's line and headers are counted before llhttp sees them: it would
            # gather an endless header in memory first. More bytes than the room left are
            # fine only when the header block ends within the room.
            room = self.limits.max_header_bytes - self.header_bytes
            if len(data) > room and (self.tail + data[: max(room, 0) + 4]).find(b"\r\n\r\n") < 0:
                self._refuse(431, "the request line and headers exceed the limit")
                return
            self.header_bytes += len(data)
            self.tail = data[-3:]
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # answered as a plain request; the connection closes after it
        except httptools.HttpParserError as exc:
            if not self.closed:
                self._refuse(400, f"malformed request: {exc}")

    # -- llhttp callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_headers = True
        self.url = b""
        self.headers = []
        self.content_length = None
        self.expect_continue = False
        self.deadline = self.loop.time() + self.limits.header_timeout
        self.deadline_status = 408

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self.headers.append((name, value))
        if name == b"content-length":
            self.content_length = value
        elif name == b"expect":
            self.expect_continue = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        self.in_headers = False
        self.header_bytes = 0
        self.tail = b""
        self.deadline = None
        parser = self.parser
        method = parser.get_method().decode("ascii")
        path, _, query = self.url.partition(b"?")
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": parser.get_http_version(),
            "server": self.local,
            "client": self.peer,
            "scheme": self.scheme,
            "method": method,
            "root_path": "",
            "path": unquote(path.decode("latin-1")) if b"%" in path else path.decode("latin-1"),
            "raw_path": path,
            "query_string": query,
            "headers": self.headers,
            "state": {},
        }
        keep_alive = parser.should_keep_alive() and not parser.should_upgrade()
        request = Request(self, scope, keep_alive, self.expect_continue)
        self.reading = request
        length = self.content_length
        if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
            request.keep_alive = False
            self._refuse_request(
                request,
                413,
                f"request body of {int(length):,} bytes exceeds the limit of "
                f"{self.limits.max_body_bytes:,}",
            )
            return
        if self.answering is None:
            self._answer(request)
        else:  # pipelined behind a request still being answered: it waits its turn
            self.queued.append(request)
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        request = self.reading
        if request is None or request.refused or request.finished:
            return  # a body nobody will read: llhttp skips it
        request.body_size += len(body)
        if request.body_size > self.limits.max_body_bytes:
            request.keep_alive = False
            self._refuse_request(
                request,
                413,
                f"request body exceeds the limit of {self.limits.max_body_bytes:,} bytes",
            )
            return
        request.receive_body(body)
        if request.buffered > BODY_HIGH_WATER:
            self._pause_reading()  # until the app reads (the kernel holds the rest)

    def on_message_complete(self) -> None:
        request = self.reading
        self.reading = None
        if request is not None:
            request.complete()

    # -- answering ---------------------------------------------------------------------------

    def _answer(self, request: Request) -> None:
        self.answering = request
        request.task = self.loop.create_task(request.run(self.server.app))

    def answered(self, request: Request) -> None:
        """``request``'s response is complete: go on with the next one, or idle."""
        if request is not self.answering:
            return
        self.answering = None
        if self.closed:
            return
        if not request.keep_alive or self.close_after_answer or self.server.closing:
            self._close()
            return
        if self.queued:
            self._answer(self.queued.popleft())
            if not self.queued:
                self._resume_reading()
            return
        self._resume_reading()
        if self.reading is None:  # idle: closed after the keep-alive timeout
            self.deadline = self.loop.time() + self.limits.keep_alive_timeout
            self.deadline_status = 0

    def check_deadline(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline and not self.closed:
            if self.deadline_status:
                self._refuse(self.deadline_status, "the request's headers took too long")
            else:
                self._close()

    def close_when_idle(self) -> None:
        """For shutdown: close now when idle, else after the current answer."""
        self.close_after_answer = True
        if self.answering is None and self.reading is None:
            self._close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # -- refusals --------------------------------------------------------------------------

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` outside of any request's turn and close (a request that cannot
        be read: it never reached the app)."""
        self.deadline = None
        if self.transport is None or self.closed:
            return
        self.server.refused(_code(status))
        if self.answering is not None:
            # An answer is still being written: finish it, then close; read nothing more.
            self.close_after_answer = True
            self._pause_reading()
            return
        self.write_head_and_body(status, [_JSON], _error(status, message), keep_alive=False)
        self.linger()

    def _refuse_request(self, request: Request, status: int, message: str) -> None:
        """Answer a request the server will not hand to the app, in its turn, then close."""
        request.refused = True
        self.server.refused(_code(status))
        if self.answering is None or self.answering is request:
            self.answering = request
            self.write_head_and_body(status, [_JSON], _error(status, message), keep_alive=False)
            self.linger()
        else:
            request.refusal = (status, message)
            self.queued.append(request)
            self._pause_reading()

    # -- transport ---------------------------------------------------------------------------

    def write_head_and_body(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        keep_alive: bool,
        content_length: bool = True,
    ) -> None:
        if self.transport is None or self.closed or self.lingering:
            return
        parts = [_status_line(status), b"date: ", self.server.date.value(), b"\r\n"]
        for name, value in headers:
            parts += [name, b": ", value, b"\r\n"]
        if content_length:
            parts.append(b"content-length: %d\r\n" % len(body))
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        parts += [b"\r\n", body]
        self.transport.write(b"".join(parts))

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed and not self.lingering:
            self.transport.write(data)

    def _pause_reading(self) -> None:
        if not self.paused_reading and self.transport is not None and not self.closed:
            self.paused_reading = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.paused_reading and self.transport is not None and not self.closed:
            self.paused_reading = False
            self.transport.resume_reading()

    def resume_for_body(self, request: Request) -> None:
        """``request``'s app wants more of its body: let it in."""
        if request is self.reading and not self.queued:
            self._resume_reading()

    def linger(self) -> None:
        """Close after a refusal while the client may still be sending: end our side, then
        read and drop what comes for up to LINGER_SECONDS, so that the client reads the
        answer before the close (closing with unread bytes would reset the connection and
        lose it)."""
        transport = self.transport
        if transport is None or self.closed:
            return
        if self.lingering or not transport.can_write_eof():
            self._close()
            return
        self.lingering = True
        transport.write_eof()
        self._resume_reading()
        self.deadline = self.loop.time() + LINGER_SECONDS
        self.deadline_status = 0

    def _close(self) -> None:
        self.deadline = None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
            self.server.connections.discard(self)


def _code(status: int) -> str:
    """The wire code of a refusal's status: 400, 408, 413 or 431."""
    return {400: "invalid_argument", 408: "deadline_exceeded"}.get(status, "resource_exhausted")


def _error(status: int, message: str) -> bytes:
    return error_body(_code(status), message)


class Request:
    """One request's ASGI life: the body as it arrives, and the response as the app sends
    it."""

    # What a request starts with (most of it never changes for a small request).
    buffered = 0
    body_size = 0
    body_complete = False
    body_handed = False
    body_arrived: asyncio.Event | None = None
    gone = False
    refused = False
    refusal: tuple[int, str] | None = None
    task: asyncio.Task[None] | None = None
    started = False
    finished = False
    status = 200
    #: The response's headers until its head is written.
    head: list[tuple[bytes, bytes]] | None = None
    chunked = False

    def __init__(
        self, connection: Connection, scope: Scope, keep_alive: bool, expect_continue: bool
    ) -> None:
        self.connection = connection
        self.scope = scope
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.method = scope["method"]
        self.body: list[bytes] = []

    # -- from the connection ---------------------------------------------------------------

    def receive_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.body_arrived is not None:
            self.body_arrived.set()

    def complete(self) -> None:
        self.body_complete = True
        if self.body_arrived is not None:
            self.body_arrived.set()

    def disconnected(self) -> None:
        self.gone = True
        if self.body_arrived is not None:
            self.body_arrived.set()

    # -- ASGI --------------------------------------------------------------------------------

    async def run(self, app: ASGIApp) -> None:
        connection = self.connection
        if self.refusal is not None:
            status, message = self.refusal
            connection.write_head_and_body(
                status, [_JSON], _error(status, message), keep_alive=False
            )
            connection.linger()
            return
        try:
            await app(self.scope, self.receive, self.send)
        except Exception:
            log.exception("http.app_failed", extra={"path": self.scope["path"]})
            if not self.started:
                self.keep_alive = False
                connection.write_head_and_body(
                    500,
                    [_JSON],
                    error_body("internal", "internal error"),
                    keep_alive=False,
                )
            self.keep_alive = False
        if not self.finished:
            self.keep_alive = False
        connection.answered(self)

    async def receive(self) -> Message:
        if self.body_handed:  # the whole body went to the app: what is left is the end
            while not self.gone:
                await self._wait()
            return {"type": "http.disconnect"}
        while not self.body and not self.body_complete and not self.gone:
            if self.expect_continue and not self.started:
                self.expect_continue = False
                self.connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.connection.resume_for_body(self)
            await self._wait()
        if self.gone and not self.body_complete:
            return {"type": "http.disconnect"}
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body = []
        self.buffered = 0
        more = not self.body_complete
        if more:
            self.connection.resume_for_body(self)
        else:
            self.body_handed = True
        return {"type": "http.request", "body": body, "more_body": more}

    async def _wait(self) -> None:
        self.body_arrived = asyncio.Event()
        try:
            await self.body_arrived.wait()
        finally:
            self.body_arrived = None

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self.gone or self.finished:
            return
        connection = self.connection
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("the response has started already")
            self.started = True
            self.status = int(message["status"])
            self.head = list(message.get("headers", ()))  # names in lower case (ASGI)
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if not self.started:
            raise RuntimeError("http.response.body before http.response.start")
        body = bytes(message.get("body", b""))
        more = bool(message.get("more_body", False))
        head = self.head
        if head is not None:  # the first part: the head goes with it
            self.head = None
            has_length = False
            for name, value in head:
                if name == b"content-length":
                    has_length = True
                elif name == b"connection" and value.lower() == b"close":
                    self.keep_alive = False
            if not has_length and more:
                self.chunked = True
                head.append((b"transfer-encoding", b"chunked"))
            head_only = self.method == "HEAD"
            payload = b"" if head_only else body
            if self.chunked and payload:
                payload = b"%x\r\n%s\r\n" % (len(payload), payload)
            if self.chunked and not more and not head_only:
                payload += b"0\r\n\r\n"
            connection.write_head_and_body(
                self.status,
                head,
                payload,
                keep_alive=self.keep_alive and not connection.close_after_answer,
                content_length=not has_length and not self.chunked and not head_only,
            )
        elif self.method != "HEAD":
            if self.chunked:
                if body:
                    connection.write(b"%x\r\n%s\r\n" % (len(body), body))
                if not more:
                    connection.write(b"0\r\n\r\n")
            elif body:
                connection.write(body)
        if connection.writable is not None:
            await connection.writable.wait()
        if not more:
            self.finished = True
