"""A request's context, the same on every transport: draining, authorisation, the request id,
timing, metrics, and the log line of a failure."""

from __future__ import annotations

import asyncio
import logging
import time
from types import TracebackType
from typing import TYPE_CHECKING

from propserve.service.errors import PropserveError, Unavailable, code_of
from propserve.service.logs import request_id as valid_request_id

if TYPE_CHECKING:
    from propserve.service.dataplane import DataPlane

log = logging.getLogger("propserve.requests")


class Call:
    """One request's context, entered for its whole life (a stream's included)::

        with plane.call("Predict", "grpc", request_id=..., authorization=...) as call:
            ...

    Entering refuses the call while the server drains (Unavailable) and authorises it; the
    exit counts it by operation, transport and wire code, with its latency, and logs a
    failure (a bug with its traceback). An adapter that answered an error without raising it
    through the ``with`` block records it with :meth:`fail`."""

    __slots__ = (
        "authorization",
        "error",
        "operation",
        "plane",
        "protocol",
        "request_id",
        "start",
        "transport",
    )

    def __init__(
        self,
        plane: DataPlane,
        operation: str,
        transport: str,
        request_id: str | None,
        authorization: str | None,
        protocol: str = "propserve",
    ) -> None:
        self.plane = plane
        self.operation = operation
        self.transport = transport
        self.protocol = protocol
        self.request_id = valid_request_id(request_id)
        self.authorization = authorization
        self.error: BaseException | None = None
        self.start = time.perf_counter()

    def __enter__(self) -> Call:
        plane = self.plane
        if plane.draining:
            self._finish(Unavailable("the server is shutting down"))
            raise Unavailable("the server is shutting down")
        try:
            plane.auth.authorize(self.authorization, self.operation)
        except PropserveError as exc:
            self._finish(exc)
            raise
        plane.in_flight += 1
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        plane = self.plane
        plane.in_flight -= 1
        if not plane.in_flight and plane.idle is not None:
            plane.idle.set()
        self._finish(exc or self.error)

    def fail(self, exc: BaseException) -> None:
        """Record ``exc`` as the call's outcome, answered by the adapter."""
        self.error = exc

    def _finish(self, exc: BaseException | None) -> None:
        plane = self.plane
        plane.metrics.observe(
            self.operation,
            self.transport,
            "ok" if exc is None else code_of(exc).name,
            time.perf_counter() - self.start,
            protocol=self.protocol,
        )
        if exc is None or isinstance(exc, asyncio.CancelledError):
            return
        fields = {
            "transport": self.transport,
            "protocol": self.protocol,
            "operation": self.operation,
            "request_id": self.request_id,
        }
        if isinstance(exc, PropserveError):
            log.info(
                "request.failed", extra=fields | {"code": exc.code.name, "reason": exc.message}
            )
        else:
            log.error("request.internal_error", extra=fields, exc_info=exc)


def internal_message(call: Call) -> str:
    """What a client hears of a bug: where to find it in the logs, and nothing else."""
    return f"internal error (request id {call.request_id})"
