"""The writer's lease (durable.WriterLease), the second guard beside flock: on a filesystem
whose flock does not exclude another host's writer (NFS), two writers must still never both
write. flock is switched off here to stand for such a filesystem."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from propserve.service.errors import FailedPrecondition
from propserve.service.store import ModelStore, durable
from propserve.service.store.modelstore import LEASE_FILE

SPEC: dict[str, Any] = {"input_dim": 1, "layers": [{"units": 1}], "loss": "mse"}
PERIOD = 0.1


class NoLock:
    """flock as NFS with local_lock gives it: it excludes nobody."""

    def __init__(self, path: Path, root: Path) -> None:
        pass

    def release(self) -> None:
        pass


@pytest.fixture
def no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable, "WriterLock", NoLock)


@pytest.fixture
def writer(tmp_path: Path, no_flock: None) -> Iterator[ModelStore]:
    store = ModelStore(tmp_path / "store", lease_period=PERIOD)
    store.create_model("m", SPEC)
    yield store
    store.close()


def lease_of(store: ModelStore) -> dict[str, Any]:
    return lease_of_path(store.root)


def lease_of_path(root: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((root / LEASE_FILE).read_text())
    return doc


def other_host_lease(path: Path, renewed: float) -> None:
    """The lease file of another host's writer, replaced whole as a writer does (a reader
    must never find it half written: it would read no holder at all)."""
    doc = {"id": "elsewhere", "host": "another-host", "pid": 1, "start": "1", "renewed": renewed}
    temporary = path.with_name(f"{path.name}.elsewhere")
    temporary.write_text(json.dumps(doc))
    os.replace(temporary, path)


def test_the_lease_names_the_writer_and_goes_with_it(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", lease_period=PERIOD)
    lease = lease_of(store)
    assert (lease["host"], lease["pid"]) == (socket.gethostname(), os.getpid())
    first = lease["renewed"]
    # Renewed while it writes: every PERIOD, or as soon as a loaded machine runs the thread.
    deadline = time.monotonic() + 60
    while lease_of(store)["renewed"] == first and time.monotonic() < deadline:
        time.sleep(PERIOD)
    assert lease_of(store)["renewed"] > first
    store.close()
    assert not (store.root / LEASE_FILE).exists()


def test_a_second_writer_is_refused_when_flock_excludes_nobody(writer: ModelStore) -> None:
    with pytest.raises(FailedPrecondition, match="held by another writer"):
        ModelStore(writer.root, lease_period=PERIOD)
    writer.save_version("m", b"state", step=1)  # the first goes on writing
    assert [v.version for v in writer.list_versions("m")] == [1]
    assert ModelStore(writer.root, read_only=True).list_models()  # readers are welcome


def test_a_writer_whose_lease_was_taken_stops_writing(writer: ModelStore) -> None:
    writer.save_version("m", b"state", step=1)
    other_host_lease(writer.root / LEASE_FILE, time.time())  # another host took it over
    for change in (
        lambda: writer.save_version("m", b"state", step=2),
        lambda: writer.set_label("m", "stable", 1),
        lambda: writer.create_model("n", SPEC),
        lambda: writer.delete_model("m"),
    ):
        with pytest.raises(FailedPrecondition, match="taken over"):
            change()
    assert [v.version for v in writer.list_versions("m")] == [1]
    assert writer.get_model("m").labels == {}
    writer.close()
    assert lease_of(writer)["id"] == "elsewhere"  # closing leaves the other's lease alone


def test_a_lease_another_host_keeps_renewing_refuses_the_open(
    tmp_path: Path, no_flock: None
) -> None:
    root = tmp_path / "store"
    root.mkdir()
    stop = threading.Event()

    # The other host's clock runs a minute ahead: its lease stays live between renewals
    # however late this machine runs the renewing thread (a loaded machine may not run it
    # for longer than the lease's 3 * PERIOD).
    ahead = 60.0

    def renew() -> None:
        while not stop.is_set():
            other_host_lease(root / LEASE_FILE, time.time() + ahead)
            time.sleep(PERIOD / 2)

    other_host_lease(root / LEASE_FILE, time.time() + ahead)
    renewer = threading.Thread(target=renew)
    renewer.start()
    try:
        started = time.monotonic()
        with pytest.raises(FailedPrecondition, match="another-host"):
            ModelStore(root, lease_period=PERIOD)
        # It refused only after waiting the lease's lifetime for it to lapse.
        assert time.monotonic() - started >= 3 * PERIOD
    finally:
        stop.set()
        renewer.join()


def test_a_lapsed_lease_of_another_host_is_taken_over(tmp_path: Path, no_flock: None) -> None:
    root = tmp_path / "store"
    root.mkdir()
    other_host_lease(root / LEASE_FILE, time.time())  # its writer is gone: never renewed
    store = ModelStore(root, lease_period=PERIOD)
    try:
        assert lease_of(store)["host"] == socket.gethostname()
        store.create_model("m", SPEC)
    finally:
        store.close()


def test_the_lease_of_a_dead_process_on_this_host_is_taken_at_once(
    tmp_path: Path, no_flock: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    root.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    doc = {"id": "crashed", "host": socket.gethostname(), "pid": int(gone.stdout), "start": "1"}
    (root / LEASE_FILE).write_text(json.dumps({**doc, "renewed": time.time()}))
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    store = ModelStore(root, lease_period=PERIOD)
    store.close()
    assert waits == []  # no waiting for a lease nobody can renew
