"""Read replicas (``propserve serve --follow``) beside a writer, each a real server in its own
process over one store folder: what a replica serves while the writer saves, moves labels and
applies retention; a writer killed mid-save; a version corrupted on disk; an empty store; a
store that disappears; the refusal of every change; and ``--workers``.

Predictions checked bit for bit are answered alone (one client, one request at a time, on a
model no other load touches: batches are per model and version), so each equals the engine's
forward pass of the version the answer names, as the writer answers it alone.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from propserve.clients import GrpcClient, RestClient
from propserve.clients.errors import FailedPrecondition, NotFound
from tests.support.server import ServerProcess, start_server

SPEC: dict[str, Any] = {
    "input_dim": 6,
    "layers": [{"units": 16, "activation": "tanh"}, {"units": 3, "activation": "softmax"}],
    "loss": "softmax_cross_entropy",
    "optimizer": {"name": "adam", "lr": 0.05},
    "dtype": "float32",
    "seed": 5,
}
ROWS = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
TARGETS = np.array([0, 1, 2, 1])
POLL = "0.1"
#: How long a replica may take to show a change: many polls, on a busy machine.
PATIENCE = 30.0


def replica(
    store: Path, tmp: Path, writer: ServerProcess | None = None, **env: str
) -> ServerProcess:
    settings = {"PROPSERVE_FOLLOW": "true", "PROPSERVE_POLL_INTERVAL": POLL, **env}
    if writer is not None:
        settings["PROPSERVE_WRITER_URL"] = writer.rest_url
    return start_server(store, env=settings, log_dir=tmp / f"replica-{time.monotonic_ns()}")


def eventually(check: Any, what: str) -> Any:
    """``check()``'s first truthy answer, polled until PATIENCE runs out."""
    deadline = time.monotonic() + PATIENCE
    while True:
        try:
            answer = check()
            if answer:
                return answer
        except (NotFound, FailedPrecondition, httpx.HTTPError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen in {PATIENCE}s: {what}")
        time.sleep(0.05)


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[ServerProcess]:
    process = start_server(tmp_path / "store", log_dir=tmp_path / "writer")
    try:
        yield process
    finally:
        process.stop()


def test_a_replica_serves_what_the_writer_saves_bit_for_bit_through_moves_and_retention(
    writer: ServerProcess, tmp_path: Path
) -> None:
    with RestClient(writer.rest_url) as w:
        w.create_model("m", SPEC, retain=3)
        w.create_model("busy", SPEC)
        expected = {w.save_version("m").version: w.predict("m", ROWS, version=1).outputs}
        w.save_version("busy")
        w.set_label("m", "stable", 1)
    follower = replica(writer.store, tmp_path, writer)
    failures: list[str] = []
    answered: list[tuple[int | None, np.ndarray]] = []
    done = threading.Event()

    def load() -> None:  # other traffic on another model, on both transports
        with RestClient(follower.rest_url) as rest, GrpcClient(follower.grpc_target) as grpc:
            while not done.is_set():
                for client in (rest, grpc):
                    try:
                        client.predict("busy", ROWS)
                    except Exception as exc:
                        failures.append(f"busy: {exc!r}")

    def verified() -> None:  # one request at a time on m: answered alone
        with RestClient(follower.rest_url) as rest:
            while not done.is_set():
                for label in (None, "stable"):
                    try:
                        answer = rest.predict("m", ROWS, label=label)
                        answered.append((answer.version, answer.outputs))
                    except Exception as exc:
                        failures.append(f"m {label}: {exc!r}")

    threads = [threading.Thread(target=load), threading.Thread(target=verified)]
    try:
        for thread in threads:
            thread.start()
        with RestClient(writer.rest_url) as w:
            for _ in range(8):
                w.train_step("m", ROWS, TARGETS)
                version = w.save_version("m").version
                expected[version] = w.predict("m", ROWS, version=version).outputs
                w.set_label("m", "stable", version - 1)  # the label moves under load
                time.sleep(0.15)
            newest = version
        with RestClient(follower.rest_url) as rest:
            eventually(lambda: rest.get_model("m").latest_version == newest, "the newest")
            # Without a version, the stable label answers (it names one before the newest).
            eventually(lambda: rest.predict("m", ROWS).version == newest - 1, "the last move")
            answer = rest.predict("m", ROWS, version=newest)
            answered.append((answer.version, answer.outputs))
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=60)
        follower.stop()
    assert failures == []
    seen = {source for source, _ in answered}
    assert len(seen) >= 3 and None not in seen, seen  # it followed the saves and moves
    for source, outputs in answered:
        assert source is not None and np.array_equal(outputs, expected[source]), source
    # Retention kept 3 versions (and the labelled one): the older left the replica too.
    assert "replica.version_refused" not in follower.log()


