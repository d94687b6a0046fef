"""A read-only replica of a store (``propserve serve --follow``): it serves the versions its
writer saves, and never writes.

The writer publishes every version with one atomic rename and moves a label by replacing
model.json atomically (propserve.service.store), so a replica that reads the folder sees a
version whole or not at all. :class:`ReplicaModels` is the core for such a process: at
start it loads, for every model, the newest version and those its labels name, verifying
each one's sha256; :meth:`ReplicaModels.refresh` (every ``poll_interval``, from
:class:`Follower`) brings in new models, versions and label moves, and lets go of what
retention or a deletion removed. A version is swapped in only once it is loaded and
verified; one that fails verification is logged, counted and not served, and what was served
before stays.

A replica has no live head: a prediction naming neither a version nor a label is answered
by the ``stable`` label's version, else the newest version, and says which. Every change
(training, saving, labels, models) is refused FAILED_PRECONDITION, naming the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable

from propserve.engine import ModelSpec, Params
from propserve.service.config import Settings
from propserve.service.errors import DataLoss, FailedPrecondition, NotFound
from propserve.service.metrics import Metrics
from propserve.service.models import SERVING_LABEL, LiveModel, Models, last_loss
from propserve.service.store import ModelRecord, ModelStore

log = logging.getLogger("propserve.replica")

Weights = tuple[ModelSpec, Params]

#: Refreshes between full looks at a model whose stamp (ModelStore.stamp) has not changed:
#: a safety net for changes that shared one tick of the filesystem's clock.
FULL_LOOK_EVERY = 20


class ReplicaModels(Models):
    """The models of a store opened read-only, following what its writer saves."""

    def __init__(
        self, store: ModelStore, settings: Settings, metrics: Metrics | None = None
    ) -> None:
        where = f" at {settings.writer_url}" if settings.writer_url else ""
        self.refusal = f"read-only replica: send training and changes to the writer{where}"
        #: False while the store cannot be read (its folder gone or unreadable).
        self.healthy = True
        super().__init__(store, settings, metrics)
        self._count_loaded()

    # -- what differs from the writer ------------------------------------------------------

    def _check_writable(self) -> None:
        self._check_open()
        raise FailedPrecondition(self.refusal)

    def _default_source(self, model: LiveModel) -> tuple[int | None, str | None]:
        if SERVING_LABEL in model.record.labels:
            return None, SERVING_LABEL
        if model.latest is None:
            raise FailedPrecondition(
                f"model {model.record.name!r} has no saved version to serve yet"
            )
        return model.latest, None

    def _in_memory(self, model: LiveModel, version: int) -> Weights | None:
        return model.pinned.get(version) or super()._in_memory(model, version)

    def _load(self, record: ModelRecord) -> LiveModel:
        """A model without a head: its newest verifiable version and labelled versions."""
        spec = ModelSpec.from_dict(record.spec, max_params=self.settings.max_params)
        model = LiveModel(record, spec, None, None, None)
        self._follow(model, record, initial=True)
        log.info(
            "model.loaded",
            extra={"model": record.name, "version": model.latest, "step": model.served_step},
        )
        return model

    def close(self) -> None:
        self._closing = True
        self.store.close()

    # -- following the store ---------------------------------------------------------------

    def refresh(self) -> None:
        """Bring the models up to what the store holds now (thread-safe; one at a time)."""
        try:
            records = {record.name: record for record in self.store.list_models()}
        except OSError as exc:
            if self.healthy:
                log.error("replica.store_unreadable", extra={"reason": str(exc)})
            self.healthy = False
            self.metrics.follow_errors.inc()
            return
        if not self.healthy:
            log.info("replica.store_readable")
        self.healthy = True
        with self._lock:
            gone = [name for name in self._models if name not in records]
        for name in gone:
            self._drop(name)
        for name, record in records.items():
            model = self._models.get(name)
            try:
                if model is None:
                    model = self._load(record)
                    with self._lock:
                        self._models[name] = model
                    log.info("replica.model_added", extra={"model": name})
                else:
                    self._follow(model, record)
            except (DataLoss, NotFound, OSError) as exc:
                self.metrics.follow_errors.inc()
                log.warning("replica.follow_failed", extra={"model": name, "reason": str(exc)})
        self._count_loaded()

    def _follow(self, model: LiveModel, record: ModelRecord, *, initial: bool = False) -> None:
        """Swap in ``record``'s labels and the newest version once each version they need is
        loaded and verified; a version that fails keeps what was served before. A model whose
        stamp has not changed is looked at in full only every FULL_LOOK_EVERY refreshes."""
        name = record.name
        stamp = self.store.stamp(name)
        model.looks += 1
        if stamp is not None and stamp == model.stamp and model.looks % FULL_LOOK_EVERY:
            return
        model.stamp = stamp
        latest = self.store.latest_version(name)  # the newest that verifies
        pinned: dict[int, Weights] = {}
        wanted = set(record.labels.values()) | ({latest.version} if latest else set())
        for version in sorted(wanted):
            weights = model.pinned.get(version) or self._versions.get(name, version)
            if weights is None:
                try:
                    meta, network = self._load_version(model, version)
                except (DataLoss, NotFound) as exc:
                    self.metrics.follow_errors.inc()
                    log.warning(
                        "replica.version_refused",
                        extra={"model": name, "version": version, "reason": str(exc)},
                    )
                    continue
                weights = (network.spec, network.params)
                if not initial and version > (model.latest or 0):  # new since the last look
                    self._observe_lag(meta.created_at)
            pinned[version] = weights
        labels = {}
        for label, version in record.labels.items():
            if version in pinned:
                labels[label] = version
            elif label in model.record.labels and model.record.labels[label] in model.pinned:
                labels[label] = model.record.labels[label]  # the move failed: keep the old
                pinned[labels[label]] = model.pinned[labels[label]]
        moved = labels != model.record.labels
        for version, weights in model.pinned.items():
            if version not in pinned:  # a label left it: kept at hand in the cache
                self._versions.put(name, version, weights)
        # The writer persists its history with each version: a new version brings more.
        history = None
        if latest is not None and (initial or latest.version != model.latest):
            history = self.store.read_history(name, limit=self.settings.history_steps)
        with model.lock:
            model.record = _with_labels(record, labels)
            model.pinned = pinned
            if history is not None:
                model.history = history
            if latest is not None and latest.version in pinned:
                model.latest = model.parent = latest.version
                model.served_step = latest.step
            model.last_loss = None if latest is None else last_loss(latest.metrics)
        if moved and not initial:
            self._observe_lag(self.store.changed_at(name))
        # Versions retention removed leave the cache too.
        self._versions.keep_only(name, {v.version for v in self.store.list_versions(name)})
        self.metrics.versions.labels(name).set(len(pinned))
        if model.latest is not None:
            self.metrics.step.labels(name).set(model.served_step)

    def _drop(self, name: str) -> None:
        with self._lock:
            model = self._models.pop(name, None)
        if model is None:
            return
        with model.lock:
            model.deleted = True
            model.pinned = {}
        self._versions.forget(name)
        self.metrics.forget_model(name)
        log.info("replica.model_removed", extra={"model": name})

    def _observe_lag(self, changed_at: float | None) -> None:
        if changed_at is not None:
            self.metrics.replica_lag.observe(max(0.0, time.time() - changed_at))

    def _count_loaded(self) -> None:
        with self._lock:
            models = list(self._models.values())
        self.metrics.replica_versions.set(sum(len(m.pinned) for m in models))


def _with_labels(record: ModelRecord, labels: dict[str, int]) -> ModelRecord:
    return record if labels == record.labels else dataclasses.replace(record, labels=labels)


class Follower:
    """Calls :meth:`ReplicaModels.refresh` every ``interval`` seconds, off the event loop,
    until stopped."""

    def __init__(
        self,
        models: ReplicaModels,
        interval: float,
        run: Callable[[Callable[[], None]], asyncio.Future[None]],
    ) -> None:
        self.models = models
        self.interval = interval
        self._run = run
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._run(self.models.refresh)
            except Exception:
                self.models.metrics.follow_errors.inc()
                log.exception("replica.refresh_failed")
