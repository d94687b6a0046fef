"""The REST hot path: ``POST /v1/models/{name}/predict`` answered inside the HTTP protocol.

uvicorn turns each request into an ASGI scope, a task, a receive/send message exchange and
two socket writes; FastAPI adds its middleware stack, routing and dependencies. For a
single-row prediction that framework work costs more than the forward pass itself (measured
on 2 cores with wrk at concurrency 1: a bare FastAPI endpoint costs ~160 us of server CPU per
request, a fixed answer from the protocol ~45 us, decoding the JSON rows ~40 us and the
forward pass of model A ~50 us). So the protocol below, uvicorn's httptools protocol with one
addition, recognises a plain predict request when its headers arrive, collects its body and
hands it to :class:`service.rest_api.PredictHotPath`, which answers through the same
authorisation, parsing, core call, error table, metrics and logs as the route; the reply goes
out in one write. A request that arrives whole in one read, written the plainest way (see
:func:`plain_predict`), is read without the parser's callbacks at all.

Everything else takes uvicorn's path unchanged, and so do predict requests that are not
plain: chunked or large bodies (admission control), ``Expect: 100-continue``, upgrades, query
strings, and requests pipelined behind one still being answered (they queue in order, as
uvicorn queues them). One change applies to every connection: the keep-alive timer, one per
connection instead of one per request (same rule: see HotPathProtocol).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

#: Largest body taken by the hot path; larger ones go through the ASGI admission control.
HOT_BODY_LIMIT = 256 << 10

_PREDICT_PATH = rb"/v1/models/([a-z0-9][a-z0-9._-]{0,63})/predict"
_PREDICT_URL = re.compile(_PREDICT_PATH)
_PREDICT_LINE = re.compile(rb"POST " + _PREDICT_PATH + rb" HTTP/1\.1\r\n")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110's field names
_NOT_VISIBLE = re.compile(rb"[^\t\x20-\x7e]")  # field values: visible ASCII, space and tab
#: Fields that make a request anything but plain: the parser's path takes it (and
#: Transfer-Encoding, see _body_length).
_NOT_PLAIN = frozenset({b"expect", b"upgrade"})

Headers = list[tuple[bytes, bytes]]


def _body_length(headers: Headers, max_body: int) -> int | None:
    """The body's length for the hot path: one Content-Length of digits, at most
    ``max_body``; None without one, with several, or with a Transfer-Encoding."""
    length = None
    for name, value in headers:
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif name == b"transfer-encoding":
            return None
    return length if length is not None and length <= max_body else None


def plain_predict(data: bytes, max_body: int) -> tuple[str, Headers, bytes, bool] | None:
    """(model, headers, body, keep-alive) when ``data`` is exactly one whole predict request
    written the plainest way, else None (then the parser reads it).

    Plain: the request line ``POST /v1/models/{name}/predict HTTP/1.1``; header fields of a
    token name, a colon and visible ASCII (spaces and tabs inside); one Content-Length of
    digits up to ``max_body``; no Transfer-Encoding, Expect or Upgrade, no ``upgrade`` in
    Connection; and the body's bytes, no fewer and no more. What passes reads the same to
    llhttp (uvicorn's parser), which accepts more; anything else, odd or malformed, is left to
    it, so its answers (400 included) stay the only ones.

    NOTE: the parser calls back into Python for each part of a request (message, URL, each
    header, headers done, body, message done). Read here instead, a single-row prediction of
    model A with JSON numbers went from 112 to 104-106 us in process (bench/rest_path.py).
    """
    request = _PREDICT_LINE.match(data)
    if request is None:
        return None
    start = request.end()
    end = data.find(b"\r\n\r\n", start - 2)
    if end < 0:
        return None
    headers: Headers = []
    keep_alive = True
    if end >= start:
        for line in data[start:end].split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if not colon or _TOKEN.fullmatch(name) is None or _NOT_VISIBLE.search(value):
                return None
            name, value = name.lower(), value.strip(b" \t")
            if name in _NOT_PLAIN:
                return None
            elif name == b"connection":
                options = {option.strip(b" \t") for option in value.lower().split(b",")}
                if b"upgrade" in options:
                    return None
                keep_alive = b"close" not in options
            headers.append((name, value))
    length = _body_length(headers, max_body)
    if length is None or len(data) != end + 4 + length:
        return None
    return request.group(1).decode("ascii"), headers, data[end + 4 :], keep_alive


Reply = Callable[[int, bytes, str, list[tuple[bytes, bytes]]], None]


class HotPath(Protocol):
    """What the protocol hands a recognised request to (see rest_api.PredictHotPath)."""

    #: Bodies over this many bytes are the framework's to refuse (413).
    max_body: int

    def handle(
        self,
        model: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        reply: Reply,
        *,
        alone: bool = False,
    ) -> None:
        """Answer through ``reply``, now or later; ``alone``: the request's connection is
        the server's only one."""


class _Event:
    """Stands in for the asyncio.Event uvicorn sets on a cycle; nothing waits on ours."""

    __slots__ = ()

    def set(self) -> None:
        pass


class _HotCycle:
    """The state uvicorn's protocol reads from ``self.cycle``, for a request answered here."""

    __slots__ = ("body", "disconnected", "keep_alive", "more_body", "response_complete")

    message_event = _Event()

    def __init__(self, keep_alive: bool) -> None:
        self.body: list[bytes] = []  # as the parser hands it over: usually one piece
        self.keep_alive = keep_alive
        self.more_body = True
        self.disconnected = False
        self.response_complete = False


class HotPathProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering plain predict requests without ASGI."""

    hot_path: HotPath  # set by protocol_class()
    #: loop.time() when the last answer went out with nothing else to do; None while a
    #: request is being read or answered.
    _idle_since: float | None = None

    # -- keep-alive --------------------------------------------------------------------------
    # NOTE: uvicorn arms a keep-alive timer after each answer and cancels it when the next
    # request's bytes arrive: a timer made and cancelled per request (~3 us of a single-row
    # prediction at concurrency 1). Here a connection keeps at most one timer, which on
    # expiry closes the connection if it has been idle for the whole timeout and otherwise
    # re-arms itself for the rest of it. Same rule: closed after that long with nothing to do.

    def _unset_keepalive_if_required(self) -> None:  # uvicorn: on new bytes, and answers
        self._idle_since = None

    def on_response_complete(self) -> None:
        if self.pipeline or self.transport.is_closing():
            super().on_response_complete()  # the next pipelined request, or nothing
            return
        self.server_state.total_requests += 1
        self.flow.resume_reading()
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self._keep_alive_due
            )

    def _keep_alive_due(self) -> None:
        self.timeout_keep_alive_task = None
        if self._idle_since is None:
            return  # busy; the answer re-arms
        left = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._keep_alive_due)
        else:
            self.timeout_keep_alive_handler()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None

    # -- the hot path ------------------------------------------------------------------------

    #: A request's first bytes have reached the parser and its last not yet: the parser
    #: holds part of it, and every byte that follows is its to read.
    _in_message = False

    def data_received(self, data: bytes) -> None:
        previous = self.cycle
        if (
            not self._in_message
            and (previous is None or previous.response_complete)
            and not self.root_path
            and not self.transport.is_closing()
            and (plain := plain_predict(data, min(HOT_BODY_LIMIT, self.hot_path.max_body)))
        ):
            self._unset_keepalive_if_required()
            model, headers, body, keep_alive = plain
            self._answer_hot(model, headers, body, _HotCycle(keep_alive))
            return
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._in_message = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        model = self._hot_model()
        if model is None:
            super().on_headers_complete()
            return
        self.scope["method"] = "POST"
        self.cycle = _HotCycle(self.parser.should_keep_alive())  # type: ignore[assignment]
        self._hot_model_name = model

    def _hot_model(self) -> str | None:
        """The model named by a plain predict request, else None."""
        previous = self.cycle
        if (
            (previous is not None and not previous.response_complete)
            or self.expect_100_continue
            or self.root_path
            or self.parser.get_method() != b"POST"
            or self.parser.get_http_version() != "1.1"
            or self.parser.should_upgrade()
        ):
            return None
        match = _PREDICT_URL.fullmatch(self.url)
        if match is None:
            return None
        if _body_length(self.headers, min(HOT_BODY_LIMIT, self.hot_path.max_body)) is None:
            return None
        return match.group(1).decode("ascii")

    def on_body(self, body: bytes) -> None:
        cycle: object = self.cycle
        if isinstance(cycle, _HotCycle):
            cycle.body.append(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        cycle: object = self.cycle
        if not isinstance(cycle, _HotCycle):
            super().on_message_complete()
            return
        body = cycle.body[0] if len(cycle.body) == 1 else b"".join(cycle.body)
        cycle.body = []
        self._answer_hot(self._hot_model_name, self.headers, body, cycle)

    def _answer_hot(self, model: str, headers: Headers, body: bytes, cycle: _HotCycle) -> None:
        self.cycle = cycle  # type: ignore[assignment]
        cycle.more_body = False
        # NOTE: a request pipelined behind this one is parsed from the same buffer before
        # this one is answered; uvicorn queues it because this cycle is not complete. With
        # one connection open, no other request can join this one's batch in this turn of the
        # loop: it may be answered at once (see Dispatcher.submit_predict).
        self.hot_path.handle(
            model,
            headers,
            body,
            lambda *a: self._hot_reply(cycle, *a),
            alone=len(self.connections) == 1,
        )

    def _hot_reply(
        self,
        cycle: _HotCycle,
        status: int,
        body: bytes,
        request_id: str,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        if cycle.response_complete:
            return
        cycle.response_complete = True
        if cycle.disconnected or self.transport.is_closing():
            return
        head = [STATUS_LINE[status]]
        for name, value in (*self.server_state.default_headers, *headers):
            head += [name, b": ", value, b"\r\n"]
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\nx-request-id: %s\r\n"
            % (len(body), request_id.encode("latin-1"))
        )
        if not cycle.keep_alive:
            head.append(b"connection: close\r\n")
        head += [b"\r\n", body]
        self.transport.write(b"".join(head))
        if not cycle.keep_alive:
            self.transport.close()
            return
        self.on_response_complete()


def protocol_class(hot_path: HotPath) -> type[HotPathProtocol]:
    """A protocol class for uvicorn.Config(http=...) bound to ``hot_path``."""
    return type("PropserveHttpProtocol", (HotPathProtocol,), {"hot_path": hot_path})
