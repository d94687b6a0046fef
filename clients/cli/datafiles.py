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
from collections.abc import Callable, Sequence
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


#: How .npy files begin (numpy.lib.format); .npz files are zip archives of them.
_NPY_MAGIC = b"\x93NUMPY"


def _load_npz(path: Path, keys: Sequence[str]) -> list[NDArray[Any]]:
    # NOTE: look before np.load: on a file that is not an archive it tries to unpickle it
    # (and refuses with a message about pickles), and on a .npy it returns an array.
    try:
        with path.open("rb") as handle:
            start = handle.read(len(_NPY_MAGIC))
        archive_like = zipfile.is_zipfile(path)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if start == _NPY_MAGIC:
        raise UsageError(
            f"bad .npz file {path}: it is a single array (.npy, from numpy.save); "
            "an .npz holds named arrays (numpy.savez)"
        )
    if not archive_like:
        raise UsageError(
            f"bad .npz file {path}: not an .npz archive (a zip of named arrays, as "
            "numpy.savez writes)"
        )
    try:
        # NOTE: open the file ourselves: np.load leaks its handle when the zip is corrupt.
        with path.open("rb") as handle, np.load(handle, allow_pickle=False) as archive:
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


def fit_to_model(
    x: NDArray[Any], y: NDArray[Any], spec: dict[str, Any], source: str, model: str
) -> tuple[NDArray[Any], NDArray[Any]]:
    """(x, y) as the model takes them, checked here against its spec before anything is
    sent, so that a bad file trains nothing: x (rows, input_dim) finite numbers in the
    model's dtype; y integer class labels in [0, classes) or (rows, classes) non-negative
    probabilities for softmax_cross_entropy, (rows, outputs) finite numbers otherwise (in
    [0, 1] for binary_cross_entropy). The rules are the engine's (engine/inputs.py); a
    test holds the two to the same answers."""

    def bad(problem: str) -> UsageError:
        return UsageError(f"bad data file {source}: {problem}; nothing was trained")

    dtype = np.dtype(spec.get("dtype", "float32"))
    width, outputs = spec["input_dim"], spec["layers"][-1]["units"]
    if x.dtype.kind not in "biuf":
        raise bad(f"inputs must be numbers, got {x.dtype}")
    if x.shape[1] != width:
        raise bad(f"inputs have {x.shape[1]} features per row, model {model} takes {width}")
    x = _cast(x, dtype)
    _require_finite(x, "inputs", bad)
    if y.dtype.kind not in "biuf":
        raise bad(f"targets must be numbers, got {y.dtype}")
    if spec.get("loss") == "softmax_cross_entropy":
        if y.ndim == 1:
            if y.dtype.kind == "f":
                _require_finite(y, "class labels", bad)
                fractional = np.flatnonzero(y != np.round(y))
                if fractional.size:
                    row = int(fractional[0])
                    raise bad(f"class labels must be whole numbers, row {row} has {y[row]}")
            labels = y.astype(np.int64)
            outside = np.flatnonzero((labels < 0) | (labels >= outputs))
            if outside.size:
                row = int(outside[0])
                raise bad(
                    f"class label {labels[row]} at row {row} is out of range [0, {outputs}) "
                    f"for model {model}"
                )
            return x, labels
        if y.shape[1:] != (outputs,):
            raise bad(
                f"targets must be class labels (rows,) or probabilities (rows, {outputs}) for "
                f"model {model}, got shape {y.shape}"
            )
        probabilities = _cast(y, dtype)
        _require_finite(probabilities, "class probabilities", bad)
        if (probabilities < 0).any():
            raise bad("class probabilities must be non-negative")
        return x, probabilities
    if y.ndim == 1 and outputs == 1:
        y = y.reshape(-1, 1)
    if y.shape[1:] != (outputs,):
        raise bad(f"targets must have shape (rows, {outputs}) for model {model}, got {y.shape}")
    values = _cast(y, dtype)
    _require_finite(values, "targets", bad)
    if spec.get("loss") == "binary_cross_entropy" and ((values < 0) | (values > 1)).any():
        raise bad("binary cross-entropy targets must lie in [0, 1]")
    return x, values


def _cast(array: NDArray[Any], dtype: np.dtype[Any]) -> NDArray[Any]:
    # NOTE: numbers beyond float32's range become inf here, which _require_finite reports.
    with np.errstate(over="ignore"):
        return array.astype(dtype, copy=False)


def _require_finite(array: NDArray[Any], what: str, bad: Callable[[str], UsageError]) -> None:
    """Refuse NaN and infinities (also those a cast to float32 makes of huge numbers)."""
    if array.dtype.kind != "f":
        return
    found = np.argwhere(~np.isfinite(array))
    if found.size:
        at = tuple(int(i) for i in found[0])
        where = f"row {at[0]}" + (f", column {at[1]}" if len(at) > 1 else "")
        raise bad(f"{what} hold a non-finite value ({array[at]}) at {where}")


def load_inputs(source: str | None, x_key: str) -> NDArray[Any]:
    """Inputs for predict from .npy, .npz (array x_key), .csv (all columns), or JSON.

    JSON (a .json file, or stdin for '-' and no FILE) is a list of rows, one row, or
    {"inputs": rows}; stdin may also carry .npy bytes.
    """
    if source is None or source == "-":
        raw = sys.stdin.buffer.read()
        if raw.startswith(_NPY_MAGIC):
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
                if handle.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
                    raise UsageError(
                        f"bad .npy file {path}: not a NumPy array file (as numpy.save writes)"
                    )
                handle.seek(0)
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
