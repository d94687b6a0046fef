"""Request bodies whose tensor is written out as JSON numbers, read without a Python object per
number.

orjson builds a Python float for every number, which numpy then reads back one at a time, and
a large batch leaves that many floats' worth of the interpreter's small-object memory to
fragment; simdjson parses into its own tape and copies an array's numbers into one buffer
(see docs/performance.md#json-numbers).

Only the common case takes this path: a JSON object whose ``key`` member is a rectangular
rank-2 array of numbers. For anything else (invalid JSON, another layout, other kinds of
values, duplicate keys...) :func:`object_with_matrix` answers None and the general parser
takes the body, so both paths accept and refuse the same bodies, and the general one words
the errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import simdjson
from numpy.typing import NDArray


def object_with_matrix(raw: bytes, key: str) -> dict[str, Any] | None:
    """The JSON object in ``raw``, its ``key`` member a float64 array of shape (rows, columns);
    None unless ``raw`` is a JSON object, without duplicate keys, whose ``key`` member is a
    non-empty rectangular array of arrays of numbers."""
    if not _array_follows(raw, key):
        return None
    try:
        return _read(raw, key)
    except (ValueError, TypeError, RuntimeError, KeyError):
        # Not JSON, values that are not numbers, or keys simdjson cannot look up (a NUL in
        # a key): the general parser decides.
        return None


@dataclass(frozen=True)
class Numbers:
    """A tensor's JSON data read as numbers: flat float64 values in row-major order, and
    for rows of equal length (nested data), their count and length."""

    values: NDArray[np.float64]
    rows: tuple[int, int] | None


def infer_body(raw: bytes) -> dict[str, Any] | None:
    """An Open Inference Protocol infer body (a JSON object) with each input's ``data``, when
    it holds only numbers, as :class:`Numbers`; None when the general parser must decide (not
    JSON, duplicate keys, a NUL in a key). Data holding anything but numbers, or a number
    beyond float64, stays a list for the general path to refuse in its words."""
    try:
        doc = simdjson.Parser().parse(raw)
        if not isinstance(doc, simdjson.Object):
            return None
        return _infer_members(doc)
    except (ValueError, TypeError, RuntimeError, KeyError):
        return None


def _infer_members(doc: Any) -> dict[str, Any] | None:
    keys = list(doc.keys())
    if len(set(keys)) != len(keys):
        return None
    body = {name: _plain(doc[name]) for name in keys if name != "inputs"}
    if "inputs" not in keys:
        return body
    inputs = doc["inputs"]
    if not isinstance(inputs, simdjson.Array):
        body["inputs"] = _plain(inputs)
        return body
    tensors: list[Any] = []
    for tensor in inputs:
        if not isinstance(tensor, simdjson.Object):
            tensors.append(_plain(tensor))
            continue
        names = list(tensor.keys())
        if len(set(names)) != len(names):
            return None
        entry = {name: _plain(tensor[name]) for name in names if name != "data"}
        if "data" in names:
            entry["data"] = _numbers(tensor["data"])
        tensors.append(entry)
    body["inputs"] = tensors
    return body


def _numbers(data: Any) -> Any:
    """``data`` as :class:`Numbers` if it is an array of numbers, flat or rows of one length
    (an array within a row flattens into it, as the general path reads it too); else as the
    general parser gives it."""
    if not isinstance(data, simdjson.Array):
        return _plain(data)
    rows = None
    if len(data) and isinstance(data[0], simdjson.Array):
        lengths = {len(row) if isinstance(row, simdjson.Array) else -1 for row in data}
        if len(lengths) != 1 or -1 in lengths:
            return _plain(data)
        rows = (len(data), lengths.pop())
    try:
        values = np.frombuffer(data.as_buffer(of_type="d"), dtype=np.float64)
    except (TypeError, ValueError):
        return _plain(data)  # booleans, strings, nulls, objects, or a number beyond float64
    if rows is not None and values.size != rows[0] * rows[1]:
        return _plain(data)  # arrays within the rows
    return Numbers(values, rows)


def _array_follows(raw: bytes, key: str) -> bool:
    """Whether the first ``"key"`` in ``raw`` is followed by an array: a cheap look that spares
    base64 and flat tensors (the clients' default) a parse they would not use. A wrong guess
    costs only time: a parse that declines, or the general path."""
    name = b'"' + key.encode() + b'"'
    at = raw.find(name)
    if at < 0:
        return False
    return raw[at + len(name) : at + len(name) + 64].lstrip(b" \t\r\n:").startswith(b"[")


def _read(raw: bytes, key: str) -> dict[str, Any] | None:
    # NOTE: a parser per call (cheap): the objects it hands out stay valid only until the
    # parser's next document, which would tie calls together.
    doc = simdjson.Parser().parse(raw)
    if not isinstance(doc, simdjson.Object):
        return None
    keys = list(doc.keys())
    if key not in keys or len(set(keys)) != len(keys):
        return None  # duplicates: the general parser keeps the last, this one the first
    matrix = doc[key]
    if not isinstance(matrix, simdjson.Array) or len(matrix) == 0:
        return None
    rows, columns = len(matrix), None
    for row in matrix:
        if not isinstance(row, simdjson.Array):
            return None
        if columns is None:
            columns = len(row)
        elif len(row) != columns:
            return None
    body = {name: _plain(doc[name]) for name in keys if name != key}
    # NOTE: the buffer below flattens nested arrays silently, so the matrix must hold just its
    # own arrays, the outer one and one per row: the body's '[' are counted against those and
    # the other members' arrays. A '[' in a string (which an escape can also write) or in a
    # key falls back rather than be told apart from one in the matrix.
    others = _arrays_or_none([*keys, *body.values()])
    if not columns or others is None:
        return None
    expected = rows + 1 + others
    if _open_brackets(raw, expected) != expected:
        return None
    values = np.frombuffer(matrix.as_buffer(of_type="d"), dtype=np.float64)
    if values.size != rows * columns:
        return None
    body[key] = values.reshape(rows, columns)
    return body


def _arrays_or_none(values: list[Any]) -> int | None:
    """How many arrays ``values`` hold, nested ones included; None when a string holds '['."""
    count = 0
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if "[" in value:
                return None
        elif isinstance(value, list):
            count += 1
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value)
            stack.extend(value.values())
    return count


def _open_brackets(raw: bytes, limit: int) -> int:
    """How many '[' ``raw`` holds, counted up to ``limit + 1``."""
    # NOTE: one find per bracket: find scans with memchr, and a body holds few brackets
    # (rows + 1 for the matrix), so this beats counting every byte.
    count, at = 0, raw.find(b"[")
    while at >= 0 and count <= limit:
        count += 1
        at = raw.find(b"[", at + 1)
    return count


def _plain(value: Any) -> Any:
    """A member as the general parser gives it: dicts, lists and scalars."""
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value
