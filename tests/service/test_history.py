"""Training history: in memory (propserve.service.history) and in the model store
(propserve.service.store.history).

Every record's values are functions of its step (``point``), so whatever a query or a
reread returns is checked against an independent regeneration, and a torn record (one
column from another step) cannot pass."""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import struct
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from propserve.service.errors import DataLoss, InvalidArgument, NotFound
from propserve.service.history import RECORD, History, HistorySlice
from propserve.service.store import ModelStore
from propserve.service.store import history as segments
from propserve.wire import HistoryPoint

SPEC: dict[str, Any] = {"input": 3, "layers": [{"units": 2, "activation": "relu"}]}


def point(step: int, salt: int = 0) -> HistoryPoint:
    """The record of `step` (`salt` tells lineages apart); every fifth has no accuracy."""
    return HistoryPoint(
        step=step,
        loss=1.0 / (step + 1) + salt,
        accuracy=None if step % 5 == 0 else (step % 7) / 7,
        learning_rate=0.01 * (1 + step % 3),
        rows=step % 13 + 1,
        time=1.7e9 + step / 1000 + salt,
    )


def record(history: History, steps: range | list[int], salt: int = 0) -> None:
    for step in steps:
        p = point(step, salt)
        history.record(p.step, p.loss, p.accuracy, p.learning_rate, p.rows, p.time)


def expected(steps: range | list[int], salt: int = 0) -> list[HistoryPoint]:
    return [point(step, salt) for step in steps]


def everything(history: History, **query: Any) -> list[HistoryPoint]:
    """All points of a query, page after page by `next_since`."""
    points: list[HistoryPoint] = []
    since = query.pop("since", None)
    while True:
        page = history.query(since=since, **query)
        points += page.points()
        if page.next_since is None:
            return points
        assert page.next_since > page.steps[-1]
        since = page.next_since


