"""A model's training history in memory: one record per training step, bounded, queryable.

Every training step records its step, loss, accuracy (classification losses only), learning
rate, rows and wall-clock time (:meth:`History.record`). Records live in one preallocated
numpy structured array (:data:`RECORD`, 48 bytes a record) that grows geometrically, so a
record is one row assignment and no Python object is kept per step. The store persists
them (propserve.service.store.history) and rebuilds a History at start
(:meth:`History.restore`).

Lineage
-------
The history follows the head: steps in memory are strictly increasing. A rollback to a
version at step ``s`` calls :meth:`History.rewind` with ``s``, which drops every record with
a larger step; training then records ``s + 1``, ``s + 2``, ... again. Recording a step that
is not above the last one rewinds implicitly to just below it (a record for step ``s``
replaces every record with step >= ``s``), the same rule the store applies on disk.

Bounds
------
The last ``limit`` records are kept. When the array reaches ``limit + limit // 4`` records
the oldest ``limit // 4`` go at once (one copy per ``limit // 4`` steps, not one per step), so
memory stays under 48 x 1.25 x ``limit`` bytes, 60 MB for the default million (twice that
for the moment a copy is made).

Concurrency
-----------
One writer at a time: :meth:`History.record`, :meth:`History.rewind`,
:meth:`History.unsaved` and :meth:`History.mark_saved` are called under the model's lock.
Readers (:meth:`History.query`, :attr:`History.last_step`, ``len``) take no lock and never
see a torn record, by this rule: the records and their published count live together in
one buffer object; the writer fills row ``n`` and only then publishes ``count = n + 1``,
and it never writes below a buffer's published count again. Whatever drops or moves
records (growing, bounding, rewinding) copies the survivors into a new buffer and swaps
it in whole. A reader takes the buffer once, then its count, and everything below that
count stays as it read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from propserve.service.errors import InvalidArgument
from propserve.wire import HistoryPoint

#: One record, as kept in memory and stored on disk: little-endian, 48 bytes, no padding.
RECORD = np.dtype(
    [
        ("step", "<i8"),
        ("loss", "<f8"),
        ("accuracy", "<f8"),  # NaN: none (an accuracy is a fraction of rows, never NaN)
        ("learning_rate", "<f8"),
        ("rows", "<i8"),
        ("time", "<f8"),  # seconds since the Unix epoch
    ]
)

DEFAULT_LIMIT = 1_000_000
DEFAULT_QUERY_LIMIT = 10_000
MAX_STEP = 2**63 - 1
_FIRST_CAPACITY = 1024

Records = NDArray[Any]  # a 1-d array of RECORD


@dataclass(frozen=True)
class HistorySlice:
    """Part of a history in step order, as columns of plain Python values (cheap to turn
    into JSON or protobuf repeated fields); ``accuracy`` holds None where a step had none.

    ``next_since`` is the ``since`` that continues the query where ``limit`` cut it short,
    None when nothing is left; ``every`` is the bucket size the points were made with."""

    steps: list[int]
    loss: list[float]
    accuracy: list[float | None]
    learning_rate: list[float]
    rows: list[int]
    time: list[float]
    next_since: int | None
    every: int = 1

    def __len__(self) -> int:
        return len(self.steps)

    def points(self) -> list[HistoryPoint]:
        return [
            HistoryPoint(*values)
            for values in zip(
                self.steps,
                self.loss,
                self.accuracy,
                self.learning_rate,
                self.rows,
                self.time,
                strict=True,
            )
        ]


@dataclass(frozen=True)
class Pending:
    """What the store has not persisted yet (:meth:`History.unsaved`): a rewind to apply to
    the persisted records first (None: none), then ``records`` to append."""

    rewind: int | None
    records: Records
    # The history's rewind count when this was taken: mark_saved ignores a stale Pending.
    epoch: int

    @property
    def empty(self) -> bool:
        return self.rewind is None and len(self.records) == 0


class _Buffer:
    """Records and the count of those published (see the module docstring's rule)."""

    __slots__ = ("capacity", "count", "rows")

    def __init__(self, capacity: int, survivors: Records | None = None) -> None:
        self.rows: Records = np.empty(capacity, dtype=RECORD)
        self.capacity = capacity
        self.count = 0
        if survivors is not None and len(survivors):
            copy_records(self.rows[: len(survivors)], survivors)
            self.count = len(survivors)

    def published(self) -> Records:
        count = self.count  # once: the rows below it are final
        return self.rows[:count]


class History:
    """The training history of one model (see the module docstring)."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer, not {limit!r}")
        self.limit = limit
        self._chunk = max(limit // 4, 1)
        self._buffer = _Buffer(min(_FIRST_CAPACITY, limit + self._chunk))
        # Writer-side state, touched only under the model's lock.
        self._last_step: int | None = None
        self._saved_step: int | None = None  # records up to this step are persisted
        self._rewind: int | None = None  # a rewind of persisted records not yet persisted
        self._epoch = 0

    @classmethod
    def restore(cls, records: Records, limit: int = DEFAULT_LIMIT) -> History:
        """A history holding the last ``limit`` of ``records`` (steps strictly increasing),
        all of them counted as persisted: what the store builds at start."""
        history = cls(limit)
        kept = records[-limit:]
        if len(kept) > 1 and not bool(np.all(kept["step"][1:] > kept["step"][:-1])):
            raise ValueError("the steps of restored records must be strictly increasing")
        if len(kept):
            capacity = max(len(kept), min(2 * len(kept), limit + history._chunk))
            history._buffer = _Buffer(capacity, kept)
            history._last_step = history._saved_step = int(kept["step"][-1])
        return history

    # --- the writer ---------------------------------------------------------------------

    def record(
        self,
        step: int,
        loss: float,
        accuracy: float | None,
        learning_rate: float,
        rows: int,
        time: float,
    ) -> None:
        """Append one step's record (under the model's lock). A step that is not above the
        last one first drops the records from that step on (see Lineage)."""
        last = self._last_step
        if last is not None and step <= last:
            self.rewind(step - 1)
        buffer = self._buffer
        n = buffer.count
        if n == buffer.capacity:
            buffer = self._make_room()
            n = buffer.count
        buffer.rows[n] = (
            step,
            loss,
            math.nan if accuracy is None else accuracy,
            learning_rate,
            rows,
            time,
        )
        buffer.count = n + 1  # publish only once the row is whole
        self._last_step = step

    def rewind(self, step: int) -> None:
        """Drop the records with a step above ``step`` (a rollback to a version at that
        step), in memory now and in the store at its next append."""
        step = max(step, -1)
        if self._saved_step is not None and step < self._saved_step:
            self._rewind = step if self._rewind is None else min(self._rewind, step)
            self._saved_step = step
            self._epoch += 1
        if self._last_step is None or step >= self._last_step:
            return
        self._epoch += 1  # a Pending taken before may hold records dropped here
        rows = self._buffer.published()
        keep = int(np.searchsorted(rows["step"], step, side="right"))
        capacity = min(max(2 * keep, _FIRST_CAPACITY), self.limit + self._chunk)
        self._buffer = _Buffer(capacity, rows[:keep])
        self._last_step = int(rows["step"][keep - 1]) if keep else None

    def unsaved(self) -> Pending:
        """What the store must persist: a pending rewind, and the records since the last
        :meth:`mark_saved` (those the bound dropped meanwhile are gone)."""
        rows = self._buffer.published()
        start = 0
        if self._saved_step is not None:
            start = int(np.searchsorted(rows["step"], self._saved_step, side="right"))
        return Pending(self._rewind, rows[start:], self._epoch)

    def mark_saved(self, pending: Pending) -> None:
        """Record that ``pending`` is persisted. One taken before a later rewind is stale
        and changes nothing: what is unsaved is then sent again, and on disk a record
        for step s replaces every earlier one from s on."""
        if pending.epoch != self._epoch:
            return
        self._rewind = None
        if len(pending.records):
            self._saved_step = int(pending.records["step"][-1])

    def _make_room(self) -> _Buffer:
        rows = self._buffer.published()
        ceiling = self.limit + self._chunk
        if len(rows) >= ceiling:
            survivors = rows[len(rows) - self.limit :]  # the oldest chunk goes
            capacity = ceiling
        else:
            survivors = rows
            capacity = min(max(2 * len(rows), _FIRST_CAPACITY), ceiling)
        self._buffer = _Buffer(capacity, survivors)
        return self._buffer

    # --- readers ------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._buffer.count

    @property
    def last_step(self) -> int | None:
        rows = self._buffer.published()
        return int(rows["step"][-1]) if len(rows) else None

    @property
    def last(self) -> HistoryPoint | None:
        rows = self._buffer.published()
        if not len(rows):
            return None
        point = _columns(rows[-1:], None, 1)
        return point.points()[0]

    def records(self) -> Records:
        """The records held, oldest first (a read-only snapshot)."""
        rows = self._buffer.published()
        view = rows.view()
        view.flags.writeable = False
        return view

    def query(
        self,
        *,
        since: int | None = None,
        until: int | None = None,
        every: int = 1,
        limit: int = DEFAULT_QUERY_LIMIT,
    ) -> HistorySlice:
        """The records with ``since <= step <= until`` (None: open), in step order, at most
        ``limit`` points.

        With ``every`` > 1, one point per bucket of ``every`` consecutive steps, buckets
        aligned to step numbers (steps ``k * every + 1`` to ``(k + 1) * every``, clipped by
        ``since`` and ``until``): the bucket's last step, mean loss, mean accuracy (over
        the steps that have one; None if none does), last learning rate, summed rows and
        last time. ``next_since`` then starts the next bucket, so pages join up."""
        since = None if since is None else _check_int("since", since, 0)
        until = None if until is None else _check_int("until", until, 0)
        every = _check_int("every", every, 1)
        limit = _check_int("limit", limit, 1)
        rows = self._buffer.published()
        steps = rows["step"]
        lo = 0 if since is None else int(np.searchsorted(steps, since, side="left"))
        hi = len(rows) if until is None else int(np.searchsorted(steps, until, side="right"))
        if lo >= hi:
            return _columns(rows[:0], None, every)
        if every == 1:
            end = min(hi, lo + limit)
        else:
            # `limit` buckets from the first one cover at most these steps.
            first_bucket = (int(steps[lo]) - 1) // every
            bound = min((first_bucket + limit) * every, MAX_STEP)
            end = min(hi, int(np.searchsorted(steps, bound, side="right")))
        next_since = int(steps[end]) if end < hi else None
        return _columns(rows[lo:end], next_since, every)


def copy_records(target: Records, source: Records) -> None:
    """``target[:] = source`` for arrays of RECORD of one length.

    NOTE: numpy copies a structured array field by field (about 50 times slower than
    memcpy at a million records); as bytes it is one copy."""
    target.view(np.uint8)[:] = np.ascontiguousarray(source).view(np.uint8)


def _check_int(what: str, value: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_STEP:
        raise InvalidArgument(f"invalid {what} {value!r:.40}: expected an integer >= {low}")
    return value


def _columns(rows: Records, next_since: int | None, every: int) -> HistorySlice:
    if every > 1 and len(rows):
        rows = _downsample(rows, every)
    accuracy: list[float | None] = rows["accuracy"].tolist()
    absent = np.isnan(rows["accuracy"])
    if absent.any():
        accuracy = [None if gone else a for a, gone in zip(accuracy, absent.tolist(), strict=True)]
    return HistorySlice(
        steps=rows["step"].tolist(),
        loss=rows["loss"].tolist(),
        accuracy=accuracy,
        learning_rate=rows["learning_rate"].tolist(),
        rows=rows["rows"].tolist(),
        time=rows["time"].tolist(),
        next_since=next_since,
        every=every,
    )


def _downsample(rows: Records, every: int) -> Records:
    """One record per bucket of ``every`` steps (see :meth:`History.query`)."""
    bucket = (rows["step"] - 1) // every
    starts = np.flatnonzero(np.concatenate(([True], bucket[1:] != bucket[:-1])))
    lasts = np.append(starts[1:], len(rows)) - 1
    sizes = lasts - starts + 1
    accuracy = rows["accuracy"]
    present = ~np.isnan(accuracy)
    accuracy_sum = np.add.reduceat(np.where(present, accuracy, 0.0), starts)
    accuracy_count = np.add.reduceat(present.astype(np.int64), starts)
    out = np.empty(len(starts), dtype=RECORD)
    out["step"] = rows["step"][lasts]
    out["loss"] = np.add.reduceat(rows["loss"], starts) / sizes
    with np.errstate(invalid="ignore", divide="ignore"):
        # NOTE: 0 / 0 is NaN, which is what "no accuracy in this bucket" is stored as.
        out["accuracy"] = accuracy_sum / accuracy_count
    out["learning_rate"] = rows["learning_rate"][lasts]
    out["rows"] = np.add.reduceat(rows["rows"], starts)
    out["time"] = rows["time"][lasts]
    return out
