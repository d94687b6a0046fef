"""A model's training history on disk: immutable segment files in ``<model>/history/``.

Segments
--------
Each append writes the records since the last one as a new segment, ``<n>.seg`` with
``n`` one above the largest present (canonical decimal, like version folders), written in
the staging area, fsync'ed and renamed into place: a reader, or a restart after a crash,
sees a segment whole or not at all. Other names in the folder are ignored.

A segment is, all integers little-endian::

    offset  size  field
    0       8     magic b"PSHIST\\x00\\x01" (the last byte is the format's version)
    8       8     count: records in the segment, uint64
    16      8     rewind: int64, see below (2**63 - 1: none)
    24      4     reserved, zero
    28      4     crc32 (zlib) of bytes 0..28 followed by the payload
    32      48*count  payload: the records, propserve.service.history.RECORD (step <i8,
                  loss <f8, accuracy <f8 with NaN for none, learning_rate <f8, rows <i8,
                  time <f8), steps strictly increasing

A segment whose length, magic, checksum or steps are wrong is skipped with a warning; it
never stops a model from loading.

Lineage
-------
Segments apply in order of ``n``. Before a segment's records are appended, the records
gathered so far with a step above its cut are dropped; the cut is the lower of its
``rewind`` and its first step minus one. So a rollback is persisted as ``rewind`` (with or
without new records), and a record for step s always replaces every earlier one with a
step >= s, as in memory (propserve.service.history).

Compaction
----------
Two segments in a row compose into one (cut = the lower cut; records = the first's up to
the second's cut, then the second's), and a composed segment applied again after its
parts changes nothing. Compaction therefore writes the composition of the newest
segments as one new segment, and only then removes them: a reader sees the parts, the
parts and the whole, or the whole, never neither. A reader that finds a listed segment
gone lists again.

- When the segments hold more than ``limit * 1.25`` records, all of them are rewritten as
  the last ``limit`` records of the lineage, with cut -1 (it replaces everything before).
- When there are more than :data:`MAX_SEGMENTS`, the newest ones are merged, from the
  oldest segment that is no larger than all newer ones together: sizes then at least
  double going back, so a record is rewritten O(log n) times and the count stays small.

Readers never write, so a read-only store (a replica) reads the same way.
"""

from __future__ import annotations

import logging
import os
import struct
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from propserve.service.errors import DataLoss, PropserveError
from propserve.service.history import RECORD, History, Records, copy_records
from propserve.service.store import durable

log = logging.getLogger(__name__)

HISTORY_DIR = "history"
SUFFIX = ".seg"
MAGIC = b"PSHIST\x00\x01"
NO_REWIND = 2**63 - 1
#: More segments than this are merged (see Compaction).
MAX_SEGMENTS = 32

# magic, count, rewind, reserved; then the crc32 of these 28 bytes and the payload.
_HEAD = struct.Struct("<8sQqI")
_CRC = struct.Struct("<I")
HEADER_BYTES = _HEAD.size + _CRC.size
# A listed segment that vanishes means a compaction replaced it: list again, this often.
_READ_ATTEMPTS = 5


@dataclass(frozen=True)
class Segment:
    """One segment's content: drop earlier records with a step above ``cut``, then append
    ``records``."""

    cut: int
    records: Records


@dataclass(frozen=True)
class SegmentFile:
    number: int
    path: Path
    records: int  # as its size says (a corrupt one may say anything)


def encode(rewind: int | None, records: Records) -> bytearray:
    """A segment's bytes (see the module docstring)."""
    rewind = NO_REWIND if rewind is None else rewind
    if not -1 <= rewind <= NO_REWIND:
        raise ValueError(f"rewind {rewind} out of range")
    count = len(records)
    data = bytearray(HEADER_BYTES + count * RECORD.itemsize)
    _HEAD.pack_into(data, 0, MAGIC, count, rewind, 0)
    copy_records(np.frombuffer(data, dtype=RECORD, count=count, offset=HEADER_BYTES), records)
    view = memoryview(data)
    crc = zlib.crc32(view[HEADER_BYTES:], zlib.crc32(view[: _HEAD.size]))
    _CRC.pack_into(data, _HEAD.size, crc)
    return data


def decode(data: bytes, where: str) -> Segment:
    """A segment from its bytes; DataLoss naming ``where`` if they are not a whole one."""
    if len(data) < HEADER_BYTES:
        raise DataLoss(f"{where}: {len(data)} bytes, shorter than a segment's header")
    magic, count, rewind, reserved = _HEAD.unpack_from(data, 0)
    (crc,) = _CRC.unpack_from(data, _HEAD.size)
    if magic != MAGIC or reserved != 0:
        raise DataLoss(f"{where}: not a history segment of this format")
    expected = HEADER_BYTES + count * RECORD.itemsize
    if len(data) != expected:
        raise DataLoss(f"{where}: {len(data)} bytes, expected {expected} for {count} records")
    view = memoryview(data)
    if zlib.crc32(view[HEADER_BYTES:], zlib.crc32(view[: _HEAD.size])) != crc:
        raise DataLoss(f"{where}: fails its crc32 check")
    if rewind < -1:
        raise DataLoss(f"{where}: malformed rewind {rewind}")
    records = np.frombuffer(data, dtype=RECORD, count=count, offset=HEADER_BYTES)
    steps = records["step"]
    if count and (steps[0] < 0 or not bool(np.all(steps[1:] > steps[:-1]))):
        raise DataLoss(f"{where}: steps are not increasing")
    cut = min(rewind, int(steps[0]) - 1) if count else rewind
    return Segment(cut, records)


