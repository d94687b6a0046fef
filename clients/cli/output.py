"""How the verbs print: aligned tables for people, JSON (``--json``) for scripts."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np

from propserve.clients.types import Model, Version


def print_json(value: Any, stream: TextIO | None = None) -> None:
    print(json.dumps(value, indent=2, default=_json_default), file=stream or sys.stdout)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def model_json(model: Model) -> dict[str, Any]:
    return dataclasses.asdict(model)


def version_json(version: Version) -> dict[str, Any]:
    return dataclasses.asdict(version)


def record_json(record: Any) -> dict[str, Any]:
    """A wire record (a dataclass) as a JSON object."""
    return dataclasses.asdict(record)


def timestamp(seconds: float) -> str:
    """Seconds since the epoch as UTC date and time."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [str(c).ljust(w) for c, w in zip(cells[:-1], widths[:-1], strict=True)]
        return "  ".join([*padded, str(cells[-1])]).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def labels(labels: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"
