"""JSON tensors read by simdjson (service.jsonnumbers) against the general parser (orjson): the
same body gives the same array, bit for bit, or the same error, whichever path reads it."""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import numpy as np
import orjson
import pytest
import simdjson
from hypothesis import given, settings
from hypothesis import strategies as st

from propserve.service import errors
from propserve.service.rest import jsonnumbers
from propserve.service.rest.bodies import json_object, predict_request
from propserve.service.tensors import from_matrix

LIMIT = 10_000


def outcome(raw: bytes, *, fast: bool) -> tuple[Any, ...]:
    """What predict_request makes of ``raw``, through the fast path when it takes the body
    (``fast``) or through the general parser alone."""
    patch = (
        mock.patch.object(jsonnumbers, "object_with_matrix", lambda raw, key: None)
        if not fast
        else mock.patch.object(jsonnumbers, "object_with_matrix", jsonnumbers.object_with_matrix)
    )
    with patch:
        try:
            inputs, version, label = predict_request(raw, LIMIT)
        except errors.PropserveError as exc:
            return (type(exc).__name__, exc.message)
    array = np.asarray(inputs)
    return ("ok", array.dtype.str, array.shape, array.tobytes(), version, label)


def assert_same(raw: bytes) -> tuple[Any, ...]:
    general = outcome(raw, fast=False)
    assert outcome(raw, fast=True) == general, raw[:200]
    return general


def taken(raw: bytes) -> bool:
    return jsonnumbers.object_with_matrix(raw, "inputs") is not None


RECTANGULAR = [
    b'{"inputs": [[1.5, -2.25, 3]]}',
    b'{"inputs": [[0, 1], [2, 3], [4, 5]]}',  # integers are features too: float64
    b'{"inputs": [[-0.0, 1e-320, 1.7976931348623157e308, 5e-324]]}',  # signs, subnormals, max
    b'{"inputs": [[9223372036854775807, 18446744073709551615]]}',  # the 64-bit integer ends
    b'{"inputs": [[0.1, 0.2, 0.30000000000000004]], "version": 3}',
    b'{"label": "prod", "inputs": [[1e10, 1E-10, 2.5e+3]]}',
    b' {\n "inputs" : [ [ 1 , 2 ] ,\t[ 3 , 4 ] ] , "label" : null , "version" : null }\n',
    '{"inputs": [[1]], "label": "caf\u00e9 \u2603"}'.encode(),
    b'{"inputs": [[1]], "other": {"a": 1}}',  # an unknown member: refused alike
    b'{"inputs": [[1]], "label": 5}',  # a label that is no string: refused alike
    b'{"inputs": [[1]], "version": [1]}',  # another array: read, then refused alike
]

FALLING_BACK = [
    b'{"inputs": [[1, 2], [3]]}',  # ragged
    b'{"inputs": [[1], [[2]]]}',  # a nested singleton the flattening would hide
    b'{"inputs": [[[1]], [[2]]]}',  # rank 3
    b'{"inputs": [1, 2, 3]}',  # rank 1
    b'{"inputs": [[true, 1]]}',
    b'{"inputs": [[null]]}',
    b'{"inputs": [["1"]]}',
    b'{"inputs": [[{"a": 1}]]}',
    b'{"inputs": []}',
    b'{"inputs": [[]]}',
    b'{"inputs": [[1]], "inputs": [[2]]}',  # duplicate keys: the last one counts
    b'{"inputs": [[1e400]]}',  # beyond float64
    b'{"inputs": [[18446744073709551616]]}',  # beyond 64 bits
    b'{"inputs": [[1]], "label": "a[b"}',  # a bracket in a string
    b'{"inputs": [[1], [[2]]], "label": "\\u005b"}',  # an escaped bracket cannot hide one
    b"[[1, 2]]",
    b'{"inputs": [[1, 2]]',  # truncated
    b'{"inputs": [[1, 2]]} trailing',
    b'{"inputs": [[01]]}',
    b'{"inputs": [[NaN]]}',
    b'{"inputs": [[1]], "label": "\xff"}',  # not UTF-8
    b"",
    b'{"inputs": {"data": [1, 2], "shape": [1, 2]}}',  # the flat form: the general path's
    b'{"label": "x"}',
]


@pytest.mark.parametrize("raw", RECTANGULAR)
def test_rectangular_numbers_take_the_fast_path_with_the_same_result(raw: bytes) -> None:
    assert taken(raw)
    assert_same(raw)


@pytest.mark.parametrize("raw", FALLING_BACK)
def test_everything_else_falls_back_to_the_general_parser(raw: bytes) -> None:
    assert not taken(raw)
    assert_same(raw)


def test_the_fast_path_gives_the_values_of_the_numbers() -> None:
    x = np.random.default_rng(0).standard_normal((5, 7))
    raw = orjson.dumps({"inputs": x.tolist(), "version": 2})
    body = jsonnumbers.object_with_matrix(raw, "inputs")
    assert body is not None
    assert body["version"] == 2
    assert body["inputs"].dtype == np.float64
    np.testing.assert_array_equal(body["inputs"], x)  # shortest round-trip text: exact
    kind, dtype, shape, data, version, label = assert_same(raw)
    assert (kind, shape, version, label) == ("ok", (5, 7), 2, None)
    assert np.frombuffer(data, dtype=dtype).tobytes() == x.tobytes()


