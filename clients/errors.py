"""The clients' exceptions: one type per server error code, carrying the server's message.

Transport exceptions (grpc.RpcError, httpx errors) never escape a client; they become these.
"""

from __future__ import annotations


class ClientError(Exception):
    """An error answered by the server, or the transport failing to reach it.

    ``code`` is the server's code name (e.g. "not_found"); ``status`` the transport's own
    (the gRPC status name or the HTTP status), for logs.
    """

    code = "unknown"

    def __init__(self, message: str, *, status: str | int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class NotFound(ClientError):
    code = "not_found"


class InvalidArgument(ClientError):
    code = "invalid_argument"


class AlreadyExists(ClientError):
    code = "already_exists"


class FailedPrecondition(ClientError):
    """The server refused in its current state, e.g. a diverging training step."""

    code = "failed_precondition"


class ResourceExhausted(ClientError):
    """Over a limit: a message, rows or parameters too large, or (TooBusy) too much work."""

    code = "resource_exhausted"


class TooBusy(ResourceExhausted):
    """The server refused the call for having too much work waiting; nothing was done.
    Idempotent calls retry it, waiting at least ``retry_after`` seconds (the server's hint)."""

    def __init__(
        self, message: str, *, status: str | int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class Unauthenticated(ClientError):
    code = "unauthenticated"


class PermissionDenied(ClientError):
    code = "permission_denied"


class Unavailable(ClientError):
    """The server is unreachable, shutting down, or not ready."""

    code = "unavailable"


class DeadlineExceeded(ClientError):
    code = "deadline_exceeded"


class DataLoss(ClientError):
    code = "data_loss"


class Internal(ClientError):
    code = "internal"


BY_CODE: dict[str, type[ClientError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        InvalidArgument,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
        DataLoss,
        Internal,
    )
}


def from_code(code: str, message: str, status: str | int | None = None) -> ClientError:
    return BY_CODE.get(code, ClientError)(message, status=status)