def test_every_change_is_refused_naming_the_writer(writer: ServerProcess, tmp_path: Path) -> None:
    with RestClient(writer.rest_url) as w:
        w.create_model("m", SPEC)
        w.save_version("m")
    follower = replica(writer.store, tmp_path, writer)
    try:
        with RestClient(follower.rest_url) as rest, GrpcClient(follower.grpc_target) as grpc:
            changes: list[Callable[[Any], object]] = [
                lambda c: c.train_step("m", ROWS, TARGETS),
                lambda c: c.train("m", [(ROWS, TARGETS)]),
                lambda c: c.save_version("m"),
                lambda c: c.set_label("m", "stable", 1),
                lambda c: c.rollback("m", version=1),
                lambda c: c.create_model("n", SPEC),
                lambda c: c.delete_model("m"),
                lambda c: c.update_model("m", retain=2),
            ]
            for client in (rest, grpc):
                for change in changes:
                    with pytest.raises(FailedPrecondition) as refused:
                        change(client)
                    assert "read-only replica" in str(refused.value)
                    assert writer.rest_url in str(refused.value)
            assert rest.get_model("m").latest_version == 1
            unload = httpx.post(f"{follower.rest_url}/v2/repository/models/m/unload")
            assert unload.status_code == 409
    finally:
        follower.stop()
    with RestClient(writer.rest_url) as w:
        assert [v.version for v in w.list_versions("m")] == [1]


