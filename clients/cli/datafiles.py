"""Reading the CLI's local data files: .npz, .npy, .csv and JSON, for training and predicting.

Everything here is local: a file that cannot be read or does not fit raises UsageError with a
one-line message naming the file (the CLI's exit code 2).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray


class UsageError(Exception):
    """A local problem: a bad file, spec or combination of options (exit code 2)."""


def _read_csv(path: Path) -> tuple[list[str] | None, NDArray[np.float64]]:
    """Rows of numbers, with an optional header (a first row that is not all numbers)."""
    try:
        with path.open(newline="") as handle:
            rows = [row for row in csv.reader(handle) if row and any(c.strip() for c in row)]
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"bad CSV file {path}: {exc}") from None
    if not rows:
        raise UsageError(f"bad CSV file {path}: no rows")
    header: list[str] | None = None
    try:
        [float(c) for c in rows[0]]
    except ValueError:
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    if not rows:
        raise UsageError(f"bad CSV file {path}: a header but no rows")
    width = len(rows[0])
    try:
        for i, row in enumerate(rows):
            if len(row) != width:
                raise UsageError(
                    f"bad CSV file {path}: row {i + 1} has {len(row)} columns, expected {width}"
                )
        data = np.array([[float(c) for c in row] for row in rows], dtype=np.float64)
    except ValueError as exc:
        raise UsageError(f"bad CSV file {path}: {exc}") from None
    return header, data


def _column_index(header: list[str] | None, column: str, width: int, path: Path) -> int:
    if header is not None and column in header:
        return header.index(column)
    try:
        index = int(column)
    except ValueError:
        names = ", ".join(header) if header else "none (no header row)"
        raise UsageError(f"{path} has no column {column!r}; columns: {names}") from None
    if not -width <= index < width:
        raise UsageError(f"{path} has {width} columns; column {index} is out of range")
    return index % width


def _load_npz(path: Path, keys: Sequence[str]) -> list[NDArray[Any]]:
    try:
        # NOTE: open the file ourselves: np.load leaks its handle when the zip is corrupt.
        with path.open("rb") as handle, np.load(handle, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise UsageError(f"bad .npz file {path}: it holds a single array")
            missing = [k for k in keys if k not in archive.files]
            if missing:
                raise UsageError(
                    f"{path} has no array {missing[0]!r}; arrays: {', '.join(archive.files)} "
                    "(choose with --x-key/--y-key)"
                )
            return [np.asarray(archive[k]) for k in keys]
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UsageError(f"bad .npz file {path}: {exc}") from None


def load_training_data(args: argparse.Namespace) -> tuple[NDArray[Any], NDArray[Any]]:
    """(x, y) from DATA: .npz with arrays --x-key/--y-key (default x, y), or .csv with
    --target-column (a header name or a 0-based index; the other columns are features)."""
    path = Path(args.data)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise UsageError(f"cannot read {path}: no such file")
    if suffix == ".npz":
        x, y = _load_npz(path, [args.x_key, args.y_key])
    elif suffix == ".csv":
        if args.target_column is None:
            raise UsageError("a .csv needs --target-column (a header name or a 0-based index)")
        header, table = _read_csv(path)
        target = _column_index(header, args.target_column, table.shape[1], path)
        x, y = np.delete(table, target, axis=1), table[:, target]
    else:
        raise UsageError(f"bad data file {path}: expected .npz or .csv")
    if x.ndim != 2:
        raise UsageError(f"bad data file {path}: inputs must be (rows, features), got {x.shape}")
    if y.shape[:1] != x.shape[:1]:
        raise UsageError(
            f"bad data file {path}: {x.shape[0]} input rows but {y.shape[0]} target rows"
        )
    if x.shape[0] == 0:
        raise UsageError(f"bad data file {path}: no rows")
    return x, y


def as_targets(y: NDArray[Any], spec: dict[str, Any]) -> NDArray[Any]:
    """Targets the loss accepts: int labels for softmax, (rows, outputs) floats otherwise."""
    if spec.get("loss") == "softmax_cross_entropy" and y.ndim == 1:
        if y.dtype.kind == "f" and not (np.all(np.isfinite(y)) and np.all(y == np.round(y))):
            raise UsageError("class labels must be whole numbers")
        return y.astype(np.int64)
    if spec.get("loss") != "softmax_cross_entropy" and y.ndim == 1:
        y = y.reshape(-1, 1)
    return y.astype(spec.get("dtype", "float32"))


def load_inputs(source: str | None, x_key: str) -> NDArray[Any]:
    """Inputs for predict from .npy, .npz (array x_key), .csv (all columns), or JSON.

    JSON (a .json file, or stdin for '-' and no FILE) is a list of rows, one row, or
    {"inputs": rows}; stdin may also carry .npy bytes.
    """
    if source is None or source == "-":
        raw = sys.stdin.buffer.read()
        if raw.startswith(b"\x93NUMPY"):
            try:
                return np.asarray(np.load(io.BytesIO(raw), allow_pickle=False))
            except (ValueError, EOFError) as exc:
                raise UsageError(f"bad .npy on stdin: {exc}") from None
        return _json_inputs(raw, "stdin")
    path = Path(source)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise UsageError(f"cannot read {path}: no such file")
    if suffix == ".npy":
        try:
            with path.open("rb") as handle:
                return np.asarray(np.load(handle, allow_pickle=False))
        except (OSError, ValueError, EOFError) as exc:
            raise UsageError(f"bad .npy file {path}: {exc}") from None
    if suffix == ".npz":
        return _load_npz(path, [x_key])[0]
    if suffix == ".csv":
        return _read_csv(path)[1]
    if suffix == ".json":
        try:
            return _json_inputs(path.read_bytes(), str(path))
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    raise UsageError(f"bad input file {path}: expected .npy, .npz, .csv or .json")


def _json_inputs(raw: bytes, source: str) -> NDArray[Any]:
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"bad JSON on {source}: {exc}") from None
    if isinstance(value, dict):
        if "inputs" not in value:
            raise UsageError(f"bad JSON on {source}: an object needs an 'inputs' field")
        value = value["inputs"]
    if isinstance(value, dict) and "data" in value and "shape" in value:
        value = np.asarray(value["data"]).reshape(value["shape"])
    try:
        array = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise UsageError(
            f"bad JSON on {source}: inputs must be a list of rows of numbers"
        ) from None
    return array