def test_the_element_limit_holds_on_both_paths() -> None:
    raw = orjson.dumps({"inputs": [[0.5] * 100] * 101})  # 10,100 > LIMIT
    assert taken(raw)
    kind, message = assert_same(raw)
    assert kind == "ResourceExhausted"
    assert "10,100 elements; the limit is 10,000" in message


def test_float32_inputs_convert_like_the_general_path() -> None:
    values = [[0.1, 1 / 3, 16777217.0, 3.4028234663852886e38, 1e-46]]
    raw = json.dumps({"inputs": values}).encode()
    body = jsonnumbers.object_with_matrix(raw, "inputs")
    assert body is not None
    np.testing.assert_array_equal(
        from_matrix(body["inputs"], "float32", LIMIT), np.array(values, dtype=np.float32)
    )
    with pytest.raises(ValueError, match="float tensors"):
        from_matrix(body["inputs"], "int64", LIMIT)


# -- fuzzing: random JSON around and inside the tensor ---------------------------------------

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
)
scalars = st.one_of(numbers, st.booleans(), st.none(), st.text(max_size=3))
rows = st.lists(numbers, min_size=0, max_size=4)
tensors = st.one_of(
    st.lists(rows, min_size=0, max_size=4),  # mostly rectangular or ragged matrices
    st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=8),
)
members = st.fixed_dictionaries(
    {"inputs": tensors},
    optional={
        "version": st.one_of(st.integers(-3, 2**65), st.none(), st.text(max_size=2)),
        "label": st.one_of(st.text(max_size=4), st.none(), st.integers(0, 3)),
        "extra": scalars,
    },
)


@settings(max_examples=300, deadline=None)
@given(body=members, indent=st.booleans())
def test_fuzzed_bodies_read_the_same_on_both_paths(body: dict[str, Any], indent: bool) -> None:
    raw = json.dumps(body, indent=2 if indent else None).encode()
    assert_same(raw)


@settings(max_examples=200, deadline=None)
@given(matrix=st.lists(st.lists(numbers, min_size=3, max_size=3), min_size=1, max_size=5))
def test_fuzzed_rectangular_matrices_take_the_fast_path(matrix: list[list[Any]]) -> None:
    raw = json.dumps({"inputs": matrix}).encode()
    general = assert_same(raw)
    # simdjson reads integers from -2**63 to 2**64 - 1; others fall back
    if all(isinstance(v, float) or -(2**63) <= v < 2**64 for row in matrix for v in row):
        assert taken(raw)
        assert general[0] == "ok"


@pytest.mark.parametrize(
    "targets",
    [
        {"b64": "AAAAAAAAAAA=", "shape": [1], "dtype": "int64"},
        [3],
        [[0.25, 0.75]],
        {"data": [1], "shape": [1]},
        {"nested": [[], [[]], {"deeper": [1, [2]]}]},
    ],
)
def test_a_train_step_body_reads_its_other_arrays_as_the_general_parser(targets: Any) -> None:
    raw = orjson.dumps({"inputs": [[0.5, 1.5]], "targets": targets, "learning_rate": 0.1})
    body = json_object(raw, matrix="inputs")
    assert isinstance(body["inputs"], np.ndarray)
    assert body == {**orjson.loads(raw), "inputs": body["inputs"]}
    np.testing.assert_array_equal(body["inputs"], [[0.5, 1.5]])


@pytest.mark.parametrize(
    "raw",
    [
        b'{"inputs": [[1], [[2]]], "targets": [1]}',  # a nested array beside another array
        b'{"inputs": [[1, [2]], [3, 4]], "targets": [[5]]}',
        b'{"inputs": [[1, 2]], "targets": ["["]}',
        b'{"inputs": [[1], [[2]]], "targets": ["\\u005b"]}',
        b'{"inputs": [[1, 2]], "t[": 1}',
    ],
)
def test_brackets_elsewhere_cannot_hide_a_nested_array(raw: bytes) -> None:
    assert not taken(raw)
    assert json_object(raw, matrix="inputs") == orjson.loads(raw)


def test_bodies_whose_tensor_is_not_an_array_are_not_parsed_twice() -> None:
    parsed: list[bytes] = []
    real = simdjson.Parser

    class Counting:
        def parse(self, raw: bytes) -> Any:
            parsed.append(raw)
            return real().parse(raw)

    with mock.patch.object(simdjson, "Parser", Counting):
        b64 = orjson.dumps({"inputs": {"b64": "AACAPw==", "shape": [1, 1], "dtype": "float32"}})
        assert jsonnumbers.object_with_matrix(b64, "inputs") is None
        assert jsonnumbers.object_with_matrix(b'{"version": 1}', "inputs") is None
        assert parsed == []
        numbers = b'{"inputs" :\n [[1, 2]]}'
        assert jsonnumbers.object_with_matrix(numbers, "inputs") is not None
        assert parsed == [numbers]