def test_a_replica_on_an_empty_store_serves_models_as_they_appear(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    follower = replica(store, tmp_path)
    try:
        assert httpx.get(f"{follower.rest_url}/readyz").status_code == 200
        writer = start_server(store, log_dir=tmp_path / "writer")
        try:
            with RestClient(writer.rest_url) as w:
                w.create_model("m", SPEC)
                with RestClient(follower.rest_url) as rest:
                    eventually(lambda: rest.get_model("m"), "the new model")
                    with pytest.raises(FailedPrecondition, match="no saved version"):
                        rest.predict("m", ROWS)
                    w.save_version("m")
                    expected = w.predict("m", ROWS, version=1).outputs
                    answer = eventually(lambda: rest.predict("m", ROWS), "its first version")
                    assert answer.version == 1 and np.array_equal(answer.outputs, expected)
                    w.delete_model("m")
                    eventually(lambda: not rest.list_models(), "the deletion")
        finally:
            writer.stop()
    finally:
        follower.stop()


def test_a_corrupt_version_is_refused_and_the_previous_one_stays(
    writer: ServerProcess, tmp_path: Path
) -> None:
    with RestClient(writer.rest_url) as w:
        w.create_model("m", SPEC)
        w.save_version("m")
        w.set_label("m", "stable", 1)
        first = w.predict("m", ROWS, version=1).outputs
    follower = replica(writer.store, tmp_path, writer)
    try:
        follower.process.send_signal(signal.SIGSTOP)  # it looks away while v2 is damaged
        try:
            with RestClient(writer.rest_url) as w:
                w.train_step("m", ROWS, TARGETS)
                w.save_version("m")
                weights = writer.store / "m" / "versions" / "2" / "weights.safetensors"
                data = bytearray(weights.read_bytes())
                data[-1] ^= 0xFF
                weights.write_bytes(bytes(data))
                w.set_label("m", "stable", 2)
        finally:
            follower.process.send_signal(signal.SIGCONT)
        with RestClient(follower.rest_url) as rest:
            eventually(lambda: "replica.version_refused" in follower.log(), "the refusal")
            for label in (None, "stable"):
                answer = rest.predict("m", ROWS, label=label)
                assert answer.version == 1 and np.array_equal(answer.outputs, first)
            metrics = httpx.get(f"{follower.rest_url}/metrics").text
            errors = next(
                line for line in metrics.splitlines() if line.startswith("propserve_replica_follow")
            )
            assert float(errors.split()[-1]) >= 1
    finally:
        follower.stop()


def test_a_writer_killed_mid_save_leaves_the_replica_serving_whole_versions(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    layers = [{"units": 512, "activation": "relu"}, {"units": 3, "activation": "softmax"}]
    big = {**SPEC, "input_dim": 256, "layers": layers}
    writer = start_server(store, log_dir=tmp_path / "writer")
    try:
        with RestClient(writer.rest_url) as w:
            w.create_model("m", big)
            w.save_version("m")
    except BaseException:
        writer.kill()
        raise
    follower = replica(store, tmp_path)
    x = np.random.default_rng(2).standard_normal((2, 256)).astype(np.float32)
    saving = threading.Event()

    def save_forever() -> None:
        try:
            with RestClient(writer.rest_url, timeout=10) as w:
                while True:
                    saving.set()
                    w.save_version("m")
        except Exception:
            return

    thread = threading.Thread(target=save_forever)
    try:
        thread.start()
        saving.wait(PATIENCE)
        time.sleep(0.3)
        writer.kill()  # SIGKILL, most likely mid-save
        thread.join(timeout=60)
        with RestClient(follower.rest_url) as rest:
            seen = set()
            for _ in range(20):
                answer = rest.predict("m", x)
                seen.add(answer.version)
                time.sleep(0.05)
        assert httpx.get(f"{follower.rest_url}/readyz").status_code == 200
        assert "replica.version_refused" not in follower.log()
        # Every version the replica answered from is whole in the store.
        for version in seen:
            meta = json.loads((store / "m" / "versions" / str(version) / "meta.json").read_text())
            size = (store / "m" / "versions" / str(version) / "weights.safetensors").stat().st_size
            assert meta["size_bytes"] == size
        restarted = start_server(store, log_dir=tmp_path / "writer2")  # cleans the staging
        try:
            with RestClient(restarted.rest_url) as w:
                newest = w.save_version("m").version
            with RestClient(follower.rest_url) as rest:
                eventually(lambda: rest.predict("m", x).version == newest, "the next save")
        finally:
            restarted.stop()
    finally:
        writer.kill()
        follower.stop()


def test_readiness_follows_the_store(writer: ServerProcess, tmp_path: Path) -> None:
    with RestClient(writer.rest_url) as w:
        w.create_model("m", SPEC)
        w.save_version("m")
    writer.stop()
    follower = replica(writer.store, tmp_path)
    moved = writer.store.with_name("elsewhere")
    try:
        os.rename(writer.store, moved)
        eventually(lambda: httpx.get(f"{follower.rest_url}/readyz").status_code == 503, "not ready")
        with RestClient(follower.rest_url) as rest:  # what is in memory is still served
            assert rest.predict("m", ROWS).version == 1
        os.rename(moved, writer.store)
        eventually(lambda: httpx.get(f"{follower.rest_url}/readyz").status_code == 200, "ready")
    finally:
        if moved.exists():
            os.rename(moved, writer.store)
        follower.stop()


def test_workers_share_the_ports_and_one_that_dies_comes_back(
    writer: ServerProcess, tmp_path: Path
) -> None:
    with RestClient(writer.rest_url) as w:
        w.create_model("m", SPEC)
        w.save_version("m")
        expected = w.predict("m", ROWS, version=1).outputs
    follower = replica(writer.store, tmp_path, writer, PROPSERVE_WORKERS="2")
    try:
        ready = json.loads(next(follower.log_path.parent.glob("ready-*.json")).read_text())
        workers = ready["workers"]
        assert len(workers) == 2 and ready["pid"] == follower.process.pid
        for _ in range(30):  # a new connection each: the kernel spreads them
            with httpx.Client(base_url=follower.rest_url) as http:
                body = {"inputs": ROWS.tolist()}
                answer = http.post("/v1/models/m/predict", json=body).json()
                assert answer["version"] == 1
                assert np.array_equal(np.asarray(answer["outputs"], np.float32), expected)
        with GrpcClient(follower.grpc_target) as grpc:
            assert grpc.predict("m", ROWS).version == 1
        os.kill(workers[0], signal.SIGKILL)
        eventually(lambda: follower.log().count('"server.ready"') == 3, "the worker restarted")
        with RestClient(follower.rest_url) as rest:
            for _ in range(10):
                assert rest.predict("m", ROWS).version == 1
        with RestClient(writer.rest_url) as w:
            w.save_version("m")
        with RestClient(follower.rest_url) as rest:
            eventually(lambda: all(rest.predict("m", ROWS).version == 2 for _ in range(6)), "v2")
    finally:
        assert follower.stop() == 0
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
