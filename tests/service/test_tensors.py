"""Tensors from and to the wire: raw little-endian bytes + shape + dtype (gRPC) and JSON
(REST), with their encoding errors and element limits."""

from __future__ import annotations

import base64
import re
from typing import Any

import numpy as np
import pybase64
import pytest

from propserve.service import tensors
from propserve.service.errors import InvalidArgument, ResourceExhausted

LIMIT = 1000


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64"])
def test_bytes_round_trip(dtype: str) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4)) * 100).astype(dtype)
    shape, name, data = tensors.to_bytes(array)
    assert (shape, name) == ([3, 4], dtype)
    assert len(data) == array.nbytes
    back = tensors.from_bytes(shape, name, data, LIMIT)
    np.testing.assert_array_equal(back, array)
    assert back.dtype == np.dtype(dtype)
    assert not back.flags.writeable  # a view of the message's bytes


def test_bytes_are_little_endian_row_major() -> None:
    data = np.array([[1.0, 2.0], [3.0, 4.0]], dtype="<f4").tobytes()
    assert tensors.from_bytes([2, 2], "float32", data, LIMIT)[1, 0] == 3.0
    big = np.array([[1.0, 2.0]], dtype=">f8")
    _, name, raw = tensors.to_bytes(big)
    assert name == "float64"
    assert raw == np.array([[1.0, 2.0]], dtype="<f8").tobytes()
    column_major = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert tensors.to_bytes(column_major)[2] == np.arange(6, dtype="<f4").tobytes()


