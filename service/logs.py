"""Structured logs: one JSON object per line on stderr.

Our log calls name an event and pass their fields as data, never inside the text::

    log.info("version.saved", extra={"model": name, "version": 3})

gives ``{"ts", "level", "logger", "event": "version.saved", "model": ..., "version": 3}``.
A field can never replace ``ts``, ``level``, ``logger``, ``event`` or ``exc``, whatever a
client managed to put into it. Lines from other libraries keep their text in ``message``.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time

from propserve import wire

#: Keys of every line, which no field may take.
RESERVED = frozenset({"ts", "level", "logger", "event", "message", "exc"})
#: A LogRecord's own attributes: anything else on a record came as a field (``extra=``).
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "event", ...fields, "exc"?}."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES}
        if fields or (isinstance(record.msg, str) and not record.args and _is_event(record.msg)):
            entry["event"] = str(record.msg)
        else:  # another library's line: its text, whole
            entry["event"] = "log"
            entry["message"] = record.getMessage()
        for key, value in fields.items():
            entry[key if key not in RESERVED else f"field_{key}"] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _is_event(text: str) -> bool:
    """Whether ``text`` is an event name like ``server.ready``: one dotted word."""
    return bool(text) and "." in text and all(part.isidentifier() for part in text.split("."))


def configure(level: str = "info") -> None:
    """JSON lines on stderr for every logger, Python's warnings included."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)


def request_id(given: str | None) -> str:
    """The client's request id when it follows the wire's rule (wire.REQUEST_ID_PATTERN),
    else a fresh one: 16 hex digits. NOTE: ids only need to be unique enough to find a
    request in the logs; os.urandom would cost a system call per request."""
    if given is not None and wire.valid_request_id(given):
        return given
    return f"{random.getrandbits(64):016x}"
