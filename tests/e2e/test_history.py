"""Training history on the real server: every step recorded as its TrainStep reported it,
served by GetHistory on both transports (paged, downsampled) and WatchHistory live,
persisted with the versions across restarts, rewound by a rollback, and shown by the CLI.

The reference for each point is the step's own answer: the loss, accuracy and rows a
TrainStep returned must come back unchanged, bit for bit."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from propserve.cli import main
from propserve.clients import Client, GrpcClient, RestClient
from propserve.clients.errors import InvalidArgument, NotFound
from propserve.clients.types import HistoryPoint, StepResult
from propserve.v1 import model_service_pb2 as pb
from propserve.v1 import model_service_pb2_grpc as pb_grpc
from tests.support.server import ServerProcess, start_server

SPEC: dict[str, Any] = {
    "input_dim": 4,
    "layers": [{"units": 6, "activation": "relu"}, {"units": 3, "activation": "softmax"}],
    "loss": "softmax_cross_entropy",
    "optimizer": {"name": "sgd", "lr": 0.1},
    "seed": 5,
}
RNG = np.random.default_rng(8)
X = RNG.standard_normal((10, 4)).astype(np.float32)
Y = np.arange(10) % 3
#: Seconds to wait for something a live stream should bring: generous for a loaded machine.
PATIENCE = 60.0


@pytest.fixture(params=["grpc", "rest"])
def client(request: pytest.FixtureRequest, server: ServerProcess) -> Iterator[Client]:
    made: Client = (
        GrpcClient(server.grpc_target, timeout=PATIENCE)
        if request.param == "grpc"
        else RestClient(server.rest_url, timeout=PATIENCE)
    )
    with made:
        yield made


def _name(client: Client, what: str) -> str:
    return f"{what}-{'g' if isinstance(client, GrpcClient) else 'r'}"


def same(points: tuple[HistoryPoint, ...], steps: list[StepResult], lr: float) -> None:
    assert [p.step for p in points] == [s.step for s in steps]
    assert [p.loss for p in points] == [s.loss for s in steps]
    assert [p.accuracy for p in points] == [s.accuracy for s in steps]
    assert [p.rows for p in points] == [s.batch_size for s in steps]
    assert all(p.learning_rate == lr for p in points)
    times = [p.time for p in points]
    assert times == sorted(times) and times[0] > 1.7e9


def test_every_step_is_recorded_as_it_was_reported(client: Client) -> None:
    name = _name(client, "rec")
    client.create_model(name, SPEC)
    steps = client.train(name, [(X, Y)] * 5)
    steps.append(client.train_step(name, X[:4], Y[:4], learning_rate=0.05))
    history = client.history(name)
    assert history.model == name and history.next_since is None
    same(history.points[:5], steps[:5], 0.1)
    same(history.points[5:], steps[5:], 0.05)


def test_paging_and_buckets(client: Client) -> None:
    name = _name(client, "page")
    client.create_model(name, SPEC)
    steps = client.train(name, [(X, Y)] * 11)
    first = client.history(name, limit=4)
    assert [p.step for p in first.points] == [1, 2, 3, 4] and first.next_since == 5
    rest = client.history(name, since=first.next_since)
    assert [p.step for p in rest.points] == list(range(5, 12)) and rest.next_since is None
    window = client.history(name, since=3, until=6)
    assert [p.step for p in window.points] == [3, 4, 5, 6]
    buckets = client.history(name, every=4)
    assert [p.step for p in buckets.points] == [4, 8, 11]
    losses = [s.loss for s in steps]
    expected = [np.mean(losses[0:4]), np.mean(losses[4:8]), np.mean(losses[8:11])]
    # A mean of at most 4 losses: a few roundings of values below 10.
    np.testing.assert_allclose([p.loss for p in buckets.points], expected, rtol=1e-14)
    assert [p.rows for p in buckets.points] == [40, 40, 30]


def test_a_rollback_rewinds_the_history_and_versions_name_their_range(client: Client) -> None:
    name = _name(client, "rb")
    client.create_model(name, SPEC)
    client.train(name, [(X, Y)] * 3)
    v1 = client.save_version(name)
    assert (v1.metrics["history_from"], v1.metrics["history_to"]) == (1, 3)
    assert 0 <= v1.metrics["mean_accuracy"] <= 1 and "last_accuracy" in v1.metrics
    client.train(name, [(X, Y)] * 4)
    client.rollback(name, version=v1.version)
    assert [p.step for p in client.history(name).points] == [1, 2, 3]
    again = client.train(name, [(X[:5], Y[:5])] * 2)
    points = client.history(name).points
    assert [p.step for p in points] == [1, 2, 3, 4, 5]
    assert [p.loss for p in points[3:]] == [s.loss for s in again]


def test_watch_history_streams_new_steps(server: ServerProcess) -> None:
    with GrpcClient(server.grpc_target, timeout=PATIENCE) as client:
        client.create_model("watched", SPEC)
        client.train("watched", [(X, Y)] * 2)
        seen: list[HistoryPoint] = []
        done = threading.Event()

        def watch() -> None:
            for point in client.watch_history("watched", since=1):
                seen.append(point)
                if point.step == 5:
                    done.set()
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        steps = client.train("watched", [(X, Y)] * 3)
        assert done.wait(PATIENCE), f"the watch saw only {[p.step for p in seen]}"
        watcher.join(PATIENCE)
    assert [p.step for p in seen] == [1, 2, 3, 4, 5]
    assert [p.loss for p in seen[2:]] == [s.loss for s in steps]


def test_history_survives_a_restart_up_to_the_last_save(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = start_server(store)
    try:
        with GrpcClient(first.grpc_target, timeout=PATIENCE) as client:
            client.create_model("kept", SPEC)
            steps = client.train("kept", [(X, Y)] * 4)
            client.save_version("kept")
            client.train("kept", [(X, Y)] * 2)  # saved again on a graceful stop
        assert first.stop() == 0
        second = start_server(store)
        with GrpcClient(second.grpc_target, timeout=PATIENCE) as client:
            points = client.history("kept").points
            assert [p.step for p in points] == [1, 2, 3, 4, 5, 6]
            assert [p.loss for p in points[:4]] == [s.loss for s in steps]
            client.train("kept", [(X, Y)] * 3)  # steps 7-9, never saved
        second.kill()  # a crash: the head goes back to step 6, and so does its history
        third = start_server(store)
        with GrpcClient(third.grpc_target, timeout=PATIENCE) as client:
            assert [p.step for p in client.history("kept").points] == [1, 2, 3, 4, 5, 6]
            assert client.get_model("kept").head_step == 6
        assert third.stop() == 0
    finally:
        for process in (first, locals().get("second"), locals().get("third")):
            if process is not None:
                process.kill()


def test_bad_history_requests(client: Client, server: ServerProcess) -> None:
    with pytest.raises(NotFound):
        client.history("no-such-model")
    for bad in ({"since": -1}, {"every": 0}, {"limit": 0}, {"limit": 10**6}):
        with pytest.raises(InvalidArgument):
            client.history("anything", **bad)
    with httpx.Client(base_url=server.rest_url, timeout=PATIENCE) as http:
        for query in ("since=-1", "every=0", "limit=0", "since=x", "limit=100001"):
            answer = http.get(f"/v1/models/rec-r/history?{query}")
            assert answer.status_code == 422, (query, answer.text)
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetHistory(pb.GetHistoryRequest(model="rec-g", limit=100_001), timeout=60)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        watch = stub.WatchHistory(pb.WatchHistoryRequest(model="nope"), timeout=60)
        with pytest.raises(grpc.RpcError) as raised:
            next(iter(watch))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_history_table_and_plot(
    server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    with GrpcClient(server.grpc_target, timeout=PATIENCE) as client:
        client.create_model("cli-hist", SPEC)
        client.train("cli-hist", [(X, Y)] * 6)
        client.save_version("cli-hist")
        client.train("cli-hist", [(X, Y)] * 2)
    connection = ["--grpc", server.grpc_target, "--rest", server.rest_url, "--timeout", "60"]
    capsys.readouterr()
    assert main(["history", "cli-hist", "--tail", "3", *connection]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["STEP", "LOSS", "ACCURACY"]
    assert [line.split()[0] for line in table[1:4]] == ["6", "7", "8"]
    assert main(["history", "cli-hist", "--plot", *connection]) == 0
    plot = capsys.readouterr().out
    assert "cli-hist: loss and accuracy by step" in plot
    assert "v1@6" in plot  # the saved version's marker
    assert "\x1b[" not in plot  # no colour codes in the text