@pytest.mark.parametrize(
    ("shape", "dtype", "size", "match"),
    [
        ([2, 3], "float32", 23, "23 bytes; shape \\[2, 3\\] of float32 needs 24"),
        ([2, 3], "float32", 25, "needs 24"),
        ([2, 3], "float64", 24, "needs 48"),
        ([2, 3], "int32", 0, "needs 24"),
        ([0, 3], "float32", 4, "needs 0"),
    ],
)
def test_bytes_length_must_match_shape(shape: list[int], dtype: str, size: int, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        tensors.from_bytes(shape, dtype, b"\0" * size, LIMIT)


@pytest.mark.parametrize("dtype", ["float16", "bool", "uint8", "", "FLOAT32", "complex64"])
def test_unsupported_dtypes(dtype: str) -> None:
    with pytest.raises(InvalidArgument, match="unsupported dtype"):
        tensors.from_bytes([1], dtype, b"\0" * 8, LIMIT)
    with pytest.raises(InvalidArgument, match="unsupported dtype"):
        tensors.from_json([1.0], dtype=dtype, max_elements=LIMIT)


@pytest.mark.parametrize("dtype", [np.float16, np.bool_, np.uint8, np.complex64])
def test_to_bytes_refuses_unsendable_dtypes(dtype: Any) -> None:
    with pytest.raises(InvalidArgument, match="cannot be sent"):
        tensors.to_bytes(np.zeros(2, dtype=dtype))


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ("2x3", "list of at most"),
        ([1] * 9, "list of at most 8"),
        ([2, -1], "invalid dimension -1"),
        ([2, 1.5], "invalid dimension 1.5"),
        ([True, 2], "invalid dimension True"),
        ([None], "invalid dimension None"),
    ],
)
def test_bad_shapes(shape: Any, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        tensors.check_shape(shape, LIMIT)


def test_element_limit_on_shapes() -> None:
    assert tensors.check_shape([10, 100], LIMIT) == (10, 100)
    with pytest.raises(ResourceExhausted, match="1,001 elements; the limit is 1,000"):
        tensors.check_shape([7, 11, 13], LIMIT)
    # The limit is checked on the shape, before any data is looked at.
    with pytest.raises(ResourceExhausted):
        tensors.from_bytes([1 << 40, 1 << 20], "float32", b"", LIMIT)


# --- JSON -------------------------------------------------------------------------------


def test_json_nested_lists_keep_their_kind() -> None:
    floats = tensors.from_json([[1.5, 2.0], [3.0, 4.0]], max_elements=LIMIT)
    assert floats.dtype == np.float64
    assert floats.shape == (2, 2)
    ints = tensors.from_json([0, 2, 1], max_elements=LIMIT)
    assert ints.dtype == np.int64
    np.testing.assert_array_equal(ints, [0, 2, 1])
    bools = tensors.from_json([[True], [False]], max_elements=LIMIT)
    assert bools.dtype == np.bool_
    mixed = tensors.from_json([[1, 2.5]], max_elements=LIMIT)
    assert mixed.dtype == np.float64


def test_json_explicit_dtype() -> None:
    as32 = tensors.from_json([[1, 2]], dtype="float32", max_elements=LIMIT)
    assert as32.dtype == np.float32
    as_int32 = tensors.from_json([1, 2], dtype="int32", max_elements=LIMIT)
    assert as_int32.dtype == np.int64  # integers are widened to int64 labels


def test_json_flat_data_with_shape() -> None:
    array = tensors.from_json([1, 2, 3, 4, 5, 6], shape=[2, 3], dtype="float64", max_elements=LIMIT)
    np.testing.assert_array_equal(array, [[1, 2, 3], [4, 5, 6]])
    assert array.dtype == np.float64
    with pytest.raises(InvalidArgument, match="flat data has 5 values; shape \\[2, 3\\] needs 6"):
        tensors.from_json([1, 2, 3, 4, 5], shape=[2, 3], max_elements=LIMIT)
    with pytest.raises(InvalidArgument, match="invalid dimension"):
        tensors.from_json([1, 2], shape=[2, -1], max_elements=LIMIT)


@pytest.mark.parametrize(
    "value",
    [
        [[1.0, 2.0], [3.0]],
        [[1.0, 2.0], 3.0],
        [[[1.0]], [2.0]],
    ],
)
def test_json_ragged_lists_are_refused(value: Any) -> None:
    with pytest.raises(InvalidArgument, match="rectangular") as refused:
        tensors.from_json(value, max_elements=LIMIT)
    assert "different lengths" in str(refused.value)
    assert "sequence" not in str(refused.value) and "inhomogeneous" not in str(refused.value)


@pytest.mark.parametrize(
    "value",
    [
        [["a", "b"]],
        [[1.0, None]],
        [None],
        [{"x": 1}],
        [[1.0, "2"]],
    ],
)
def test_json_non_numbers_are_refused(value: Any) -> None:
    with pytest.raises(InvalidArgument):
        tensors.from_json(value, max_elements=LIMIT)


@pytest.mark.parametrize("value", [1.0, "1,2", None, {"data": [1]}, (1.0, 2.0)])
def test_json_tensor_must_be_an_array(value: Any) -> None:
    with pytest.raises(InvalidArgument, match="must be a JSON array"):
        tensors.from_json(value, max_elements=LIMIT)


def test_json_element_limit() -> None:
    assert tensors.from_json([[0.0] * 10] * 100, max_elements=LIMIT).size == LIMIT
    with pytest.raises(ResourceExhausted, match="1,001 elements"):
        tensors.from_json([0.0] * 1001, max_elements=LIMIT)
    with pytest.raises(ResourceExhausted):
        tensors.from_json([0.0], shape=[1001], max_elements=LIMIT)


def test_json_non_finite_values_are_left_to_the_core() -> None:
    # Finiteness is judged once, by the engine's validators, on the decoded array.
    array = tensors.from_json([[float("nan"), float("inf")]], max_elements=LIMIT)
    assert np.isnan(array[0, 0])
    assert np.isinf(array[0, 1])


@pytest.mark.parametrize(("value", "dtype"), [(2**40, "int32"), (2**63, "int64"), (1e30, "int32")])
def test_json_integers_out_of_range_are_invalid(value: float, dtype: str) -> None:
    with pytest.raises(InvalidArgument):
        tensors.from_json([1, value], dtype=dtype, max_elements=LIMIT)


# -- base64 tensors (REST's carrier for the bytes gRPC carries raw) -------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64"])
def test_base64_round_trip(dtype: str) -> None:
    array = (np.random.default_rng(1).standard_normal((3, 4)) * 100).astype(dtype)
    text = base64.b64encode(array.astype(np.dtype(dtype).newbyteorder("<")).tobytes()).decode()
    back = tensors.from_base64([3, 4], dtype, text, LIMIT)
    np.testing.assert_array_equal(back, array)
    assert back.dtype == np.dtype(dtype)


def test_base64_carries_what_json_numbers_cannot() -> None:
    array = np.array([[np.nan, np.inf, -0.0, 1e-45]], dtype="<f4")
    back = tensors.from_base64([1, 4], "float32", base64.b64encode(array.tobytes()).decode(), LIMIT)
    assert back.tobytes() == array.tobytes()  # bit for bit; finiteness is the engine's to judge


@pytest.mark.parametrize(
    ("shape", "dtype", "data", "error", "message"),
    [
        ([1], "float32", "AAA", InvalidArgument, "not valid base64"),
        ([1], "float32", "AA AA", InvalidArgument, "not valid base64"),  # no whitespace
        ([1], "float32", "AAAA\n", InvalidArgument, "not valid base64"),
        ([1], "float32", "AA=A", InvalidArgument, "not valid base64"),
        ([1], "float32", "AAAAAA====", InvalidArgument, "not valid base64"),  # excess padding
        ([1], "float32", "AA-_AA==", InvalidArgument, "not valid base64"),  # URL-safe letters
        ([1], "float32", "ÀÀÀÀ", InvalidArgument, "not valid base64"),
        ([1], "float32", 1234, InvalidArgument, "b64 must be a string"),
        ([1], None, "AAAA", InvalidArgument, "needs its dtype"),
        ([1], 5, "AAAA", InvalidArgument, "needs its dtype"),
        ([1], "float16", "AAA=", InvalidArgument, "unsupported dtype"),
        ([2], "float32", "AAAA", InvalidArgument, "tensor data has 3 bytes; shape [2]"),
        ([1], "float32", "AAAAAAAAAAA=", InvalidArgument, "has 8 bytes; shape [1] of float32"),
        ([-1], "float32", "", InvalidArgument, "invalid dimension -1"),
        ([10, 1000], "float32", "AAAA", ResourceExhausted, "the limit is 1,000"),
    ],
)
def test_bad_base64_tensors_are_refused(
    shape: Any, dtype: Any, data: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        tensors.from_base64(shape, dtype, data, LIMIT)


def test_the_element_limit_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[int] = []
    real = pybase64.b64decode

    def counting(data: Any, **options: Any) -> bytes:
        decoded.append(len(data))
        return real(data, **options)

    monkeypatch.setattr(pybase64, "b64decode", counting)
    assert tensors.from_base64([3], "float32", "AAAA" * 4, LIMIT).shape == (3,)
    assert decoded == [16]  # the patch is on the decoder from_base64 uses
    with pytest.raises(ResourceExhausted):
        tensors.from_base64([LIMIT + 1], "float32", "AAAA" * 1000, LIMIT)
    assert decoded == [16]
