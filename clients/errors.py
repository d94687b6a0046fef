"""The clients' exceptions: one type per wire code (propserve.wire), carrying the server's
message and the request's id.

Transport exceptions (grpc.RpcError, httpx errors) never escape a client; they become these.
"""

from __future__ import annotations

import copy
from typing import ClassVar, Self

from propserve import wire
from propserve.wire import StepResult


class ClientError(Exception):
    """An error answered by the server, or the transport failing to reach it.

    ``code`` is the wire code (``code.name`` e.g. "not_found"); ``status`` the transport's
    own (the gRPC status name or the HTTP status), for logs; ``request_id`` the id under
    which the server logged the request, when it answered (None: the server did not, e.g.
    an argument refused before sending, or no answer at all).

    An error that stopped a ``train`` call says so in its message ("batches 0–4 applied
    (step 6 → 11); stopped at batch 5: ..."); ``applied`` then holds the results of the
    batches that stayed applied (the failing batch is number ``len(applied)``) and
    ``reason`` the message without that context. Otherwise ``applied`` is None and
    ``reason`` the message.
    """

    code: ClassVar[wire.Code] = wire.INTERNAL

    def __init__(
        self, message: str, *, status: str | int | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.request_id = request_id
        self.reason = message
        self.applied: tuple[StepResult, ...] | None = None

    def restated(self, message: str) -> Self:
        """This error with another message (the same one with more context): its type,
        status, request id and the rest are kept."""
        error = copy.copy(self)
        error.message = message
        error.args = (message,)
        return error


class InvalidArgument(ClientError):
    code = wire.INVALID_ARGUMENT


class NotFound(ClientError):
    code = wire.NOT_FOUND


class AlreadyExists(ClientError):
    code = wire.ALREADY_EXISTS


class FailedPrecondition(ClientError):
    """The server refused in its current state, e.g. a diverging training step."""

    code = wire.FAILED_PRECONDITION


class ResourceExhausted(ClientError):
    """Over a limit: a message, rows or parameters too large, or (TooBusy) too much work."""

    code = wire.RESOURCE_EXHAUSTED


class TooBusy(ResourceExhausted):
    """The server refused the call for having too much work waiting; nothing was done.
    Idempotent calls retry it, waiting at least ``retry_after`` seconds (the server's hint)."""

    code = wire.TOO_BUSY

    def __init__(
        self,
        message: str,
        *,
        status: str | int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, request_id=request_id)
        self.retry_after = retry_after


class Unauthenticated(ClientError):
    code = wire.UNAUTHENTICATED


class PermissionDenied(ClientError):
    code = wire.PERMISSION_DENIED


class Unavailable(ClientError):
    """The server is unreachable, shutting down, or not ready."""

    code = wire.UNAVAILABLE


class DataLoss(ClientError):
    code = wire.DATA_LOSS


class DeadlineExceeded(ClientError):
    code = wire.DEADLINE_EXCEEDED


class Internal(ClientError):
    code = wire.INTERNAL


def _ladder(root: type[ClientError]) -> list[type[ClientError]]:
    found = [root]
    for sub in root.__subclasses__():
        found += _ladder(sub)
    return found


#: The exception class of each wire code.
BY_CODE: dict[str, type[ClientError]] = {
    cls.code.name: cls for cls in _ladder(ClientError) if cls is not ClientError
}


def from_code(
    code: str,
    message: str,
    *,
    status: str | int | None = None,
    request_id: str | None = None,
    retry_after: float | None = None,
) -> ClientError:
    """The exception for wire code ``code`` (an unknown code gives a plain ClientError)."""
    cls = BY_CODE.get(code, ClientError)
    if issubclass(cls, TooBusy):
        return cls(message, status=status, request_id=request_id, retry_after=retry_after)
    return cls(message, status=status, request_id=request_id)
