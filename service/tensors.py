"""Tensors from and to the wire, for both transports.

The adapters hand over what they received (raw bytes + shape + dtype from gRPC; nested lists,
flat data + shape, or base64 bytes + shape + dtype from JSON) and get a numpy array or a clear
InvalidArgument. Shape, dtype
and finiteness against the model are checked later, once, by the engine's validators; here
only the encoding itself is checked (bytes that do not match the shape, ragged lists, too many
elements).
"""

from __future__ import annotations

import binascii
import math
from typing import Any

import numpy as np
import pybase64
from numpy.typing import NDArray

from propserve import wire
from propserve.service.errors import InvalidArgument, ResourceExhausted

#: Wire dtype names and the little-endian numpy dtypes they denote.
DTYPES: dict[str, np.dtype[Any]] = {name: np.dtype(code) for name, code in wire.DTYPES.items()}
MAX_RANK = wire.MAX_RANK


def check_shape(shape: Any, max_elements: int) -> tuple[int, ...]:
    """A shape as a tuple of non-negative ints whose product is at most ``max_elements``
    (ResourceExhausted beyond). The product of its nonzero dimensions must be within the
    limit too: a shape like [2**63-1, 0] describes no data any tensor needs, and more than
    numpy can shape (InvalidArgument, naming the dimension)."""
    if not isinstance(shape, list | tuple) or len(shape) > MAX_RANK:
        raise InvalidArgument(f"shape must be a list of at most {MAX_RANK} dimensions")
    dims = []
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise InvalidArgument(f"shape {list(shape)} has an invalid dimension {dim!r}")
        dims.append(int(dim))
    count = math.prod(dims)
    if count > max_elements:
        raise ResourceExhausted(
            f"tensor of shape {dims} has {count:,} elements; the limit is {max_elements:,}"
        )
    nonzero = 1
    for index, dim in enumerate(dims):
        nonzero *= dim or 1
        if nonzero > max_elements:
            raise InvalidArgument(
                f"dimension {index} of shape {dims} ({dim:,}) takes its nonzero dimensions "
                f"past {max_elements:,} elements"
            )
    return tuple(dims)


def from_bytes(shape: Any, dtype: str, data: bytes, max_elements: int) -> NDArray[Any]:
    """A read-only array viewing ``data`` (little-endian, row-major)."""
    return _view(data, dtype, *_layout(shape, dtype, max_elements))


Layout = tuple[tuple[int, ...], np.dtype[Any], int]


