"""service.logs: one JSON object per line, fields passed as data, reserved keys kept."""

from __future__ import annotations

import json
import logging

import pytest

from propserve import wire
from propserve.service.logs import JsonFormatter, request_id


def formatted(message: str, *args: object, **extra: object) -> dict[str, object]:
    record = logging.LogRecord("propserve.test", logging.INFO, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed: dict[str, object] = json.loads(line)
    return parsed


def test_an_event_with_fields() -> None:
    entry = formatted("model.saved", model="m", version=3, reason="a b=c")
    assert entry["event"] == "model.saved" and entry["level"] == "info"
    assert entry["logger"] == "propserve.test"
    assert (entry["model"], entry["version"], entry["reason"]) == ("m", 3, "a b=c")


def test_fields_never_replace_the_lines_own_keys() -> None:
    entry = formatted("request.failed", level="critical", event="server.stopped", ts="x")
    assert entry["level"] == "info" and entry["event"] == "request.failed"
    assert entry["field_level"] == "critical" and entry["field_event"] == "server.stopped"
    assert entry["ts"] != "x"


def test_text_from_other_libraries_stays_whole() -> None:
    entry = formatted("connection %s level=error event=x closed", "1.2.3.4")
    assert entry["event"] == "log"
    assert entry["message"] == "connection 1.2.3.4 level=error event=x closed"
    assert entry["level"] == "info"


@pytest.mark.parametrize(
    ("given", "kept"),
    [("r-1.A_b", True), ("x" * 128, True), ("x" * 129, False), ("a b", False), (None, False)],
)
def test_request_ids_follow_the_wire_rule(given: str | None, kept: bool) -> None:
    chosen = request_id(given)
    assert wire.valid_request_id(chosen)
    assert (chosen == given) is kept
