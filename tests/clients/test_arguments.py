"""Arguments the wire's rules refuse are refused by the clients themselves, before anything is
sent, as InvalidArgument on all four clients: never a raw ValueError or TypeError, and never
a number silently changed on the way (JSON has no NaN or infinities)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
import pytest

from propserve import wire
from propserve.clients import ClientError, GrpcClient, InvalidArgument, grpc_client, rest_client
from propserve.clients.arguments import tensor
from tests.clients.helpers import KINDS, SPECS, WAIT, connect
from tests.support.server import ServerProcess

X, Y = np.ones((2, 5)), np.zeros((2, 2))
NON_FINITE = [float("inf"), float("-inf"), float("nan"), np.float32("nan"), np.float64("-inf")]


@pytest.fixture(scope="module")
def model(server: ServerProcess) -> Iterator[str]:
    with GrpcClient(server.grpc_target, timeout=WAIT) as client:
        client.create_model("args", SPECS["f64-mse-sgd"])
        client.train_step("args", X, Y)
        client.save_version("args")
    yield "args"


def refused_before_sending(call: Callable[[], Any], message: str | None) -> InvalidArgument:
    """``call`` raises InvalidArgument saying ``message`` (the wire's own words where the
    rule is the wire's) without having sent anything."""
    assert message
    with pytest.raises(ClientError) as caught:
        call()
    error = caught.value
    assert type(error) is InvalidArgument, repr(error)
    assert message in error.message, error.message
    # Nothing was sent: no status, no request id.
    assert (error.status, error.request_id) == (None, None), error
    return error


@pytest.mark.parametrize("kind", KINDS)
def test_a_non_finite_learning_rate_is_refused_before_sending(
    server: ServerProcess, model: str, kind: str
) -> None:
    with connect(kind, server) as client:
        before = client.get_model(model)
        for rate in NON_FINITE:
            refused_before_sending(
                lambda: client.train_step(model, X, Y, learning_rate=rate),  # noqa: B023
                "learning_rate must be a finite number",
            )
            refused_before_sending(
                lambda: client.train(model, [(X, Y)], learning_rate=rate),  # noqa: B023
                "learning_rate must be a finite number",
            )
        refused_before_sending(
            lambda: client.train_step(model, X, Y, learning_rate="0.1"),
            "learning_rate must be a number",
        )
        assert client.get_model(model) == before


VERSIONS = [-1, 0, 2**70, wire.MAX_VERSION + 1, True, 1.0, "1"]


@pytest.mark.parametrize("kind", KINDS)
def test_versions_out_of_range_are_refused_before_sending(
    server: ServerProcess, model: str, kind: str
) -> None:
    with connect(kind, server) as client:
        before = client.get_model(model)
        for version in VERSIONS:
            calls: list[Callable[[], Any]] = [
                lambda: client.predict(model, X, version=version),  # noqa: B023
                lambda: client.rollback(model, version=version),  # noqa: B023
                lambda: client.set_label(model, "stable", version),  # noqa: B023
            ]
            for call in calls:
                refused_before_sending(call, wire.source_problem(version, None))
        # A numpy integer is a version like any other.
        assert client.predict(model, X, version=np.int64(1)).version == 1
        assert client.get_model(model) == before


@pytest.mark.parametrize("kind", KINDS)
def test_other_arguments_the_wire_refuses(server: ServerProcess, model: str, kind: str) -> None:
    cases: list[tuple[Callable[[Any], Any], str | None]] = [
        (lambda c: c.predict(model, X, version=1, label="stable"), wire.source_problem(1, "x")),
        (
            lambda c: c.predict(model, X, label="Not A Label"),
            wire.name_problem("Not A Label", "label"),
        ),
        (lambda c: c.rollback(model), "rollback needs a version or a label"),
        (lambda c: c.set_label(model, "../x", 1), wire.name_problem("../x", "label")),
        (lambda c: c.remove_label(model, ""), wire.name_problem("", "label")),
        (lambda c: c.update_model(model, retain=0), wire.settings_problem({"retain": 0})),
        (
            lambda c: c.update_model(model, autosave_every=-1),
            wire.settings_problem({"autosave_every": -1}),
        ),
        (
            lambda c: c.create_model("new", SPECS["f64-mse-sgd"], retain=1.5),
            wire.settings_problem({"retain": 1.5}),
        ),
        (lambda c: c.create_model("new", "not a spec"), "spec must be a dict"),
        (lambda c: c.create_model("new", {"input_dim": float("nan")}), "not finite"),
    ]
    with connect(kind, server) as client:
        before = client.get_model(model)
        for call, message in cases:
            refused_before_sending(partial(call, client), message)
        assert client.get_model(model) == before
        assert "new" not in [m.name for m in client.list_models()]


RAGGED = [[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0]]


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_that_are_not_arrays_of_numbers_are_refused_before_sending(
    server: ServerProcess, model: str, kind: str
) -> None:
    with connect(kind, server) as client:
        before = client.get_model(model)
        refused_before_sending(lambda: client.predict(model, RAGGED), "a rectangular array")
        refused_before_sending(lambda: client.train_step(model, RAGGED, Y), "inputs must be")
        refused_before_sending(lambda: client.train_step(model, X, [[0.0], [1, 2]]), "targets")
        refused_before_sending(lambda: client.predict(model, [["a"] * 5]), "cannot send")
        refused_before_sending(lambda: client.predict(model, X.astype(complex)), "cannot send")
        huge = np.full((1, 5), 2**63, dtype=np.uint64)
        refused_before_sending(lambda: client.predict(model, huge), "out of the range of int64")
        assert client.get_model(model) == before
        # Nested lists of numbers are arrays like any other.
        lists = client.predict(model, X.tolist()).outputs
        np.testing.assert_array_equal(lists, client.predict(model, X).outputs)


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        (np.bool_, "<f4"),
        (np.float16, "<f4"),
        (np.float32, "<f4"),
        (np.dtype(">f4"), "<f4"),
        (np.float64, "<f8"),
        (np.longdouble, "<f8"),
        (np.int8, "<i4"),
        (np.int32, "<i4"),
        (np.dtype(">i8"), "<i8"),
        (np.uint16, "<i4"),
        (np.uint32, "<i8"),
        (np.uint64, "<i8"),
    ],
)
def test_both_transports_send_each_dtype_as_the_same_wire_dtype(given: Any, sent: str) -> None:
    array = tensor(np.arange(6).reshape(2, 3).astype(given), "inputs")
    assert array.dtype.str == sent and array.flags.c_contiguous
    name = {code: name for name, code in wire.DTYPES.items()}[sent]
    assert rest_client.tensor_json(array, "base64")["dtype"] == name
    message = grpc_client.encode_tensor(array)
    np.testing.assert_array_equal(grpc_client.decode_tensor(message), array)
    assert grpc_client.decode_tensor(message).dtype.str == sent
