"""The server's typed errors, one class per wire code (propserve.wire).

The core and the store raise these and nothing framework-specific. Each class carries its
wire code; a subclass inherits its parent's, so a transport's status for an error is
``exc.code.grpc`` / ``exc.code.http`` whatever the class, and a new subclass can never turn
into an internal error by accident. Messages are written for the user of the API: they say
what was wrong and, where it helps, what would be accepted.
"""

from __future__ import annotations

from typing import ClassVar

from propserve import wire


class PropserveError(Exception):
    """Base class of every error the core raises on purpose."""

    code: ClassVar[wire.Code] = wire.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(PropserveError):
    """A model, version or label that does not exist."""

    code = wire.NOT_FOUND


class InvalidArgument(PropserveError):
    """Input that can never succeed as given: bad name, shape, dtype, spec, value."""

    code = wire.INVALID_ARGUMENT


class AlreadyExists(PropserveError):
    """Creating something whose name is taken."""

    code = wire.ALREADY_EXISTS


class FailedPrecondition(PropserveError):
    """The request is well-formed but the system is not in a state to carry it out
    (a refused diverging step, a store locked by another writer)."""

    code = wire.FAILED_PRECONDITION


class ResourceExhausted(PropserveError):
    """Too large: message, rows, elements, parameters, metadata."""

    code = wire.RESOURCE_EXHAUSTED


class TooBusy(ResourceExhausted):
    """More work waiting than the server accepts (queued prediction rows, calls waiting for
    a worker); nothing was done, and the same request may succeed later. The transports send
    the hint ``wire.RETRY_AFTER_MS``."""

    code = wire.TOO_BUSY


class Unauthenticated(PropserveError):
    """No credentials, or credentials that are not known."""

    code = wire.UNAUTHENTICATED


class PermissionDenied(PropserveError):
    """Known credentials without the role the operation needs."""

    code = wire.PERMISSION_DENIED


class Unavailable(PropserveError):
    """The server is shutting down or not ready."""

    code = wire.UNAVAILABLE


class DataLoss(PropserveError):
    """Stored data that fails verification (a checksum mismatch, an unreadable file).

    Never served; reported with the model and version it concerns."""

    code = wire.DATA_LOSS


def code_of(exc: BaseException) -> wire.Code:
    """The wire code that answers ``exc``: its own for the core's errors, ``internal`` for
    anything else (a bug)."""
    return exc.code if isinstance(exc, PropserveError) else wire.INTERNAL
