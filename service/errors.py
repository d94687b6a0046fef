"""The core's typed errors.

The core and the store raise these and nothing framework-specific; each transport adapter
maps them to its own status codes in exactly one table. Messages are written for the user
of the API: they say what was wrong and, where it helps, what would be accepted.
"""

from __future__ import annotations


class PropserveError(Exception):
    """Base class of every error the core raises on purpose."""

    code: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(PropserveError):
    """A model, version or label that does not exist."""

    code = "not_found"


class InvalidArgument(PropserveError):
    """Input that can never succeed as given: bad name, shape, dtype, spec, value."""

    code = "invalid_argument"


class AlreadyExists(PropserveError):
    """Creating something whose name is taken."""

    code = "already_exists"


class FailedPrecondition(PropserveError):
    """The request is well-formed but the system is not in a state to carry it out
    (a refused diverging step, a store opened read-only, a store locked by another writer)."""

    code = "failed_precondition"


class ResourceExhausted(PropserveError):
    """Too large (message, rows, parameters, metadata) or too busy."""

    code = "resource_exhausted"


class TooBusy(ResourceExhausted):
    """More work waiting than the server accepts (queued prediction rows, calls waiting for
    a worker); nothing was done, and the same request may succeed later. The transports tell
    clients when to try again: ``Retry-After`` on REST, ``retry-after-ms`` trailing metadata
    on gRPC."""

    #: The wait suggested to clients.
    retry_after = 0.1


class Unauthenticated(PropserveError):
    """No credentials, or credentials that are not known."""

    code = "unauthenticated"


class PermissionDenied(PropserveError):
    """Known credentials without the role the operation needs."""

    code = "permission_denied"


class Unavailable(PropserveError):
    """The server is shutting down or not ready."""

    code = "unavailable"


class DataLoss(PropserveError):
    """Stored data that fails verification (a checksum mismatch, an unreadable file).

    Never served; reported with the model and version it concerns."""

    code = "data_loss"
