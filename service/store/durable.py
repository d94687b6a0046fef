"""Durable file-system steps the store is built from, and the one-writer lock.

The rules, which hold on any POSIX file system with atomic rename (ext4, xfs, btrfs):
a new file is written in full and fsync'ed before it is renamed into place, and the
folder that received the rename is fsync'ed afterwards, so that after a crash at any
instant a name refers either to the complete old content or to the complete new one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from propserve.service.errors import FailedPrecondition, ResourceExhausted

log = logging.getLogger("propserve.store")

# Below this size hashing inline is cheaper than handing the buffer to a thread.
_PARALLEL_HASH_BYTES = 1 << 20


def fsync_dir(path: Path) -> None:
    """Make the entries of folder `path` (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):  # each pass writes at least one byte, or raises
        written = os.write(fd, data[done:])
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        done += written


def write_new_file(path: Path, data: bytes | memoryview, *, sync: bool = True) -> None:
    """Create `path` (which must not exist), write `data` and (unless `sync` is False, for a
    caller that calls `fsync_file` later) fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, memoryview(data).cast("B"))
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make the data of file `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file_hashed(path: Path, data: bytes | memoryview, *, sync: bool = True) -> str:
    """`write_new_file`, returning the sha256 hex digest of `data`.

    NOTE: sha256 of a large state costs about as much as writing it. hashlib and os.write
    both release the GIL on large buffers, so the digest is computed on a second thread
    while this one writes: a save then costs max(write, hash), not their sum."""
    view = memoryview(data).cast("B")
    if len(view) < _PARALLEL_HASH_BYTES:
        write_new_file(path, view, sync=sync)
        return hashlib.sha256(view).hexdigest()
    digest: list[str] = []
    hasher = threading.Thread(
        target=lambda: digest.append(hashlib.sha256(view).hexdigest()),
        name="store-sha256",
        daemon=True,
    )
    hasher.start()
    try:
        write_new_file(path, view, sync=sync)
    finally:
        hasher.join()
    if not digest:  # the thread died (MemoryError): never record a digest we did not compute
        raise RuntimeError("hashing the state failed")
    return digest[0]


def replace_file(target: Path, data: bytes, staging: Path) -> None:
    """Atomically replace (or create) `target` with `data`: a readers sees the old file or
    the new one, never a mix, and after a crash the same holds."""
    tmp = staging / f"{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        write_new_file(tmp, data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def new_staging_dir(staging: Path, kind: str) -> Path:
    path = staging / f"{kind}-{uuid.uuid4().hex}"
    path.mkdir()
    return path


def move_to_trash(path: Path, staging: Path) -> Path:
    """Make folder `path` vanish atomically by renaming it into the staging area (readers
    see it whole or not at all). The caller fsyncs `path.parent` and then deletes the
    returned trash folder; leftovers are removed at the next writable open."""
    trash = staging / f"trash-{uuid.uuid4().hex}"
    os.rename(path, trash)
    return trash


def clear_dir(path: Path) -> int:
    """Remove everything inside `path`; returns how many entries were removed."""
    removed = 0
    with os.scandir(path) as entries:
        names = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    for name, is_dir in names:
        if is_dir:
            shutil.rmtree(path / name, ignore_errors=True)
        else:
            (path / name).unlink(missing_ok=True)
        removed += 1
    return removed


def is_out_of_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def out_of_space(exc: OSError, what: str) -> ResourceExhausted:
    return ResourceExhausted(f"no space left on the store's disk while {what}: {exc.strerror}")


class WriterLock:
    """An advisory exclusive lock (flock) on a file in the store's root.

    The kernel drops it when the holder exits, however it exits (SIGKILL included), so a
    crashed writer never leaves the store locked. The holder's pid is written into the
    file for the error message only; the lock itself is the flock."""

    def __init__(self, path: Path, root: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if holder == str(os.getpid()):
                who = "by another ModelStore in this process"
            else:
                who = f"by another process (pid {holder})" if holder.isdigit() else ""
            raise FailedPrecondition(
                f"model store {root} is already open for writing {who};"
                " open it read-only or stop the other writer"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            pass  # the pid is informative only
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _process_start() -> str:
    """This process's start time (clock ticks since boot): with the pid, one process."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


