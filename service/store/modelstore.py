"""ModelStore: models and every saved version of them, in a folder on disk.

Layout (every name below the root was validated first; the store's own entries start
with a dot, which no valid name can)::

    <root>/.lock                              flock'ed by the one writer; holds its pid
    <root>/.writer                            the writer's lease: who writes, renewed
    <root>/.staging/                          temporary folders and files; emptied at a
                                              writable open
    <root>/.tombstones/<model>.json           version high-water mark of a deleted model
    <root>/<model>/model.json                 spec, settings, labels (replaced atomically)
    <root>/<model>/versions/<n>/meta.json     step, created_at, parent, metrics, sha256
    <root>/<model>/versions/<n>/weights.safetensors   the state bytes, opaque here
    <root>/<model>/history/<n>.seg            training history, immutable segments
                                              (format and lineage: store/history.py)

Guarantees:
- A version becomes visible by one rename of a complete, fsync'ed folder, and vanishes
  (retention, deletion) by one rename into the staging area: readers, in this process or
  another, see all of it or none of it. A crash leaves only staging leftovers, removed at
  the next writable open.
- Version numbers of a model grow and are never reused: the next number is one above
  the largest of the visible versions, model.json's `last_version` and the tombstone of
  an earlier model of the same name. Retention never removes the newest version, so the
  visible maximum cannot go down except by deleting the model, which writes the tombstone
  first.
- Weights are verified against their sha256 on every load; a mismatch is DataLoss naming
  model and version and is never served. `latest_version` skips versions that fail and
  remembers verdicts by file identity (device, inode, size, mtime, ctime), so asking again
  costs a stat, not a hash.
- One writer per store: an advisory flock, and a lease file the writer renews and checks
  before each write, for filesystems whose flock does not exclude another host (NFS); any
  number of read-only opens, which never write and never assume the folder stands still.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from propserve.service.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from propserve.service.history import DEFAULT_LIMIT, History
from propserve.service.store import durable
from propserve.service.store import history as history_files
from propserve.service.store.records import (
    DEFAULT_MAX_METADATA_BYTES,
    DEFAULT_SETTINGS,
    FORMAT,
    ModelRecord,
    VersionMeta,
    check_metrics,
    check_name,
    check_settings,
    check_spec,
    check_step,
    check_version,
    decode_doc,
    encode_json,
    model_from_doc,
    version_from_doc,
)

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
LEASE_FILE = ".writer"
STAGING_DIR = ".staging"
TOMBSTONE_DIR = ".tombstones"
MODEL_FILE = "model.json"
VERSIONS_DIR = "versions"
META_FILE = "meta.json"
WEIGHTS_FILE = "weights.safetensors"
#: Scans of a version listing while versions vanish under it (see list_versions).
LISTING_TRIES = 3
HISTORY_DIR = history_files.HISTORY_DIR

_MAX_CACHED_VERDICTS = 65_536
_FileIdentity = tuple[int, int, int, int, int]


def _identity(st: os.stat_result) -> _FileIdentity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _version_number(entry: str) -> int | None:
    """The version a folder name stands for: canonical decimal only ("7", not "07")."""
    if entry.isascii() and entry.isdigit() and entry[0] != "0" and len(entry) <= 19:
        return int(entry)
    return None


class ModelStore:
    """Models and their saved versions under `root` (see the module docstring).

    Thread-safe: writes are serialised by a lock, reads take none."""

    def __init__(
        self,
        root: Path | str,
        *,
        read_only: bool = False,
        max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
        lease_period: float = 5.0,
    ) -> None:
        self._root = Path(root).absolute()
        self._read_only = read_only
        self._max_meta = max_metadata_bytes
        self._staging = self._root / STAGING_DIR
        self._tombstones = self._root / TOMBSTONE_DIR
        self._mutex = threading.RLock()
        self._verdicts: dict[tuple[str, int], tuple[_FileIdentity, str, bool]] = {}
        self._lock: durable.WriterLock | None = None
        self._lease: durable.WriterLease | None = None
        self._reaper = durable.Reaper()
        self._closed = False
        if read_only:
            if not self._root.is_dir():
                raise NotFound(f"model store {self._root} does not exist")
            return
        self._root.mkdir(parents=True, exist_ok=True)
        self._lock = durable.WriterLock(self._root / LOCK_FILE, self._root)
        try:
            lease = durable.WriterLease(self._root / LEASE_FILE, self._root, period=lease_period)
        except BaseException:
            self._lock.release()
            raise
        self._lease = lease
        try:
            self._staging.mkdir(exist_ok=True)
            self._tombstones.mkdir(exist_ok=True)
            removed = durable.clear_dir(self._staging)
            durable.fsync_dir(self._root)
        except BaseException:
            lease.release()
            self._lock.release()
            raise
        if removed:
            log.info(
                "store.cleanup",
                extra={"root": str(self._root), "staging_leftovers_removed": removed},
            )

    # --- lifecycle --------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self._root

    @property
    def read_only(self) -> bool:
        return self._read_only

    def close(self) -> None:
        """Release the writer lock. Idempotent; the store refuses further calls."""
        with self._mutex:
            self._closed = True
            self._reaper.close()
            if self._lease is not None:
                self._lease.release()
                self._lease = None
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> ModelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"model store {self._root} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._read_only:
            raise FailedPrecondition(f"model store {self._root} is open read-only")
        if self._lease is not None:
            self._lease.check()

    # --- models -----------------------------------------------------------------------

    def create_model(
        self, name: str, spec: dict[str, Any], settings: dict[str, Any] | None = None
    ) -> ModelRecord:
        """Create model `name`. AlreadyExists if it does; settings default to
        DEFAULT_SETTINGS. Version numbers continue above those of any deleted model that
        had the same name."""
        self._check_writable()
        name = check_name(name)
        spec = check_spec(spec, self._max_meta)
        merged = check_settings(settings, DEFAULT_SETTINGS)
        encode_json(merged, "settings", self._max_meta)
        with self._mutex:
            self._check_open()
            model_dir = self._root / name
            if (model_dir / MODEL_FILE).exists():
                raise AlreadyExists(f"model {name!r} already exists")
            if model_dir.exists():
                raise FailedPrecondition(
                    f"{model_dir} exists but is not a model; move it out of the store"
                )
            doc = {
                "format": FORMAT,
                "name": name,
                "spec": spec,
                "settings": merged,
                "labels": {},
                "created_at": time.time(),
                "last_version": self._tombstone(name),
            }
            data = encode_json(doc, f"model {name!r} metadata", self._max_meta)
            stage = durable.new_staging_dir(self._staging, "model")
            try:
                (stage / VERSIONS_DIR).mkdir()
                durable.write_new_file(stage / MODEL_FILE, data)
                durable.fsync_dir(stage)
                os.rename(stage, model_dir)
            except OSError as exc:
                shutil.rmtree(stage, ignore_errors=True)
                if durable.is_out_of_space(exc):
                    raise durable.out_of_space(exc, f"creating model {name!r}") from exc
                raise
            durable.fsync_dir(self._root)
            record, _ = model_from_doc(doc, name, str(model_dir / MODEL_FILE))
            return record

    def get_model(self, name: str) -> ModelRecord:
        self._check_open()
        record, _ = self._read_model(check_name(name))
        return record

    def list_models(self) -> list[ModelRecord]:
        """Every model, by name. A model created or deleted meanwhile may or may not be
        listed, but never half."""
        self._check_open()
        records = []
        with os.scandir(self._root) as entries:
            names = sorted(entry.name for entry in entries)
        for entry in names:
            try:
                name = check_name(entry)
                record, _ = self._read_model(name)
            except (InvalidArgument, NotFound):
                continue  # not a model, or deleted since the scan
            except DataLoss as exc:
                log.warning(
                    "store.skip_model", extra={"root": str(self._root), "reason": exc.message}
                )
                continue
            records.append(record)
        return records

    def update_settings(self, name: str, settings: dict[str, Any]) -> ModelRecord:
        """Change some settings (the others keep their values); a lower `retain` applies
        retention at once."""
        self._check_writable()
        name = check_name(name)
        with self._mutex:
            self._check_open()
            doc = self._read_model_doc(name)
            doc["settings"] = check_settings(settings, doc["settings"])
            self._write_model_doc(name, doc)
            self._apply_retention(name, doc)
            record, _ = self._read_model(name)
            return record

    def delete_model(self, name: str) -> None:
        """Remove model `name`, its versions and its history (one rename of its folder).
        Its version high-water mark stays behind (a tombstone) so that a new model of the
        same name never reuses a number."""
        self._check_writable()
        name = check_name(name)
        with self._mutex:
            self._check_open()
            doc = self._read_model_doc(name)
            high = max(doc["last_version"], *self._version_numbers(name), 0)
            tomb = encode_json({"name": name, "last_version": high}, "tombstone", self._max_meta)
            durable.replace_file(self._tombstones / f"{name}.json", tomb, self._staging)
            trash = durable.move_to_trash(self._root / name, self._staging)
            durable.fsync_dir(self._root)
            self._reaper.put(trash)
            self._forget(name)

    # --- versions ---------------------------------------------------------------------

    def save_version(
        self,
        name: str,
        state: bytes,
        *,
        step: int,
        parent: int | None = None,
        metrics: dict[str, float] | None = None,
    ) -> VersionMeta:
        """Persist `state` as the next version of `name`, then apply retention.

        Returns once the version is durable and visible. `parent` is the version the state
        descends from (after a rollback) and must be lower than the new number."""
        self._check_writable()
        name = check_name(name)
        step = check_step(step)
        checked_metrics = check_metrics(metrics)
        encode_json(checked_metrics, "metrics", self._max_meta)
        if not isinstance(state, bytes | bytearray | memoryview):
            raise InvalidArgument("state must be bytes")
        with self._mutex:
            self._check_open()
            doc = self._read_model_doc(name)
            version = max(doc["last_version"], *self._version_numbers(name), 0) + 1
            if parent is not None and not 1 <= check_version(parent) < version:
                raise InvalidArgument(
                    f"invalid parent {parent} for version {version} of model {name!r}:"
                    " a parent is an earlier version"
                )
            stage = durable.new_staging_dir(self._staging, "version")
            try:
                # NOTE: both files are written before either is fsynced: the first fsync's
                # journal commit then carries the other file's data and the folder's entries
                # too (ext4, xfs), so the later fsyncs find little left to do.
                sha = durable.write_new_file_hashed(stage / WEIGHTS_FILE, state, sync=False)
                meta_doc = {
                    "format": FORMAT,
                    "model": name,
                    "version": version,
                    "step": step,
                    "created_at": time.time(),
                    "parent": parent,
                    "metrics": checked_metrics,
                    "sha256": sha,
                    "size_bytes": memoryview(state).nbytes,
                    "spec": doc["spec"],
                }
                meta_bytes = encode_json(meta_doc, "version metadata", self._max_meta)
                durable.write_new_file(stage / META_FILE, meta_bytes, sync=False)
                durable.fsync_file(stage / WEIGHTS_FILE)
                durable.fsync_file(stage / META_FILE)
                durable.fsync_dir(stage)
                version_dir = self._root / name / VERSIONS_DIR / str(version)
                os.rename(stage, version_dir)
            except BaseException as exc:
                shutil.rmtree(stage, ignore_errors=True)
                if isinstance(exc, OSError) and durable.is_out_of_space(exc):
                    raise durable.out_of_space(exc, f"saving model {name!r}") from exc
                raise
            durable.fsync_dir(version_dir.parent)
            meta = version_from_doc(meta_doc, name, version, str(version_dir))
            weights = os.stat(version_dir / WEIGHTS_FILE)
            self._remember(name, version, _identity(weights), sha, True)
            self._apply_retention(name, doc)
            return meta

    def list_versions(self, name: str) -> list[VersionMeta]:
        """Metadata of every visible version, oldest first; never reads weights. A version
        whose meta.json is unreadable is logged and left out (loading it raises)."""
        self._check_open()
        name = check_name(name)
        self._read_model(name)
        for _ in range(LISTING_TRIES):
            metas, vanished = [], False
            for version in sorted(self._version_numbers(name)):
                try:
                    metas.append(self._read_meta(name, version))
                except NotFound:
                    vanished = True  # removed by retention since the scan
                except DataLoss as exc:
                    log.warning("store.skip_version", extra={"reason": exc.message})
            if not vanished:
                break
            # A writer saved meanwhile (retention follows a save): the versions it added are
            # not in this scan. Scan again, so a slow reader does not see too few, or none.
        return metas

    def load_version(self, name: str, version: int) -> tuple[VersionMeta, bytes]:
        """The metadata and state bytes of a version, verified against its sha256.

        NotFound if the model or version does not exist (or was removed meanwhile);
        DataLoss if anything stored fails verification."""
        self._check_open()
        name = check_name(name)
        version = check_version(version)
        version_dir = self._root / name / VERSIONS_DIR / str(version)
        try:
            dir_fd = os.open(version_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            self._read_model(name)  # NotFound for the model first
            raise NotFound(f"version {version} of model {name!r} not found") from None
        try:
            # Both files are read through the folder's descriptor: if the folder is moved
            # away meanwhile, they are still the same version's files.
            meta = self._read_meta(name, version, dir_fd=dir_fd)
            try:
                fd = os.open(WEIGHTS_FILE, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
            except FileNotFoundError:
                if version_dir.is_dir():
                    raise DataLoss(
                        f"model {name!r} version {version}: weights file is missing"
                    ) from None
                raise NotFound(f"version {version} of model {name!r} was removed") from None
        finally:
            os.close(dir_fd)
        try:
            ident = _identity(os.fstat(fd))
            data = self._read_exactly(fd, meta)
        finally:
            os.close(fd)
        digest = hashlib.sha256(data).hexdigest()
        ok = digest == meta.sha256
        self._remember(name, version, ident, meta.sha256, ok)
        if not ok:
            raise DataLoss(
                f"model {name!r} version {version}: weights fail their sha256 check"
                f" (stored {meta.sha256[:16]}..., computed {digest[:16]}...);"
                " the version will not be served"
            )
        return meta, data

    def latest_version(self, name: str) -> VersionMeta | None:
        """The newest version whose weights verify, or None. Corrupt versions are logged
        and skipped; verdicts are cached by file identity."""
        self._check_open()
        name = check_name(name)
        self._read_model(name)
        for version in sorted(self._version_numbers(name), reverse=True):
            try:
                meta = self._read_meta(name, version)
                if self._verified(name, meta):
                    return meta
            except NotFound:
                continue
            except DataLoss as exc:
                log.warning("store.skip_version", extra={"reason": exc.message})
        return None

    def stamp(self, name: str) -> tuple[int, ...] | None:
        """A cheap token that changes when the model's record is replaced or a version comes
        or goes (two stats: model.json's identity, the versions folder's); None if gone.
        Changes within one tick of the filesystem's clock may share a stamp."""
        try:
            record = os.stat(self._root / check_name(name) / MODEL_FILE)
            versions = os.stat(self._root / name / VERSIONS_DIR)
        except OSError:
            return None
        return (*_identity(record), versions.st_mtime_ns, versions.st_nlink, versions.st_ino)

    def changed_at(self, name: str) -> float | None:
        """When the model's record (its settings or labels) was last replaced, in seconds
        since the epoch; None if it is gone."""
        try:
            return os.stat(self._root / check_name(name) / MODEL_FILE).st_mtime
        except OSError:
            return None

    # --- training history -------------------------------------------------------------

    def append_history(self, name: str, history: History) -> int:
        """Persist the records (and any rewind) of `history` not persisted yet as one new
        segment, then compact the model's history if due; returns the records written.
        Called under the model's lock, so that nothing records meanwhile."""
        self._check_writable()
        name = check_name(name)
        with self._mutex:
            self._check_open()
            self._read_model_doc(name)  # NotFound for a deleted model
            try:
                return history_files.append(self._root / name / HISTORY_DIR, self._staging, history)
            except OSError as exc:
                if durable.is_out_of_space(exc):
                    raise durable.out_of_space(exc, f"saving the history of {name!r}") from exc
                raise

    def read_history(self, name: str, *, limit: int = DEFAULT_LIMIT) -> History:
        """The model's persisted history (its last `limit` records), all marked saved.
        Writes nothing; corrupt segments are logged and skipped."""
        self._check_open()
        name = check_name(name)
        self._read_model(name)
        return history_files.read(self._root / name / HISTORY_DIR, limit, f"model {name!r}")

    def compact_history(self, name: str, *, limit: int = DEFAULT_LIMIT) -> bool:
        """Rewrite the model's history as one segment of its last `limit` records (appends
        compact on their own when due); whether there was anything to rewrite."""
        self._check_writable()
        name = check_name(name)
        with self._mutex:
            self._check_open()
            self._read_model_doc(name)
            return history_files.compact(
                self._root / name / HISTORY_DIR, self._staging, limit, force=True
            )

    # --- labels -----------------------------------------------------------------------

    def set_label(self, name: str, label: str, version: int) -> ModelRecord:
        """Point `label` at an existing `version`, creating or moving it atomically."""
        self._check_writable()
        name = check_name(name)
        label = check_name(label, "label")
        version = check_version(version)
        with self._mutex:
            self._check_open()
            doc = self._read_model_doc(name)
            self._read_meta(name, version)  # NotFound unless the version exists
            doc["labels"] = {**doc["labels"], label: version}
            self._write_model_doc(name, doc)
            record, _ = self._read_model(name)
            return record

    def remove_label(self, name: str, label: str) -> ModelRecord:
        """Remove `label`. The version it named is kept until retention next runs."""
        self._check_writable()
        name = check_name(name)
        label = check_name(label, "label")
        with self._mutex:
            self._check_open()
            doc = self._read_model_doc(name)
            if label not in doc["labels"]:
                raise NotFound(f"label {label!r} of model {name!r} not found")
            doc["labels"] = {k: v for k, v in doc["labels"].items() if k != label}
            self._write_model_doc(name, doc)
            record, _ = self._read_model(name)
            return record

    # --- internals --------------------------------------------------------------------

    def _read_model_doc(self, name: str) -> dict[str, Any]:
        path = self._root / name / MODEL_FILE
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"model {name!r} not found") from None
        doc = decode_doc(data, str(path))
        model_from_doc(doc, name, str(path))  # validates the shape
        return doc

    def _read_model(self, name: str) -> tuple[ModelRecord, int]:
        doc = self._read_model_doc(name)
        return model_from_doc(doc, name, str(self._root / name / MODEL_FILE))

    def _write_model_doc(self, name: str, doc: dict[str, Any]) -> None:
        doc["last_version"] = max(doc["last_version"], *self._version_numbers(name), 0)
        data = encode_json(doc, f"model {name!r} metadata", self._max_meta)
        try:
            durable.replace_file(self._root / name / MODEL_FILE, data, self._staging)
        except OSError as exc:
            if durable.is_out_of_space(exc):
                raise durable.out_of_space(exc, f"updating model {name!r}") from exc
            raise

    def _tombstone(self, name: str) -> int:
        path = self._tombstones / f"{name}.json"
        try:
            doc = decode_doc(path.read_bytes(), str(path))
        except FileNotFoundError:
            return 0
        high = doc.get("last_version")
        if isinstance(high, bool) or not isinstance(high, int) or high < 0:
            raise DataLoss(f"{path}: malformed high-water mark")
        return high

    def _version_numbers(self, name: str) -> list[int]:
        try:
            with os.scandir(self._root / name / VERSIONS_DIR) as entries:
                numbers = [_version_number(entry.name) for entry in entries]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [n for n in numbers if n is not None]

    def _read_meta(self, name: str, version: int, *, dir_fd: int | None = None) -> VersionMeta:
        where = f"model {name!r} version {version}"
        try:
            if dir_fd is None:
                path = self._root / name / VERSIONS_DIR / str(version) / META_FILE
                data = path.read_bytes()
            else:
                fd = os.open(META_FILE, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
                with open(fd, "rb") as f:
                    data = f.read()
        except (FileNotFoundError, NotADirectoryError):
            if dir_fd is not None:
                raise DataLoss(f"{where}: meta.json is missing") from None
            raise NotFound(f"version {version} of model {name!r} not found") from None
        meta_doc = decode_doc(data, f"{where}: meta.json")
        return version_from_doc(meta_doc, name, version, f"{where}: meta.json")

    @staticmethod
    def _read_exactly(fd: int, meta: VersionMeta) -> bytes:
        where = f"model {meta.model!r} version {meta.version}"
        size = os.fstat(fd).st_size
        if size != meta.size_bytes:
            raise DataLoss(f"{where}: weights are {size} bytes, expected {meta.size_bytes}")
        chunks = []
        remaining = size
        while remaining > 0:  # one read in practice; each pass reads >= 1 byte or stops
            chunk = os.read(fd, remaining)
            if not chunk:
                raise DataLoss(f"{where}: weights were truncated while being read")
            chunks.append(chunk)
            remaining -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _verified(self, name: str, meta: VersionMeta) -> bool:
        path = self._root / name / VERSIONS_DIR / str(meta.version) / WEIGHTS_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            ident = _identity(os.fstat(fd))
            cached = self._verdicts.get((name, meta.version))
            if cached is not None and cached[0] == ident and cached[1] == meta.sha256:
                return cached[2]
            try:
                ok = hashlib.sha256(self._read_exactly(fd, meta)).hexdigest() == meta.sha256
            except DataLoss:
                ok = False
        finally:
            os.close(fd)
        self._remember(name, meta.version, ident, meta.sha256, ok)
        if not ok:
            log.warning(
                "store.corrupt_version",
                extra={"model": name, "version": meta.version, "reason": "sha256 mismatch"},
            )
        return ok

    def _remember(self, name: str, version: int, ident: _FileIdentity, sha: str, ok: bool) -> None:
        if len(self._verdicts) >= _MAX_CACHED_VERDICTS:
            self._verdicts.clear()
        self._verdicts[(name, version)] = (ident, sha, ok)

    def _forget(self, name: str) -> None:
        for key in [key for key in self._verdicts if key[0] == name]:
            self._verdicts.pop(key, None)

    def _apply_retention(self, name: str, doc: dict[str, Any]) -> None:
        """Keep the newest `retain` versions plus every labelled one; remove the rest,
        each by one atomic rename out of the versions folder."""
        retain = doc["settings"]["retain"]
        labelled = set(doc["labels"].values())
        versions = sorted(self._version_numbers(name))
        doomed = [v for v in versions[: max(len(versions) - retain, 0)] if v not in labelled]
        if not doomed:
            return
        versions_dir = self._root / name / VERSIONS_DIR
        trash = [durable.move_to_trash(versions_dir / str(v), self._staging) for v in doomed]
        durable.fsync_dir(versions_dir)
        for folder in trash:
            self._reaper.put(folder)
        for v in doomed:
            self._verdicts.pop((name, v), None)
        log.info("store.retention", extra={"model": name, "removed": doomed})
