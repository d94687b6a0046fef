"""Structured logs: one JSON object per line on stderr."""

from __future__ import annotations

import json
import logging
import random
import sys
import time


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "event", ...}: the message's first word is the event name and
    its ``key=value`` pairs become fields; a traceback goes in "exc"."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        event, _, rest = message.partition(" ")
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": event,
        }
        for part in rest.split(" "):
            key, sep, value = part.partition("=")
            if sep and key.isidentifier():
                entry[key] = value.strip("'\"")
            elif part:
                entry.setdefault("text", "")
                entry["text"] = f"{entry['text']} {part}".strip()
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def new_request_id() -> str:
    """16 hex digits. NOTE: ids only need to be unique enough to find a request in the logs;
    os.urandom would cost a system call per request."""
    return f"{random.getrandbits(64):016x}"
