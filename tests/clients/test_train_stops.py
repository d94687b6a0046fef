"""A training run that stops midway says which batches stayed applied, the same way on all
four clients, whether the server refused a step or a batch failed the clients' checks."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from propserve.clients import ClientError, FailedPrecondition, GrpcClient, InvalidArgument
from tests.clients.helpers import KINDS, SPECS, WAIT, batches_for, connect
from tests.support.server import ServerProcess

SPEC = SPECS["f64-mse-sgd"]
_names = itertools.count()


@pytest.fixture
def name(server: ServerProcess) -> str:
    """A fresh model, trained for 3 steps."""
    model = f"stops{next(_names)}"
    with GrpcClient(server.grpc_target, timeout=WAIT) as client:
        client.create_model(model, SPEC)
        client.train(model, batches_for(SPEC, 3, seed=1))
    return model


def diverging() -> tuple[Any, Any]:
    """A batch of finite numbers whose squared error is not finite: the server refuses it."""
    x, _ = batches_for(SPEC, 1, seed=2)[0]
    return x, np.full((len(x), 2), 1e200)


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_the_server_refuses_stops_the_run_and_says_what_stayed_applied(
    server: ServerProcess, name: str, kind: str
) -> None:
    good = batches_for(SPEC, 2, seed=3)
    with connect(kind, server) as client:
        with pytest.raises(FailedPrecondition) as caught:
            client.train(name, [*good, diverging()])
        error = caught.value
        assert error.message.startswith("batches 0–1 applied (step 3 → 5); stopped at batch 2: ")
        assert error.message == str(error)
        assert error.message.endswith(error.reason) and "batch" not in error.reason
        assert "refused" in error.reason, error.reason
        assert error.applied is not None
        assert [r.step for r in error.applied] == [4, 5]
        assert error.request_id is not None and error.status is not None
        assert client.get_model(name).head_step == 5


@pytest.mark.parametrize("kind", KINDS)
def test_batches_after_a_refused_one_are_not_applied(
    server: ServerProcess, name: str, kind: str
) -> None:
    """The same with batches behind the refused one, already on their way.

    Only the error's reason is left unchecked: grpc.aio may lose it when a write races the
    stream's end (grpc/grpc#36066, see propserve.clients.grpc_client); what stayed applied
    is known either way."""
    good = batches_for(SPEC, 5, seed=3)
    with connect(kind, server) as client:
        with pytest.raises(ClientError) as caught:
            client.train(name, [*good[:2], diverging(), *good[2:]])
        error = caught.value
        assert error.message.startswith("batches 0–1 applied (step 3 → 5); stopped at batch 2: ")
        assert error.applied is not None and [r.step for r in error.applied] == [4, 5]
        assert client.get_model(name).head_step == 5


def test_both_transports_say_it_in_the_same_words(server: ServerProcess) -> None:
    messages = {}
    for kind in ("grpc", "rest"):
        model = f"words-{kind}"
        with connect(kind, server) as client:
            client.create_model(model, SPEC)
            with pytest.raises(FailedPrecondition) as caught:
                client.train(model, [*batches_for(SPEC, 1, seed=4), diverging()])
        messages[kind] = caught.value.message
    assert messages["grpc"] == messages["rest"]
    assert messages["grpc"].startswith("batches 0–0 applied (step 0 → 1); stopped at batch 1: ")


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_that_fails_the_clients_checks_stops_the_run_there(
    server: ServerProcess, name: str, kind: str
) -> None:
    good = batches_for(SPEC, 2, seed=5)
    ragged = ([[0.0] * 5, [0.0]], np.zeros((2, 2)))
    with connect(kind, server) as client:
        with pytest.raises(InvalidArgument) as caught:
            client.train(name, [*good, ragged, *good])
        error = caught.value
        assert error.message.startswith("batches 0–1 applied (step 3 → 5); stopped at batch 2: ")
        assert "inputs must be a rectangular array" in error.reason
        assert error.status is None  # found here, not by the server
        assert client.get_model(name).head_step == 5

        with pytest.raises(InvalidArgument) as caught:
            client.train(name, [("not", "a", "pair")])
        assert caught.value.message == (
            "no batches applied; stopped at batch 0: a batch must be a pair (inputs, targets), "
            "got tuple"
        )
        assert client.get_model(name).head_step == 5


@pytest.mark.parametrize("kind", KINDS)
def test_an_exception_from_the_batches_is_raised_as_it_is_with_a_note(
    server: ServerProcess, name: str, kind: str
) -> None:
    class Unreadable(Exception):
        pass

    def batches() -> Iterator[Any]:
        yield from batches_for(SPEC, 2, seed=6)
        raise Unreadable("disk gone")

    with connect(kind, server) as client:
        with pytest.raises(Unreadable) as caught:
            client.train(name, batches())
        assert caught.value.__notes__ == [
            "train: batches 0–1 applied (step 3 → 5); stopped at batch 2: "
            "the batches raised this exception"
        ]
        assert client.get_model(name).head_step == 5