def replay(segments: Iterable[Segment]) -> Segment:
    """The composition of ``segments`` in order: one segment with the same effect."""
    cut = NO_REWIND
    pieces: list[Records] = []
    for segment in segments:
        cut = min(cut, segment.cut)
        while pieces and pieces[-1]["step"][-1] > segment.cut:
            last = pieces.pop()
            keep = int(np.searchsorted(last["step"], segment.cut, side="right"))
            if keep:
                pieces.append(last[:keep])
                break
        if len(segment.records):
            pieces.append(segment.records)
    if len(pieces) == 1:
        return Segment(cut, pieces[0])
    records = np.empty(sum(len(piece) for piece in pieces), dtype=RECORD)
    done = 0
    for piece in pieces:
        copy_records(records[done : done + len(piece)], piece)
        done += len(piece)
    return Segment(cut, records)


def segment_files(folder: Path) -> list[SegmentFile]:
    """The segments in ``folder``, in order. FileNotFoundError if it does not exist."""
    files = []
    with os.scandir(folder) as entries:
        for entry in entries:
            number = _segment_number(entry.name)
            if number is None:
                continue
            try:
                size = entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue  # removed by a compaction since the scan
            records = max(size - HEADER_BYTES, 0) // RECORD.itemsize
            files.append(SegmentFile(number, folder / entry.name, records))
    return sorted(files, key=lambda f: f.number)


def read(folder: Path, limit: int, where: str) -> History:
    """The history the segments in ``folder`` hold (its last ``limit`` records). Writes
    nothing; unreadable or corrupt segments are logged and skipped."""
    segments: list[Segment] = []
    for attempt in range(_READ_ATTEMPTS):
        final = attempt == _READ_ATTEMPTS - 1
        try:
            files = segment_files(folder)
        except (FileNotFoundError, NotADirectoryError):
            return History(limit)
        except OSError as exc:
            log.warning("store.history_unreadable", extra={"where": where, "reason": str(exc)})
            return History(limit)
        segments, vanished = [], False
        for file in files:
            try:
                segments.append(decode(file.path.read_bytes(), f"{where} {file.path.name}"))
            except FileNotFoundError:
                vanished = True
                if not final:
                    break
                log.warning("store.history_segment_vanished", extra={"path": str(file.path)})
            except DataLoss as exc:
                log.warning("store.history_skip_segment", extra={"reason": exc.message})
            except OSError as exc:
                log.warning(
                    "store.history_skip_segment", extra={"path": str(file.path), "reason": str(exc)}
                )
        if not vanished:
            break
    return History.restore(replay(segments).records, limit)


def append(folder: Path, staging: Path, history: History) -> int:
    """Persist what ``history`` has not persisted yet as one new segment (nothing if it has
    nothing), mark it saved, then compact if due. Returns how many records it wrote."""
    pending = history.unsaved()
    if pending.empty:
        return 0
    if not folder.is_dir():
        folder.mkdir()
        durable.fsync_dir(folder.parent)
    files = segment_files(folder)
    number = files[-1].number + 1 if files else 1
    _publish(folder, staging, number, encode(pending.rewind, pending.records))
    history.mark_saved(pending)
    try:
        compact(folder, staging, history.limit)
    except (OSError, PropserveError) as exc:
        # The records are durable; the next append tries again.
        log.warning(
            "store.history_compaction_failed", extra={"path": str(folder), "reason": str(exc)}
        )
    return len(pending.records)


def compact(folder: Path, staging: Path, limit: int, *, force: bool = False) -> bool:
    """Merge segments if due (see Compaction), or all of them if ``force``; whether it
    did. An unreadable segment aborts it (OSError); a corrupt one, which no reader uses, is
    removed with the segments merged."""
    try:
        files = segment_files(folder)
    except (FileNotFoundError, NotADirectoryError):
        return False
    total = sum(file.records for file in files)
    if force or total > limit + limit // 4:
        start = 0
    elif len(files) > MAX_SEGMENTS:
        start = _merge_start([file.records for file in files])
    else:
        return False
    merged = files[start:]
    if not merged:
        return False
    segments = []
    for file in merged:
        try:
            segments.append(decode(file.path.read_bytes(), f"{folder} {file.path.name}"))
        except DataLoss as exc:
            log.warning("store.history_drop_segment", extra={"reason": exc.message})
    whole = replay(segments)
    cut, records = whole.cut, whole.records
    if start == 0 or len(records) >= limit:
        cut, records = -1, records[-limit:]  # the lineage's last `limit` records
    _publish(folder, staging, files[-1].number + 1, encode(cut, records))
    for file in merged:
        file.path.unlink(missing_ok=True)
    durable.fsync_dir(folder)
    log.info(
        "store.history_compacted",
        extra={"path": str(folder), "segments": len(merged), "records": len(records)},
    )
    return True


def _merge_start(sizes: list[int]) -> int:
    """The oldest segment no larger than all newer ones together (at most the last but
    one): merging from there keeps sizes at least doubling going back."""
    newer = 0
    start = len(sizes) - 2
    for index in range(len(sizes) - 1, -1, -1):
        if index <= len(sizes) - 2 and sizes[index] <= newer:
            start = index
        newer += sizes[index]
    return start


def _segment_number(name: str) -> int | None:
    stem = name.removesuffix(SUFFIX)
    if stem != name and stem.isascii() and stem.isdigit() and stem[0] != "0" and len(stem) < 20:
        return int(stem)
    return None


def _publish(folder: Path, staging: Path, number: int, data: bytearray) -> None:
    temporary = staging / f"history-{uuid.uuid4().hex}{SUFFIX}"
    try:
        durable.write_new_file(temporary, memoryview(data))
        os.rename(temporary, folder / f"{number}{SUFFIX}")
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    durable.fsync_dir(folder)
