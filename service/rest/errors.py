"""REST answers for errors: ``{"error": {"code", "message"}}`` with the wire code's status.

One mapping for every REST path (the predict endpoint, the framework's routes and its own
refusals): the status is the wire code's (propserve.wire), a refusal for being too busy
carries the retry hint, and a bug is answered without internals.
"""

from __future__ import annotations

import math

import orjson

from propserve import wire
from propserve.service.calls import Call, internal_message
from propserve.service.errors import PropserveError, TooBusy

Headers = list[tuple[bytes, bytes]]

JSON = (b"content-type", b"application/json")
_RETRY_AFTER_SECONDS = str(max(1, math.ceil(wire.RETRY_AFTER_MS / 1000))).encode()


def error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


def error_answer(exc: BaseException, call: Call | None) -> tuple[int, bytes, Headers]:
    """(status, body, headers) answering ``exc``; ``call`` names the request id of a bug."""
    if isinstance(exc, PropserveError):
        headers: Headers = [JSON]
        if isinstance(exc, TooBusy):
            # Retry-After counts whole seconds; our clients read the milliseconds.
            headers += [
                (b"retry-after", _RETRY_AFTER_SECONDS),
                (wire.RETRY_AFTER_MS_KEY.encode(), str(wire.RETRY_AFTER_MS).encode()),
            ]
        return exc.code.http, error_body(exc.code.name, exc.message), headers
    message = internal_message(call) if call is not None else "internal error"
    return 500, error_body(wire.INTERNAL.name, message), [JSON]