def _layout(shape: Any, dtype: Any, max_elements: int) -> Layout:
    """(dims, numpy dtype, byte count) of a tensor of ``shape`` and ``dtype``."""
    dims = check_shape(shape, max_elements)
    if dtype not in DTYPES:
        raise InvalidArgument(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    np_dtype = DTYPES[dtype]
    return dims, np_dtype, math.prod(dims) * np_dtype.itemsize


def _view(
    data: bytes, name: str, dims: tuple[int, ...], np_dtype: np.dtype[Any], expected: int
) -> NDArray[Any]:
    if len(data) != expected:
        raise InvalidArgument(
            f"tensor data has {len(data)} bytes; shape {list(dims)} of {name} needs {expected}"
        )
    return np.frombuffer(data, dtype=np_dtype).reshape(dims)


def to_bytes(array: NDArray[Any]) -> tuple[list[int], str, bytes]:
    """(shape, dtype name, little-endian bytes) of an array."""
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    name = next((n for n, d in DTYPES.items() if d == little.dtype), None)
    if name is None:
        raise InvalidArgument(f"dtype {array.dtype} cannot be sent")
    return list(array.shape), name, np.ascontiguousarray(little).tobytes()


def from_base64(shape: Any, dtype: Any, data: Any, max_elements: int) -> NDArray[Any]:
    """An array from base64 text of its little-endian, row-major bytes: JSON's way to carry
    the bytes gRPC carries raw, far cheaper to decode than numbers written out (see
    docs/performance.md#json-numbers). Only the strict alphabet with its padding is accepted:
    no whitespace, no URL-safe characters."""
    if not isinstance(dtype, str):
        raise InvalidArgument(
            f"a base64 tensor needs its dtype ({', '.join(DTYPES)}), got {dtype!r}"
        )
    if not isinstance(data, str):
        raise InvalidArgument("b64 must be a string of base64")
    layout = _layout(shape, dtype, max_elements)  # before decoding anything
    try:
        raw = pybase64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: not ASCII
        raise InvalidArgument(f"b64 is not valid base64: {exc}") from None
    return _view(raw, dtype, *layout)


def too_many(count: int, max_elements: int) -> ResourceExhausted:
    return ResourceExhausted(f"tensor has {count:,} elements; the limit is {max_elements:,}")


def _check_size(array: NDArray[Any], max_elements: int) -> None:
    if array.size > max_elements:
        raise too_many(array.size, max_elements)


def from_matrix(array: NDArray[np.float64], dtype: str, max_elements: int) -> NDArray[Any]:
    """A (rows, columns) float64 array of JSON numbers read by rest.jsonnumbers, as a
    float ``dtype``, under the same element limit as :func:`from_json`. (JSON's integer and
    fraction kinds are gone by then, so integer dtypes take from_json's path.)"""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"from_matrix makes float tensors, not {dtype}")
    _check_size(array, max_elements)
    return array.astype(DTYPES[dtype], copy=False)


def from_json(
    value: Any, *, shape: Any = None, dtype: str | None = None, max_elements: int
) -> NDArray[Any]:
    """An array from JSON: nested lists, or a flat list with an explicit ``shape``.

    Numbers keep their JSON kind unless ``dtype`` is given: all-integer data becomes int64
    (class labels), anything with a fraction becomes float64, all-boolean data stays boolean
    (binary targets), so the engine sees what the client meant; strings, nulls and ragged
    lists are refused.
    """
    if not isinstance(value, list):
        raise InvalidArgument(
            "a tensor must be a JSON array (nested lists, or flat data with a shape)"
        )
    if dtype is not None and dtype not in DTYPES:
        raise InvalidArgument(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if shape is not None:
        dims = check_shape(shape, max_elements)
        if len(value) != math.prod(dims):
            raise InvalidArgument(
                f"flat data has {len(value)} values; shape {list(dims)} needs {math.prod(dims)}"
            )
    try:
        # NOTE: decode by JSON's own kinds first: with a dtype, numpy would parse numeric
        # strings ("2") as numbers; then cast, refusing values out of the dtype's range.
        array = np.array(value)
        if array.dtype.kind not in "biuf":
            raise InvalidArgument("tensor values must be numbers (no strings, nulls or objects)")
        if dtype is not None:
            target = DTYPES[dtype]
            if target.kind in "iu" and array.dtype.kind == "f":
                raise InvalidArgument(f"dtype {dtype} needs integers, the data has fractions")
            if target.kind in "iu" and array.size:
                info = np.iinfo(target)
                if array.min() < info.min or array.max() > info.max:
                    raise InvalidArgument(f"values out of the range of {dtype}")
            array = array.astype(target, copy=False)
    except (ValueError, TypeError, OverflowError) as exc:
        # numpy's words for ragged lists name its own internals ("setting an array element
        # with a sequence... inhomogeneous part"); say what is wrong with the data instead.
        reason = "its lists have different lengths" if "inhomogeneous" in str(exc) else str(exc)
        raise InvalidArgument(f"tensor is not a rectangular array of numbers: {reason}") from None
    _check_size(array, max_elements)
    if shape is not None:
        if array.ndim != 1:
            raise InvalidArgument("flat data must be a list of numbers, not of lists")
        array = array.reshape(dims)
    if array.dtype.kind in "iu" and array.dtype != np.int64:
        array = array.astype(np.int64)
    return array