def same_records(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> None:
    """Equal bit for bit (NaN accuracies included), with the first difference on failure."""
    assert a.dtype == RECORD and b.dtype == RECORD
    assert len(a) == len(b), f"{len(a)} records vs {len(b)}"
    raw_a, raw_b = a.view(np.uint64).reshape(-1, 6), b.view(np.uint64).reshape(-1, 6)
    differ = np.flatnonzero((raw_a != raw_b).any(axis=1))
    assert not len(differ), f"first difference at {differ[0]}: {a[differ[0]]} vs {b[differ[0]]}"


# --- in memory --------------------------------------------------------------------------


def test_record_and_query() -> None:
    history = History()
    assert len(history) == 0 and history.last_step is None and history.last is None
    assert history.query() == HistorySlice([], [], [], [], [], [], None)
    record(history, range(1, 101))
    assert len(history) == 100 and history.last_step == 100 and history.last == point(100)
    assert history.query().points() == expected(range(1, 101))
    assert history.query(since=10, until=20).points() == expected(range(10, 21))
    assert history.query(since=95).points() == expected(range(95, 101))
    assert history.query(until=3).points() == expected(range(1, 4))
    assert history.query(since=101).points() == []
    assert history.query(since=50, until=40).points() == []


def test_columns_are_plain_python_values() -> None:
    history = History()
    record(history, range(1, 6))
    page = history.query()
    assert page.steps == [1, 2, 3, 4, 5] and page.accuracy[4] is None
    for column in (page.steps, page.loss, page.accuracy, page.learning_rate, page.rows):
        assert type(column) is list
    assert all(type(v) is int for v in page.steps + page.rows)
    assert all(type(v) is float for v in page.loss + page.learning_rate + page.time)
    assert [type(a) for a in page.accuracy] == [float, float, float, float, type(None)]


def test_limit_and_cursor() -> None:
    history = History()
    record(history, [*range(1, 60), *range(70, 130, 3)])  # a gap, then every third step
    first = history.query(since=5, until=100, limit=10)
    assert first.steps == list(range(5, 15)) and first.next_since == 15
    last = history.query(since=97, until=100, limit=10)
    assert last.steps == [97, 100] and last.next_since is None
    exact = history.query(since=1, until=10, limit=10)
    assert len(exact) == 10 and exact.next_since is None
    pages = everything(history, until=100, limit=7)
    assert pages == expected([*range(1, 60), *range(70, 101, 3)])


def downsampled(points: list[HistoryPoint], every: int) -> list[HistoryPoint]:
    """The reference: buckets of `every` steps, by a plain loop."""
    buckets: dict[int, list[HistoryPoint]] = {}
    for p in points:
        buckets.setdefault((p.step - 1) // every, []).append(p)
    out = []
    for members in buckets.values():
        accuracies = [p.accuracy for p in members if p.accuracy is not None]
        out.append(
            HistoryPoint(
                step=members[-1].step,
                loss=sum(p.loss for p in members) / len(members),
                accuracy=sum(accuracies) / len(accuracies) if accuracies else None,
                learning_rate=members[-1].learning_rate,
                rows=sum(p.rows for p in members),
                time=members[-1].time,
            )
        )
    return out


def close_points(ours: list[HistoryPoint], reference: list[HistoryPoint]) -> None:
    assert [p.step for p in ours] == [p.step for p in reference]
    for a, b in zip(ours, reference, strict=True):
        assert (a.step, a.learning_rate, a.rows, a.time) == (
            b.step,
            b.learning_rate,
            b.rows,
            b.time,
        ), f"ours {a} vs reference {b}"
        assert math.isclose(a.loss, b.loss, rel_tol=1e-12), f"ours {a} vs reference {b}"
        if b.accuracy is None:
            assert a.accuracy is None, f"ours {a} vs reference {b}"
        else:
            assert a.accuracy is not None
            assert math.isclose(a.accuracy, b.accuracy, rel_tol=1e-12), f"{a} vs {b}"


@pytest.mark.parametrize(
    ("every", "since", "until", "limit"),
    [(10, None, None, 1000), (10, 15, 95, 3), (7, None, 200, 4), (1000, None, None, 2)],
)
def test_every_downsamples_by_buckets(
    every: int, since: int | None, until: int | None, limit: int
) -> None:
    history = History()
    steps = [s for s in range(1, 300) if s % 11 != 0]  # gaps inside buckets
    record(history, steps)
    inside = [p for p in expected(steps) if (since or 0) <= p.step <= (until or 10**9)]
    pages = everything(history, until=until, since=since, every=every, limit=limit)
    close_points(pages, downsampled(inside, every))


def test_every_bucket_without_accuracy_has_none() -> None:
    history = History()
    history.record(1, 1.0, None, 0.1, 4, 10.0)
    history.record(2, 3.0, None, 0.2, 6, 11.0)
    history.record(3, 5.0, 0.5, 0.3, 1, 12.0)
    history.record(4, 7.0, None, 0.4, 1, 13.0)
    page = history.query(every=2)
    assert page.steps == [2, 4] and page.loss == [2.0, 6.0] and page.accuracy == [None, 0.5]
    assert page.rows == [10, 2] and page.learning_rate == [0.2, 0.4] and page.time == [11, 13]
    assert page.every == 2 and page.next_since is None


@pytest.mark.parametrize(
    "query",
    [{"every": 0}, {"limit": 0}, {"since": -1}, {"until": 1.5}, {"every": True}],
)
def test_bad_queries_are_refused(query: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        History().query(**query)


def test_bound_drops_the_oldest() -> None:
    history = History(limit=100)
    record(history, range(1, 1001))
    assert 100 <= len(history) <= 125
    kept = history.query(limit=1000).points()
    assert kept == expected(range(1001 - len(history), 1001))
    record(history, range(1001, 1101))
    assert history.query(limit=1000).points()[-100:] == expected(range(1001, 1101))
    assert History.restore(history.records(), limit=10).query().steps == list(range(1091, 1101))


def test_rewind_drops_later_steps_and_training_continues() -> None:
    history = History()
    record(history, range(1, 51))
    history.rewind(30)
    assert history.last_step == 30 and history.query().points() == expected(range(1, 31))
    record(history, range(31, 41), salt=1)
    assert history.query().points() == expected(range(1, 31)) + expected(range(31, 41), 1)
    history.rewind(100)  # above the last step: nothing to drop
    assert history.last_step == 40
    history.rewind(0)
    assert len(history) == 0 and history.last_step is None


def test_recording_an_earlier_step_replaces_the_later_ones() -> None:
    history = History()
    record(history, range(1, 21))
    record(history, [15, 16], salt=2)
    assert history.query().points() == expected(range(1, 15)) + expected([15, 16], 2)


def test_readers_never_see_a_torn_record() -> None:
    # A small limit makes the writer grow, bound and rewind often while readers query.
    history = History(limit=500)
    done = threading.Event()
    problems: list[str] = []

    def write() -> None:
        rng = random.Random(7)
        step = 0
        for _ in range(60_000):
            step += rng.choice((1, 2))  # so that re-recorded steps land on other rows
            if rng.random() < 0.001:
                step = max(step - rng.randrange(1, 300), 1)
                history.rewind(step - 1)
            record(history, [step])
        done.set()

    def read(seed: int) -> None:
        rng = random.Random(seed)
        reads = 0
        while not done.is_set() or reads < 10:
            reads += 1
            every = rng.choice([1, 1, 3])
            last = history.last_step or 0
            since = rng.choice([None, max(last - rng.randrange(400), 0)])  # mostly the tail
            page = history.query(since=since, every=every, limit=400)
            if any(b <= a for a, b in zip(page.steps, page.steps[1:], strict=False)):
                problems.append(f"steps not increasing: {page.steps[:10]}...")
            if every == 1:
                for p in page.points():
                    if p != point(p.step):
                        problems.append(f"torn record {p} vs {point(p.step)}")

    readers = [threading.Thread(target=read, args=(seed,)) for seed in range(3)]
    writer = threading.Thread(target=write)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so that a race window gets hit
    try:
        for thread in [*readers, writer]:
            thread.start()
        for thread in [writer, *readers]:
            thread.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    assert done.is_set() and not problems, problems[:5]


def test_what_a_reader_holds_is_never_rewritten() -> None:
    # The rule readers rely on: rows below a published count never change, whatever the
    # writer does next (rewind, re-record other values, grow, drop the oldest).
    history = History(limit=64)
    record(history, range(1, 61))
    held = history.records()
    before = held.tobytes()
    history.rewind(10)
    record(history, range(11, 200, 2), salt=3)
    assert held.tobytes() == before
    assert history.query(since=195).points() == expected([195, 197, 199], 3)


def test_unsaved_and_mark_saved() -> None:
    history = History()
    record(history, range(1, 11))
    pending = history.unsaved()
    assert pending.rewind is None and pending.records["step"].tolist() == list(range(1, 11))
    history.mark_saved(pending)
    assert history.unsaved().empty
    record(history, range(11, 14))
    history.rewind(12)  # drops only an unsaved step: nothing to rewind on disk
    pending = history.unsaved()
    assert pending.rewind is None and pending.records["step"].tolist() == [11, 12]
    history.mark_saved(pending)
    history.rewind(5)
    stale = history.unsaved()
    assert stale.rewind == 5 and len(stale.records) == 0
    history.rewind(3)  # after `stale` was taken: marking it saved must not drop the rewind
    history.mark_saved(stale)
    assert history.unsaved().rewind == 3


def test_a_stale_pending_is_sent_again(store: ModelStore, root: Path) -> None:
    # Steps re-recorded between unsaved() and mark_saved() (the model's lock forbids it, but
    # nothing may be lost if it happens): the next append carries them.
    history = History()
    record(history, range(1, 11))
    store.append_history("m", history)
    record(history, range(11, 21))
    stale = history.unsaved()
    record(history, range(15, 18), salt=1)  # replaces 15..20
    racing = History()  # what a save racing the steps wrote: the stale records
    for row in stale.records.tolist():
        racing.record(*row)
    assert store.append_history("m", racing) == 10
    history.mark_saved(stale)
    store.append_history("m", history)
    lineage = expected(range(1, 15)) + expected(range(15, 18), 1)
    assert reopened(root).query().points() == lineage


# --- on disk ------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> Iterator[ModelStore]:
    with ModelStore(root) as opened:
        opened.create_model("m", SPEC)
        yield opened


def reopened(root: Path, *, limit: int = 1_000_000, read_only: bool = True) -> History:
    """The history as another open of the store reads it (read-only: the writer may be open)."""
    with ModelStore(root, read_only=read_only) as store:
        return store.read_history("m", limit=limit)


def seg_files(root: Path) -> list[str]:
    return sorted(os.listdir(root / "m" / "history"), key=lambda n: (len(n), n))


def test_segment_bytes_match_the_documented_layout() -> None:
    rows = [(1, 0.5, math.nan, 0.01, 32, 1.7e9), (2, 0.25, 0.75, 0.01, 32, 1.7e9 + 1)]
    records = np.array(rows, dtype=RECORD)
    payload = b"".join(struct.pack("<qdddqd", *row) for row in rows)
    head = struct.pack("<8sQqI", b"PSHIST\x00\x01", 2, 7, 0)
    reference = head + struct.pack("<I", zlib.crc32(head + payload)) + payload
    assert segments.encode(7, records) == reference
    decoded = segments.decode(reference, "test")
    assert decoded.cut == 0  # min(rewind 7, first step 1 - 1)
    same_records(np.array(decoded.records), records)


def test_persisted_history_reads_back_bit_for_bit(store: ModelStore, root: Path) -> None:
    rng = np.random.default_rng(3)
    history = History()
    special = [0.0, -0.0, 5e-324, 1.7976931348623157e308, math.inf, math.nan]
    for step in range(1, 2001):
        loss = special[step % 6] if step % 97 == 0 else float(rng.standard_normal())
        accuracy = None if step % 3 == 0 else float(rng.random())
        history.record(step, loss, accuracy, float(rng.random()), step % 64, float(rng.random()))
        if step % 500 == 0:
            assert store.append_history("m", history) == 500
    assert store.append_history("m", history) == 0  # nothing new: nothing written
    assert seg_files(root) == ["1.seg", "2.seg", "3.seg", "4.seg"]
    store.close()
    for read_only in (False, True):
        again = reopened(root, read_only=read_only)
        same_records(again.records(), history.records())
        assert again.query(until=3).accuracy[2] is None
        assert again.unsaved().empty


def test_reading_writes_nothing(store: ModelStore, root: Path) -> None:
    history = History()
    record(history, range(1, 50))
    store.append_history("m", history)
    store.close()
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.name != ".writer"}
    with ModelStore(root, read_only=True) as replica:
        assert replica.read_history("m").query().points() == expected(range(1, 50))
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.name != ".writer"} == before


def test_rollback_is_persisted(store: ModelStore, root: Path) -> None:
    history = History()
    record(history, range(1, 101))
    store.append_history("m", history)
    history.rewind(40)
    record(history, range(41, 61), salt=1)
    store.append_history("m", history)
    lineage = expected(range(1, 41)) + expected(range(41, 61), 1)
    assert reopened(root).query().points() == lineage
    history.rewind(20)  # a rollback with no step since: the rewind alone is persisted
    store.append_history("m", history)
    assert reopened(root).query().points() == expected(range(1, 21))
    restarted = store.read_history("m")
    record(restarted, range(21, 31), salt=2)
    store.append_history("m", restarted)
    final = expected(range(1, 21)) + expected(range(21, 31), 2)
    assert reopened(root).query().points() == final


def test_crash_leftovers_are_ignored(
    store: ModelStore, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    history = History()
    for start in (1, 11, 21):
        record(history, range(start, start + 10))
        store.append_history("m", history)
    store.close()
    folder = root / "m" / "history"
    # A segment caught half-written in staging, a stray temporary file, and a third
    # segment cut short after the rename (a disk that lost its tail).
    whole = (folder / "3.seg").read_bytes()
    (root / ".staging" / "history-0123.seg").write_bytes(whole[:70])
    (folder / "4.seg.tmp").write_bytes(whole)
    (folder / "3.seg").write_bytes(whole[:-5])
    caplog.set_level(logging.WARNING, "propserve.service.store.history")
    with ModelStore(root, read_only=True) as replica:
        assert replica.read_history("m").query().points() == expected(range(1, 21))
    assert [r.getMessage() for r in caplog.records] == ["store.history_skip_segment"]
    assert "expected" in caplog.records[0].reason  # type: ignore[attr-defined]
    assert reopened(root, read_only=False).query().points() == expected(range(1, 21))
    assert not os.listdir(root / ".staging")  # the writable open cleared it


def test_corrupt_segment_is_skipped(store: ModelStore, root: Path) -> None:
    history = History()
    record(history, range(1, 11))
    store.append_history("m", history)
    record(history, range(11, 21))
    store.append_history("m", history)
    path = root / "m" / "history" / "1.seg"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    assert store.read_history("m").query().points() == expected(range(11, 21))
    path.write_bytes(b"")
    assert store.read_history("m").query().points() == expected(range(11, 21))
    with pytest.raises(DataLoss, match="crc32"):
        segments.decode(bytes(data), "x")


def test_compaction_keeps_the_newest_records(store: ModelStore, root: Path) -> None:
    history = History(limit=1000)
    for start in range(1, 5001, 250):
        record(history, range(start, start + 250))
        store.append_history("m", history)
        assert sum(f.records for f in segments.segment_files(root / "m" / "history")) <= 1250
    again = reopened(root, limit=1000)
    assert again.query(limit=2000).points() == expected(range(4001, 5001))
    same_records(again.records(), history.records()[-1000:])
    # After a rollback both hold fewer than `limit` (memory has up to a quarter more).
    history.rewind(4900)
    store.append_history("m", history)
    assert store.compact_history("m", limit=1000)
    assert len(seg_files(root)) == 1
    again = reopened(root, limit=1000)
    assert again.query(limit=2000).points() == expected(range(4001, 4901))
    same_records(again.records(), history.records()[-900:])


def test_many_small_appends_are_merged(store: ModelStore, root: Path) -> None:
    history = History()
    most = 0
    for step in range(1, 401):
        record(history, [step])
        if step % 37 == 0:
            history.rewind(step - 3)
        store.append_history("m", history)
        most = max(most, len(seg_files(root)))
    assert most <= segments.MAX_SEGMENTS + 1
    same_records(reopened(root).records(), history.records())


def test_compaction_interrupted_before_removing_the_parts(store: ModelStore, root: Path) -> None:
    history = History()
    for start in (1, 101, 201):
        record(history, range(start, start + 100))
        store.append_history("m", history)
    history.rewind(150)
    record(history, range(151, 171), salt=1)
    store.append_history("m", history)
    folder = root / "m" / "history"
    parts = {name: (folder / name).read_bytes() for name in seg_files(root)}
    assert store.compact_history("m")
    assert seg_files(root) == ["5.seg"]
    for name, data in parts.items():  # as if the writer died before removing them
        (folder / name).write_bytes(data)
    lineage = expected(range(1, 151)) + expected(range(151, 171), 1)
    assert reopened(root).query().points() == lineage
    record(history, range(171, 181), salt=1)
    store.append_history("m", history)
    assert reopened(root).query().points() == [*lineage, *expected(range(171, 181), 1)]


def test_history_beside_versions(store: ModelStore, root: Path) -> None:
    history = History()
    record(history, range(1, 11))
    store.save_version("m", b"state", step=10)
    store.append_history("m", history)
    assert [v.version for v in store.list_versions("m")] == [1]
    assert store.save_version("m", b"state", step=10).version == 2
    latest = store.latest_version("m")
    assert latest is not None and latest.version == 2


def test_deleting_the_model_removes_its_history(store: ModelStore, root: Path) -> None:
    history = History()
    record(history, range(1, 11))
    store.append_history("m", history)
    store.delete_model("m")
    store.close()  # lets the reaper finish
    assert not (root / "m").exists()
    assert not [p for p in root.rglob("*.seg")]
    with ModelStore(root) as again:
        with pytest.raises(NotFound):
            again.read_history("m")
        with pytest.raises(NotFound):
            again.append_history("m", history)
        again.create_model("m", SPEC)
        assert len(again.read_history("m")) == 0


def test_a_missing_history_folder_is_an_empty_history(store: ModelStore, root: Path) -> None:
    assert len(store.read_history("m")) == 0
    history = History()
    record(history, range(1, 4))
    store.append_history("m", history)
    shutil.rmtree(root / "m" / "history")
    assert len(store.read_history("m")) == 0
