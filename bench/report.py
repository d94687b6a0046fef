"""Reporting of the benchmarks' result rows (dicts): fixed-width tables and JSON lines."""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TextIO

from bench import common


def machine() -> dict[str, Any]:
    """The machine as the service benchmarks report it: common.machine(), grpcio, kernel."""
    import grpc  # noqa: PLC0415

    return {**common.machine(), "grpcio": grpc.__version__, "kernel": platform.release()}


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
        f"numpy {info['numpy']}, grpcio {info.get('grpcio', '?')}, kernel {info.get('kernel', '?')}"
    )


# -- cell formats (None and NaN read "-") ----------------------------------------------------


def _number(value: float | None, spec: str, scale: float = 1.0) -> str:
    if value is None or math.isnan(value):
        return "-"
    return format(value * scale, spec)


def ms(value: float | None) -> str:
    """Seconds as milliseconds."""
    return _number(value, ".3f", 1e3)


def us(value: float | None) -> str:
    """Seconds as whole microseconds."""
    return _number(value, ".0f", 1e6)


def rate(value: float | None) -> str:
    """A count per second, with thousands separators."""
    return _number(value, ",.0f")


def ratio(value: float | None) -> str:
    return _number(value, ".3f")


def percent(value: float | None) -> str:
    """A fraction as a signed percentage."""
    text = _number(value, "+.1f", 100)
    return text if text == "-" else f"{text}%"


def verdict(met: bool | None) -> str:
    return "" if met is None else ("met" if met else "MISSED")


# -- tables and JSON lines -------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column: its title, width, and how a row's cell reads (right-aligned unless
    ``left``)."""

    title: str
    width: int
    cell: Callable[[dict[str, Any]], str]
    left: bool = False

    def fit(self, text: str) -> str:
        return f"{text:<{self.width}}" if self.left else f"{text:>{self.width}}"


def cell_of(key: str, fmt: Callable[[Any], str] = str) -> Callable[[dict[str, Any]], str]:
    """A cell reading ``row[key]`` through ``fmt`` ("-" where the row has no such key)."""

    def cell(row: dict[str, Any]) -> str:
        value = row.get(key)
        return "-" if value is None else fmt(value)

    return cell


def cell_in(group: str, key: str, fmt: Callable[[Any], str]) -> Callable[[dict[str, Any]], str]:
    """A cell reading ``row[group][key]`` through ``fmt`` (rows holding one dict per side)."""
    return lambda row: fmt(row[group][key])


def table(columns: list[Column], rows: Iterable[dict[str, Any]]) -> list[str]:
    """A header, a rule and one line per row."""
    header = " ".join(c.fit(c.title) for c in columns).rstrip()
    lines = [header, "-" * len(header)]
    lines += [" ".join(c.fit(c.cell(r)) for c in columns).rstrip() for r in rows]
    return lines


def print_table(columns: list[Column], rows: Iterable[dict[str, Any]]) -> None:
    print("\n".join(table(columns, rows)))


def print_json_lines(
    info: dict[str, Any], rows: Iterable[dict[str, Any]], out: TextIO | None = None
) -> None:
    """{"machine": info} on the first line, then one JSON object per row."""
    print(json.dumps({"machine": info}), file=out)
    for r in rows:
        print(json.dumps(r), file=out)