class WriterLease:
    """A second guard beside :class:`WriterLock`, for filesystems where flock does not
    exclude another host's writer (NFS emulates it, or with ``local_lock`` keeps it local).

    The writer records its identity (host, pid, process start, a random id) in a lease file
    and renews it every ``period`` seconds. Another writer refuses to open the store while
    the lease is held: by a live process on this host, or renewed within ``3 * period`` from
    another host (after waiting that long for it to lapse). A writer that finds its lease
    taken by another stops writing (:meth:`check`)."""

    def __init__(self, path: Path, root: Path, *, period: float = 5.0) -> None:
        self._path = path
        self._period = period
        self._id = uuid.uuid4().hex
        self.me = {
            "id": self._id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": _process_start(),
        }
        held = self._holder()
        deadline = time.monotonic() + 3 * period
        while held is not None and self._alive(held):
            if held["host"] == self.me["host"] or time.monotonic() > deadline:
                raise FailedPrecondition(
                    f"model store {root} is held by another writer (pid {held.get('pid')} on "
                    f"{held.get('host')}, renewed {time.time() - held['renewed']:.0f}s ago); "
                    "stop it, or open the store read-only"
                )
            time.sleep(min(period, 1.0))  # another host's: it lapses unless renewed
            held = self._holder()
        self.lost = False
        self._write()
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="store-lease", daemon=True)
        self._renewer.start()

    def check(self) -> None:
        """FailedPrecondition if another writer has taken the lease."""
        holder = self._holder()
        if self.lost or holder is None or holder.get("id") != self._id:
            self.lost = True
            raise FailedPrecondition(
                "another writer has taken over this model store; this one no longer writes"
            )

    def release(self) -> None:
        self._stop.set()
        holder = self._holder()
        if holder is not None and holder.get("id") == self._id:
            with contextlib.suppress(OSError):
                self._path.unlink()

    def _alive(self, held: dict[str, Any]) -> bool:
        if held.get("host") != self.me["host"]:
            return time.time() - float(held.get("renewed", 0)) < 3 * self._period
        pid = held.get("pid")
        if not isinstance(pid, int):
            return False
        if pid == self.me["pid"]:
            return held.get("start") == self.me["start"]  # this very process, or a new one
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _holder(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self._path.read_bytes())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) and "id" in doc else None

    def _write(self) -> None:
        data = json.dumps({**self.me, "renewed": time.time()}).encode()
        temporary = self._path.with_name(f"{self._path.name}.{self._id}")
        temporary.write_bytes(data)
        os.replace(temporary, self._path)

    def _renew(self) -> None:
        while not self._stop.wait(self._period):
            holder = self._holder()
            if holder is None or holder.get("id") != self._id:
                if not self.lost:
                    log.error("store.lease_lost", extra={"path": str(self._path)})
                self.lost = True
                return
            with contextlib.suppress(OSError):
                self._write()


class Reaper:
    """Deletes trash folders on a background thread.

    A version or model vanishes for readers when it is renamed into the staging area;
    freeing its blocks (milliseconds per large file on ext4) is bookkeeping that need not
    sit on the path of the save that triggered retention. Whatever is left when the
    process dies is removed at the next writable open."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def put(self, path: Path) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="store-reaper", daemon=True)
            self._thread.start()
        self._queue.put(path)

    def close(self, timeout: float = 60.0) -> None:
        """Finish the queued deletions (waiting at most `timeout` seconds)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while (path := self._queue.get()) is not None:
            shutil.rmtree(path, ignore_errors=True)
