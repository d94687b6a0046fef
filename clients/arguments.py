"""The clients' arguments, checked and put in the wire's terms before anything is sent.

All four clients call these, so a bad argument raises the same InvalidArgument on every
transport, without a round trip. The rules are the wire's (propserve.wire): versions and
labels, per-model settings, tensor dtypes. What only the model knows (its input width,
its classes) is the server's to check.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from propserve import wire
from propserve.clients.errors import InvalidArgument

_INT64_MAX = np.iinfo(np.int64).max
#: The wire's name of each of its dtypes (as numpy dtypes).
DTYPE_NAMES: dict[np.dtype[Any], str] = {np.dtype(code): name for name, code in wire.DTYPES.items()}


def tensor(value: Any, what: str) -> NDArray[Any]:
    """``value`` (an array, or nested lists of numbers) as a C-ordered little-endian array of
    one of the wire's dtypes: booleans and float16 as float32, wider floats as float64,
    integers as int32 when they surely fit and int64 otherwise."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        # NOTE: a ragged list (rows of different lengths) lands here.
        raise InvalidArgument(
            f"{what} must be a rectangular array of numbers: {str(exc).split('. ')[0]}"
        ) from None
    kind, size = array.dtype.kind, array.dtype.itemsize
    if kind == "b" or (kind == "f" and size <= 4):
        name = "float32"
    elif kind == "f":
        name = "float64"
    elif kind == "i":
        name = "int32" if size <= 4 else "int64"
    elif kind == "u":
        name = "int32" if size <= 2 else "int64"
        if size == 8 and array.size and array.max() > _INT64_MAX:
            raise InvalidArgument(f"{what} hold values out of the range of int64")
    else:
        raise InvalidArgument(f"{what}: cannot send an array of dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=wire.DTYPES[name])


def to_json(value: Any, what: str = "the request") -> str:
    """JSON text of ``value``; numpy values are written as numbers and lists, and numbers
    JSON cannot carry (NaN, the infinities) are refused, never written as null."""
    try:
        return json.dumps(value, default=_plain, allow_nan=False, separators=(",", ":"))
    except ValueError:
        raise InvalidArgument(
            f"a number in {what} is not finite (NaN or infinite), which JSON cannot carry"
        ) from None
    except TypeError as exc:
        raise InvalidArgument(f"{what} cannot be written as JSON: {exc}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def version(value: Any) -> int:
    """A version number: an integer from 1 to wire.MAX_VERSION."""
    value = _plain_int(value)
    problem = wire.source_problem(value, None)
    if value is None or problem:
        raise InvalidArgument(problem or "a version is needed")
    return int(value)


def source(version: Any, label: Any) -> tuple[int | None, str | None]:
    """Which weights answer: a version, a label, or neither (the server's default)."""
    version = _plain_int(version)
    problem = wire.source_problem(version, label)
    if problem:
        raise InvalidArgument(problem)
    return version, label


def label(value: Any) -> str:
    problem = wire.name_problem(value, "label")
    if problem:
        raise InvalidArgument(problem)
    return str(value)


def settings(retain: Any, autosave_every: Any) -> dict[str, int]:
    """The per-model settings given (None: left as they are, or the server's default)."""
    given = {"retain": _plain_int(retain), "autosave_every": _plain_int(autosave_every)}
    chosen = {key: value for key, value in given.items() if value is not None}
    problem = wire.settings_problem(chosen)
    if problem:
        raise InvalidArgument(problem)
    return chosen


def weights(value: Any) -> bytes | None:
    """A weights file's bytes: bytes-like, or a path (str or os.PathLike) to read."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    elif isinstance(value, str | os.PathLike):
        try:
            data = Path(value).read_bytes()
        except OSError as exc:
            raise InvalidArgument(f"cannot read weights file {value}: {exc.strerror}") from None
    else:
        raise InvalidArgument(f"weights must be bytes or a file path, got {type(value).__name__}")
    if not data:
        raise InvalidArgument("the weights are empty")
    return data


def layout(value: Any) -> str:
    if value not in wire.WEIGHT_LAYOUTS:
        raise InvalidArgument(
            f"layout must be one of {', '.join(wire.WEIGHT_LAYOUTS)}, got {value!r:.40}"
        )
    return str(value)


def export(layout: Any, format: Any) -> tuple[str, str]:
    problem = wire.export_problem(layout, format)
    if problem:
        raise InvalidArgument(problem)
    return str(layout), str(format)


def history_range(
    since: Any, until: Any, every: Any, limit: Any
) -> tuple[int | None, int | None, int, int | None]:
    """(since, until, every, limit) of a history request, by wire.history_problem's rules
    (every None: 1; limit None: the server's default)."""
    since, until, every, limit = (_plain_int(v) for v in (since, until, every, limit))
    problem = wire.history_problem(since, until, every, limit)
    if problem:
        raise InvalidArgument(problem)
    return since, until, every or 1, limit


def learning_rate(value: Any) -> float | None:
    """A finite number, or None for the model's own. Refused here because JSON cannot carry
    NaN or the infinities at all, and no transport should send what one cannot."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidArgument(f"learning_rate must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidArgument(f"learning_rate must be a finite number, got {number}")
    return number


def _plain_int(value: Any) -> Any:
    """numpy integers as Python ints (the wire's rules take ints); anything else as it is."""
    return int(value) if isinstance(value, np.integer) else value
