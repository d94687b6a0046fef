"""Small batches cut into BLAS calls the small-matrix kernels take (engine.rowsplit)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import threadpoolctl

from propserve.engine import ModelSpec, Network, forward, rowsplit
from propserve.engine import network as network_module
from propserve.engine.rowsplit import (
    MAX_CALLS,
    MAX_CALLS_FLOAT64,
    MAX_ROW_CALLS,
    SMALL_MNK,
    rows_per_call,
)


@pytest.mark.parametrize(
    ("rows", "n_in", "n_out", "expected"),
    [
        (1, 784, 512, 1),  # one row is one call
        (2, 784, 512, 2),  # 2 * 784 * 512 <= 1e6: the small kernels take it whole
        (3, 784, 512, 2),  # 3 rows would pack: calls of 2
        (12, 784, 512, 2),  # 6 calls
        (13, 784, 512, 13),  # 7 calls would cost more than packing once
        (8, 512, 256, 7),  # 7 * 512 * 256 <= 1e6 < 8 * 512 * 256
        (2, 1024, 1024, 1),  # too large for the small kernels even for one row: one per row
        (4, 1024, 1024, 1),
        (5, 1024, 1024, 5),  # five passes over the matrix cost more than packing it
        (100, 64, 128, 100),  # small enough whole
    ],
)
def test_rows_per_call_with_small_kernels(rows: int, n_in: int, n_out: int, expected: int) -> None:
    assert rows_per_call(rows, n_in, n_out, 4, small=True) == expected


@pytest.mark.parametrize(("rows", "expected"), [(2, 2), (3, 2), (6, 2), (7, 7), (12, 12)])
def test_float64_products_are_cut_into_fewer_calls(rows: int, expected: int) -> None:
    assert rows_per_call(rows, 784, 512, 8, small=True) == expected


def test_the_rule_keeps_within_its_limits() -> None:
    for rows in range(1, 40):
        for n_in, n_out in [(784, 512), (512, 256), (1024, 1024), (300, 3000), (10, 10)]:
            for itemsize in (4, 8):
                per_call = rows_per_call(rows, n_in, n_out, itemsize, small=True)
                assert 1 <= per_call <= rows
                if per_call < rows:
                    calls = -(-rows // per_call)
                    assert calls <= (MAX_ROW_CALLS if per_call == 1 else MAX_CALLS)
                    assert itemsize == 4 or per_call == 1 or calls <= MAX_CALLS_FLOAT64
                    assert per_call == 1 or per_call * n_in * n_out <= SMALL_MNK
                assert rows_per_call(rows, n_in, n_out, itemsize, small=False) == rows


@pytest.mark.parametrize(
    ("infos", "expected"),
    [
        ([{"user_api": "blas", "internal_api": "openblas", "architecture": "SkylakeX"}], True),
        ([{"user_api": "blas", "internal_api": "openblas", "architecture": "Cooperlake"}], True),
        ([{"user_api": "blas", "internal_api": "openblas", "architecture": "Haswell"}], False),
        ([{"user_api": "blas", "internal_api": "mkl", "architecture": None}], False),
        ([{"user_api": "openmp", "internal_api": "openmp"}], False),
        ([], False),
        # numpy's own library decides when another one is loaded too
        (
            [
                {
                    "user_api": "blas",
                    "internal_api": "openblas",
                    "architecture": "Haswell",
                    "filepath": "/x/scipy.libs/libopenblas.so",
                },
                {
                    "user_api": "blas",
                    "internal_api": "openblas",
                    "architecture": "SkylakeX",
                    "filepath": "/x/numpy.libs/libscipy_openblas64_.so",
                },
            ],
            True,
        ),
    ],
)
def test_small_kernels_detection(
    monkeypatch: pytest.MonkeyPatch, infos: list[dict[str, Any]], expected: bool
) -> None:
    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: infos)
    rowsplit.small_kernels.cache_clear()
    try:
        assert rowsplit.small_kernels() is expected
    finally:
        rowsplit.small_kernels.cache_clear()


def _network(layers: list[int], dtype: str) -> Network:
    hidden = [{"units": u, "activation": "relu"} for u in layers[1:-1]]
    return Network(
        ModelSpec.from_dict(
            {
                "input_dim": layers[0],
                "layers": [*hidden, {"units": layers[-1]}],
                "loss": "softmax_cross_entropy",
                "dtype": dtype,
                "seed": 3,
            }
        )
    )


def _reference(net: Network, x: np.ndarray) -> np.ndarray:
    """The forward pass in float64, one numpy product per layer."""
    a = x.astype(np.float64)
    params = net.params
    for w, b in zip(params.weights[:-1], params.biases[:-1], strict=True):
        a = np.maximum(a @ w.astype(np.float64) + b, 0.0)
    z = a @ params.weights[-1].astype(np.float64) + params.biases[-1]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    probabilities: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return probabilities


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rows", [2, 3, 5, 8, 12, 13])
def test_split_forward_matches_the_reference(
    monkeypatch: pytest.MonkeyPatch, dtype: str, rows: int
) -> None:
    net = _network([784, 512, 256, 10], dtype)
    x = np.random.default_rng(rows).standard_normal((rows, 784)).astype(dtype)
    calls: list[int] = []

    def forced(rows: int, n_in: int, n_out: int, itemsize: int) -> int:
        per_call = rows_per_call(rows, n_in, n_out, itemsize, small=True)
        calls.append(per_call)
        return per_call

    monkeypatch.setattr(network_module, "rows_per_call", forced)
    split = forward(net.spec, net.params, x)
    monkeypatch.setattr(network_module, "rows_per_call", lambda rows, *shape_and_size: rows)
    whole = forward(net.spec, net.params, x)
    most = 12 if dtype == "float32" else 6
    assert calls[0] == (2 if 2 < rows <= most else rows)  # the first layer was cut (or not)
    assert split.shape == (rows, 10)
    assert split.dtype == np.dtype(dtype)
    tolerance = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(split, _reference(net, x), rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(split, whole, rtol=tolerance, atol=tolerance)


def test_each_cut_is_computed_like_a_batch_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of a cut batch depend only on their own call: the same rows in another batch
    cut the same way give the same bits."""
    monkeypatch.setattr(
        network_module,
        "rows_per_call",
        lambda rows, n_in, n_out, itemsize: rows_per_call(rows, n_in, n_out, itemsize, small=True),
    )
    net = _network([784, 512, 256, 10], "float32")
    x = np.random.default_rng(0).standard_normal((6, 784)).astype(np.float32)
    y = np.concatenate([x[:2], np.random.default_rng(1).standard_normal((4, 784))]).astype(
        np.float32
    )
    np.testing.assert_array_equal(
        forward(net.spec, net.params, x)[:2], forward(net.spec, net.params, y)[:2]
    )
