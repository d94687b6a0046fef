"""Evaluate on the real server, through both clients: the loss and accuracy of the head, a
saved version or a label's version on given rows, changing nothing.

The reference is the server's own training step: a TrainStep reports the loss of the batch
before its update, computed by the same forward pass and loss, so an Evaluate of the head on
that batch just before must equal it bit for bit (and the engine's losses are checked
against PyTorch in tests/engine)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from propserve.clients import AsyncGrpcClient, Client, GrpcClient, RestClient
from propserve.clients.errors import InvalidArgument, NotFound
from tests.support.server import ServerProcess

SPEC: dict[str, Any] = {
    "input_dim": 5,
    "layers": [{"units": 8, "activation": "tanh"}, {"units": 3, "activation": "softmax"}],
    "loss": "softmax_cross_entropy",
    "optimizer": {"name": "sgd", "lr": 0.5},
    "dtype": "float64",
    "seed": 9,
}
X = np.random.default_rng(4).standard_normal((6, 5))
Y = np.array([0, 1, 2, 0, 1, 2])


@pytest.fixture(params=["grpc", "rest"])
def client(request: pytest.FixtureRequest, server: ServerProcess) -> Iterator[Client]:
    made: Client = (
        GrpcClient(server.grpc_target) if request.param == "grpc" else RestClient(server.rest_url)
    )
    with made:
        yield made


def test_evaluate_equals_the_loss_the_next_step_reports_and_changes_nothing(
    client: Client,
) -> None:
    name = f"ev-{type(client).__name__.lower()}"
    client.create_model(name, SPEC)
    before = client.evaluate(name, X, Y)
    assert (before.rows, before.step, before.version) == (6, 0, None)
    assert before.accuracy is not None and 0 <= before.accuracy <= 1
    assert client.get_model(name).head_step == 0  # nothing changed
    step = client.train_step(name, X, Y)
    assert step.loss == before.loss and step.accuracy == before.accuracy
    after = client.evaluate(name, X, Y)
    assert after.step == 1 and after.loss < before.loss  # a step of SGD on the same rows


def test_evaluate_a_version_or_a_label(client: Client) -> None:
    name = f"evv-{type(client).__name__.lower()}"
    client.create_model(name, SPEC)
    client.save_version(name)
    first = client.evaluate(name, X, Y)
    client.set_label(name, "stable", 1)
    for _ in range(3):
        client.train_step(name, X, Y)
    by_version = client.evaluate(name, X, Y, version=1)
    by_label = client.evaluate(name, X, Y, label="stable")
    for answer in (by_version, by_label):
        assert (answer.loss, answer.accuracy, answer.step, answer.version) == (
            first.loss,
            first.accuracy,
            0,
            1,
        )
    assert client.evaluate(name, X, Y).step == 3


def test_bad_evaluations_are_refused(client: Client) -> None:
    name = f"evb-{type(client).__name__.lower()}"
    client.create_model(name, SPEC)
    with pytest.raises(NotFound):
        client.evaluate("ghost", X, Y)
    with pytest.raises(NotFound):
        client.evaluate(name, X, Y, version=7)
    with pytest.raises(InvalidArgument, match="out of range"):
        client.evaluate(name, X, np.array([0, 1, 5, 0, 1, 2]))  # a class the model lacks
    with pytest.raises(InvalidArgument):
        client.evaluate(name, X, Y[:3])  # rows differ
    with pytest.raises(InvalidArgument):
        client.evaluate(name, X[:, :4], Y)  # features differ
    with pytest.raises(InvalidArgument):
        client.evaluate(name, X, Y, version=1, label="stable")
    assert client.get_model(name).head_step == 0


def test_the_rest_body_is_checked_like_train_steps(server: ServerProcess) -> None:
    with RestClient(server.rest_url) as rest:
        rest.create_model("evr", SPEC)
    url = f"{server.rest_url}/v1/models/evr/evaluate"
    good = {"inputs": X.tolist(), "targets": Y.tolist()}
    answer = httpx.post(url, json=good, timeout=30)
    assert answer.status_code == 200
    assert set(answer.json()) == {"loss", "accuracy", "rows", "step", "version"}
    for body in (
        {"inputs": X.tolist()},
        {**good, "learning_rate": 0.1},
        {**good, "version": None},
        {**good, "version": "1"},
        {**good, "label": 3},
    ):
        refused = httpx.post(url, json=body, timeout=30)
        assert refused.status_code == 400, body
        assert refused.json()["error"]["code"] == "invalid_argument"


def test_the_async_client_evaluates_too(server: ServerProcess) -> None:
    import asyncio  # noqa: PLC0415 - only here

    async def run() -> tuple[float, float]:
        async with AsyncGrpcClient(server.grpc_target) as client:
            await client.create_model("eva", SPEC)
            evaluation = await client.evaluate("eva", X, Y)
            step = await client.train_step("eva", X, Y)
            return evaluation.loss, step.loss

    evaluated, stepped = asyncio.run(run())
    assert evaluated == stepped
